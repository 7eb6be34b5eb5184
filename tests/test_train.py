"""A short real training run on synthetic reports: the student learns, well above chance."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_backbones import tiny_deberta_backbone

from deberta_rad.data import InputError, labels_by_id, split_reports
from deberta_rad.metrics import compute_metrics
from deberta_rad.params import Fractions
from deberta_rad.predict import LabelingEngine
from deberta_rad.schema import FINDINGS, STATUS_INDEX, STATUSES
from deberta_rad.synthetic import generate_corpus
from deberta_rad.train import (
    TrainConfig,
    adamw_with_head_rate,
    initial_student,
    repeat_factors,
    resolved_init,
    train_student,
)

FRACTIONS = Fractions(train=0.7, val=0.1, test=0.2)


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
    work_dir = tmp_path_factory.mktemp("ck")
    student, scores = train_student(splits["train"], splits["val"], gold, config, work_dir)
    return student, scores, splits, gold, work_dir


def test_short_training_run_learns_well_above_chance(trained) -> None:
    student, scores, splits, gold, _ = trained
    test = splits["test"]
    predicted = labels_by_id(LabelingEngine(student, batch_size=32).label(test, model_name="test"))
    test_gold = {r.report_id: gold[r.report_id] for r in test}
    learned = compute_metrics(predicted, test_gold)["macro_f1"]
    train_gold = {r.report_id: gold[r.report_id] for r in splits["train"]}
    chance = compute_metrics(chance_labels(train_gold, list(test_gold)), test_gold)["macro_f1"]
    assert learned > chance + 0.2, f"student macro F1 {learned:.3f} vs chance {chance:.3f}"
    assert scores["eval_macro_f1"] > chance


def test_the_epoch_with_the_lowest_validation_loss_is_kept(trained) -> None:
    """train.select_on: loss (the default) keeps the epoch whose val distillation loss is lowest, not the
    one whose noisier val macro F1 is highest."""
    _, scores, _, _, work_dir = trained
    last = max(work_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    evaluations = [entry for entry in state["log_history"] if "eval_loss" in entry]
    best = min(evaluations, key=lambda entry: entry["eval_loss"])
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best['step']}")
    assert scores["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-6)


def test_heads_get_their_own_learning_rate(trained) -> None:
    config = TrainConfig(learning_rate=1e-4, head_learning_rate=3e-3, weight_decay=0.01)
    optimizer = adamw_with_head_rate(trained[0].model, config)
    rates = {(group["lr"], group["weight_decay"]) for group in optimizer.param_groups}
    assert rates == {(1e-4, 0.01), (1e-4, 0.0), (3e-3, 0.01), (3e-3, 0.0)}
    n_heads = sum(p.numel() for p in trained[0].model.heads.parameters())
    assert n_heads == trained[0].model.encoder.config.hidden_size * 52 + 52


def test_init_from_continues_a_saved_student_and_refuses_one_of_another_kind(trained, tmp_path: Path) -> None:
    """train.init_from starts from the saved encoder and heads, not the backbone's with fresh heads; a
    student whose pooling (or unit, or backbone) params.yaml does not describe, or a path that holds none,
    is refused by name."""
    student = trained[0]
    student.save(tmp_path / "student")
    config = TrainConfig(max_length=96, init_from=str(tmp_path / "student"))
    start = initial_student(config, None).model.state_dict()
    saved = student.model.state_dict()
    assert start.keys() == saved.keys() and all(torch.equal(start[name], saved[name]) for name in saved)
    fresh = initial_student(config.model_copy(update={"init_from": None}), None).model.heads.state_dict()
    assert not all(torch.equal(fresh[name], saved[f"heads.{name}"]) for name in fresh)
    with pytest.raises(InputError, match=r"params.yaml says model.pooling 'cls' but it has 'mean'"):
        resolved_init(config.model_copy(update={"pooling": "cls"}))
    with pytest.raises(InputError, match=r"^train.init_from: .*nowhere"):
        resolved_init(config.model_copy(update={"init_from": str(tmp_path / "nowhere")}))
    assert resolved_init(config) == (config, str(tmp_path / "student"))


def test_repeat_factors_show_rare_finding_status_pairs_more_often() -> None:
    not_mentioned = STATUS_INDEX["not_mentioned"]
    targets = np.full((100, len(FINDINGS)), not_mentioned)
    targets[:50, 0] = STATUS_INDEX["absent"]  # common: half the reports
    targets[50:52, 1] = STATUS_INDEX["present"]  # rare: 2% of reports
    factors = repeat_factors(targets, threshold=0.5, seed=0)
    assert (factors[:50] == 1).all() and (factors[52:] == 1).all()
    assert set(factors[50:52]) <= {5, 6}  # sqrt(0.5 / 0.02) = 5
    assert (repeat_factors(targets, threshold=0.0, seed=0) == 1).all()


@pytest.fixture(scope="module")
def deberta_backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tiny_deberta_backbone(tmp_path_factory.mktemp("backbone") / "tiny-deberta"))


def test_deberta_student_trains_and_an_interrupted_run_resumes_from_its_last_checkpoint(
    deberta_backbone: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = generate_corpus(48, seed=5)
    gold = labels_by_id(labels for _, labels in pairs)
    train, val = [r for r, _ in pairs[:40]], [r for r, _ in pairs[40:]]
    config = TrainConfig(backbone=deberta_backbone, max_length=48, epochs=2, batch_size=8, early_stopping_patience=5)
    student, scores = train_student(train, val, gold, config, tmp_path)
    assert student.model.encoder.config.model_type == "deberta-v2" and scores["epoch"] == 2
    checkpoints = sorted((tmp_path / name for name in os.listdir(tmp_path) if name.startswith("checkpoint-")), key=str)
    assert len(checkpoints) == 2
    shutil.rmtree(max(checkpoints, key=lambda path: int(path.name.split("-")[1])))  # killed during epoch 2

    with caplog.at_level(logging.WARNING, logger="deberta_rad.train"):
        train_student(train, val, gold, config, tmp_path)
    first = min(checkpoints, key=lambda path: int(path.name.split("-")[1]))
    assert f"resuming the interrupted training from {first}" in caplog.text

    caplog.clear()
    # another run: starts afresh
    with caplog.at_level(logging.WARNING, logger="deberta_rad.train"):
        train_student(train, val, gold, config.model_copy(update={"alpha": 0.3}), tmp_path)
    assert "resuming" not in caplog.text
