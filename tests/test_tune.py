"""The optional search: a real two-trial run on a tiny corpus and backbone, its MLflow runs and its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_params
from mlflow import MlflowClient
from tiny_backbones import tiny_deberta_backbone
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import read_label_records, write_jsonl
from deberta_rad.review import REVIEW_TEACHER
from deberta_rad.synthetic import generate_corpus
from deberta_rad.tune import SEARCHED

RANGES = {
    "alpha": {"low": 0.2, "high": 0.8},
    "temperature": {"low": 1.5, "high": 3.0},
    "learning_rate": {"low": 1.0e-4, "high": 1.0e-3, "log": True},
}


def write_tiny_splits(splits: Path) -> None:
    """40 train and 12 val synthetic reports; their ground truth stands in for the teacher's labels."""
    pairs = generate_corpus(52, seed=5)
    for name, members in (("train", pairs[:40]), ("val", pairs[40:])):
        write_jsonl(splits / name / "reports.jsonl", (report for report, _ in members))
        write_jsonl(splits / name / "labels.jsonl", (labels for _, labels in members))


@pytest.mark.slow
def test_two_trials_are_nested_runs_and_the_best_is_reported(isolated_mlflow: str, tmp_path: Path) -> None:
    write_tiny_splits(tmp_path / "splits")
    val_labels = read_label_records(tmp_path / "splits/val/labels.jsonl")
    reviews = [r.model_copy(update={"teacher": REVIEW_TEACHER}) for r in val_labels[:3]]
    write_jsonl(tmp_path / "splits/val/reviewed.jsonl", reviews)  # the search chooses on them, as train does
    backbone = tiny_deberta_backbone(tmp_path / "tiny-deberta")
    params = {
        "model": {"backbone": str(backbone), "max_length": 32, "unit": "report"},
        "train": {"epochs": 3, "batch_size": 16, "logging_steps": 1},
        "tune": {"n_trials": 2, "seed": 0, "startup_trials": 1, "epochs": 1, **RANGES},
    }
    write_params(tmp_path / "params.yaml", params)

    args = ["tune", "--splits", "splits", "--params", "params.yaml", "--output", "metrics/tune.json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "val macro F1" in result.output and "dvc exp run -S train.alpha=" in result.output

    summary = json.loads((tmp_path / "metrics" / "tune.json").read_text())
    assert [t["trial"] for t in summary["trials"]] == [0, 1]
    assert summary["best"] == max(summary["trials"], key=lambda t: t["val_macro_f1"])
    assert (summary["n_train"], summary["n_val"], summary["epochs_per_trial"]) == (40, 12, 1)
    assert summary["n_reviewed"] == 3
    for trial in summary["trials"]:
        for name, bounds in RANGES.items():
            assert bounds["low"] <= trial["params"][name] <= bounds["high"]
        assert 0.0 <= trial["val_macro_f1"] <= 1.0
    # Two different draws, not the same trial twice.
    assert summary["trials"][0]["params"] != summary["trials"][1]["params"]

    client = MlflowClient(tracking_uri=isolated_mlflow)
    experiment = client.get_experiment_by_name("deberta-rad")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'tune'")
    assert parent.info.run_id == summary["mlflow_run_id"]
    trials = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == 2
    by_id = {t["mlflow_run_id"]: t for t in summary["trials"]}
    for run in trials:
        recorded = by_id[run.info.run_id]
        assert set(SEARCHED) <= set(run.data.params)
        for name in SEARCHED:
            assert float(run.data.params[name]) == pytest.approx(recorded["params"][name])
        assert run.data.metrics["val_macro_f1"] == pytest.approx(recorded["val_macro_f1"])
        assert "val_agreement" in run.data.metrics
    best = summary["best"]
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(best["val_macro_f1"])
    for name in SEARCHED:
        assert float(parent.data.params[f"best.{name}"]) == pytest.approx(best["params"][name])
    # No report text reaches MLflow: not in params, tags or the logged JSON.
    logged = json.dumps([parent.data.params, parent.data.tags, *(r.data.params for r in trials)])
    first_report = (tmp_path / "splits" / "val" / "reports.jsonl").read_text().splitlines()[0]
    assert json.loads(first_report)["text"][:40] not in logged + json.dumps(summary)


def test_a_sentence_level_search_without_the_sentences_folder_says_what_to_pass(tmp_path: Path) -> None:
    write_tiny_splits(tmp_path / "splits")
    write_params(tmp_path / "params.yaml", {"model": {"unit": "sentence"}})
    result = CliRunner().invoke(
        app, ["tune", "--splits", str(tmp_path / "splits"), "--params", str(tmp_path / "params.yaml")]
    )
    assert result.exit_code == 2 and "--sentences data/sentences" in result.output, result.output
