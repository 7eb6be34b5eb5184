"""A short real training run on synthetic reports: the student learns, well above chance."""

from __future__ import annotations

import numpy as np
import pytest

from deberta_rad.data import labels_by_id, split_reports
from deberta_rad.evaluate import compute_metrics
from deberta_rad.predict import LabelingEngine
from deberta_rad.schema import FINDINGS, STATUSES
from deberta_rad.synthetic import generate_corpus
from deberta_rad.train import TrainConfig, adamw_with_head_rate, train_student

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def chance_labels(train_gold: dict[str, dict[str, str]], report_ids: list[str], seed: int = 0) -> dict:
    """Chance: each finding's status drawn from its training distribution, independent of the text."""
    rng = np.random.default_rng(seed)
    shares = {
        f: np.array([sum(labels[f] == s for labels in train_gold.values()) for s in STATUSES], dtype=float)
        for f in FINDINGS
    }
    return {
        rid: {f: STATUSES[rng.choice(len(STATUSES), p=shares[f] / shares[f].sum())] for f in FINDINGS}
        for rid in report_ids
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    pairs = generate_corpus(360, seed=11)
    gold = labels_by_id(labels for _, labels in pairs)
    splits = split_reports([report for report, _ in pairs], seed=1, fractions=FRACTIONS)
    config = TrainConfig(max_length=96, epochs=6, batch_size=16, learning_rate=1e-4, head_learning_rate=3e-3)
    student, scores = train_student(splits["train"], splits["val"], gold, config, tmp_path_factory.mktemp("ck"))
    return student, scores, splits, gold


def test_short_training_run_learns_well_above_chance(trained) -> None:
    student, scores, splits, gold = trained
    test = splits["test"]
    predicted = labels_by_id(LabelingEngine(student, batch_size=32).label(test, model_name="test"))
    test_gold = {r.report_id: gold[r.report_id] for r in test}
    learned = compute_metrics(predicted, test_gold)["macro_f1"]
    train_gold = {r.report_id: gold[r.report_id] for r in splits["train"]}
    chance = compute_metrics(chance_labels(train_gold, list(test_gold)), test_gold)["macro_f1"]
    assert learned > chance + 0.2, f"student macro F1 {learned:.3f} vs chance {chance:.3f}"
    assert scores["eval_macro_f1"] > chance


def test_heads_get_their_own_learning_rate(trained) -> None:
    config = TrainConfig(learning_rate=1e-4, head_learning_rate=3e-3, weight_decay=0.01)
    optimizer = adamw_with_head_rate(trained[0].model, config)
    rates = {(group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
    assert rates == {(1e-4, 0.01), (1e-4, 0.0), (3e-3, 0.01), (3e-3, 0.0)}
    n_heads = sum(p.numel() for p in trained[0].model.heads.parameters())
    assert n_heads == trained[0].model.encoder.config.hidden_size * 52 + 52


def test_unknown_train_knob_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown model/train keys \['epoch'\]"):
        TrainConfig.from_params({"model": {}, "train": {"epoch": 3}})
