"""Drift monitoring with Evidently and the relabeling store: the drift test on the two synthetic
institutions' styles, the CLI's files and exit codes, a webhook that receives the alert, the monitor's
history over a folder of batches, and a relabel that survives being interrupted midway."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from conftest import AlertSink, free_port, write_params
from typer.testing import CliRunner

from deberta_rad.cli import app
from deberta_rad.data import AppendOnlyStore, InputError, read_label_records, write_jsonl
from deberta_rad.monitor import (
    EXIT_ALERT_FAILED,
    EXIT_DRIFT,
    EXIT_ERROR,
    EXIT_NO_DRIFT,
    EXIT_TOO_SMALL,
    read_history,
    run_drift,
    window_label,
)
from deberta_rad.params import MonitoringParams
from deberta_rad.relabel import relabel, select_reports, uncertainty
from deberta_rad.schema import FINDINGS, STATUSES, LabelRecord, Report
from deberta_rad.synthetic import generate_corpus
from deberta_rad.teachers.rules import RuleTeacher

SETTINGS = MonitoringParams()
RUNNER = CliRunner()


def styled_reports(style: str, n: int, seed: int) -> list[Report]:
    """Synthetic reports of one institution's style, with ids unique to the seed."""
    reports = [report for report, _ in generate_corpus(n, seed, styles=[style])]
    for report in reports:
        report.report_id = f"s{seed}-{report.report_id}"
    return reports


def teacher_labels(style: str, n: int, seed: int, institution: str | None = None, timestamp: str | None = None):
    records = RuleTeacher().label(styled_reports(style, n, seed))
    for record in records:
        record.institution, record.timestamp = institution, timestamp
    return records


@pytest.fixture(scope="module")
def reference() -> list[LabelRecord]:
    return teacher_labels("narrative", 600, seed=1)


# ----------------------------------------------------------------------------------------------
# The drift test
# ----------------------------------------------------------------------------------------------


def test_the_other_institution_style_drifts(reference: list[LabelRecord]) -> None:
    result, snapshot = run_drift(reference, teacher_labels("templated", 300, seed=2), SETTINGS)
    assert result["drift_detected"] and result["status"] == "drift"
    assert result["share_drifted"] >= SETTINGS.drift_share
    drifted = result["per_finding"][result["drifted_findings"][0]]
    assert drifted["jensen_shannon"] >= SETTINGS.js_threshold
    assert drifted["chi_square_p_value"] < SETTINGS.p_value / len(FINDINGS)
    assert snapshot is not None


@pytest.mark.parametrize("seed", [3, 4, 5, 6, 7])
def test_windows_from_the_reference_distribution_do_not_alarm(reference: list[LabelRecord], seed: int) -> None:
    """Five independent windows at the minimum size and above: per-finding chance alarms must not add
    up to a window alarm."""
    size = SETTINGS.min_window if seed % 2 else 3 * SETTINGS.min_window
    result, _ = run_drift(reference, teacher_labels("narrative", size, seed=seed), SETTINGS)
    assert not result["drift_detected"], result["drifted_findings"]


def test_a_rare_status_the_small_reference_happens_to_lack_is_no_drift() -> None:
    """Two findings each with a status the 120-report reference never had and 5 of 150 current reports
    have, the rest the same mix: a goodness-of-fit chi-square against the reference's proportions gives
    p = 0 for both (and the JS distance is over 0.1), the two-sample test of homogeneity does not."""
    rng = np.random.default_rng(0)

    def records(n: int, rare: int, prefix: str) -> list[LabelRecord]:
        statuses = list(rng.choice(["present", "absent", "not_mentioned"], n - rare)) + ["uncertain"] * rare
        labels = [dict.fromkeys(FINDINGS, "not_mentioned") | {"Edema": s, "Atelectasis": s} for s in statuses]
        return [LabelRecord(report_id=f"{prefix}{i}", labels=row) for i, row in enumerate(labels)]

    result, _ = run_drift(records(120, 0, "r"), records(150, 5, "c"), SETTINGS)
    edema = result["per_finding"]["Edema"]
    assert edema["jensen_shannon"] >= SETTINGS.js_threshold and edema["chi_square_p_value"] > 0.01
    assert not result["drift_detected"], result["drifted_findings"]


def test_a_window_below_the_minimum_is_not_judged(reference: list[LabelRecord]) -> None:
    current = teacher_labels("templated", SETTINGS.min_window - 1, seed=8)
    result, snapshot = run_drift(reference, current, SETTINGS)
    assert result["status"] == "insufficient_data" and not result["drift_detected"] and snapshot is None
    assert str(SETTINGS.min_window) in result["reason"]


def with_probabilities(records: Sequence[LabelRecord], rng: np.random.Generator, sharpness: float):
    """The records with probabilities whose top status is the label, confidence set by `sharpness`."""
    out = []
    for record in records:
        probabilities = {}
        for finding, status in record.labels.items():
            row = rng.dirichlet(np.ones(len(STATUSES)))
            row[STATUSES.index(status)] += sharpness
            row /= row.sum()
            probabilities[finding] = dict(zip(STATUSES, row.tolist(), strict=True))
        out.append(record.model_copy(update={"probabilities": probabilities}))
    return out


def test_confidence_drift_alone_alarms(reference: list[LabelRecord]) -> None:
    rng = np.random.default_rng(0)
    same_labels = teacher_labels("narrative", 300, seed=9)
    confident = with_probabilities(reference, rng, sharpness=4.0)
    result, _ = run_drift(confident, with_probabilities(same_labels, rng, sharpness=4.0), SETTINGS)
    assert result["confidence"] and not result["confidence"]["drifted"] and not result["drift_detected"]
    result, _ = run_drift(confident, with_probabilities(same_labels, rng, sharpness=0.5), SETTINGS)
    assert result["confidence"]["drifted"] and result["drift_detected"]
    assert result["confidence"]["current_mean"] < result["confidence"]["reference_mean"]


def test_time_windows() -> None:
    assert window_label(None, "W") == "all"
    assert window_label("2026-11-24", "W") == window_label("2026-11-29T10:00:00+00:00", "W") == "2026-11-23/2026-11-29"
    assert window_label("2026-11-24", "M") == "2026-11"


# ----------------------------------------------------------------------------------------------
# The command line: files, exit codes, the webhook
# ----------------------------------------------------------------------------------------------


def write(path: Path, records: Sequence[LabelRecord]) -> Path:
    write_jsonl(path, records)
    return path


def drift_cli(tmp_path: Path, reference: Path, current: Path, *extra: str) -> tuple[int, str]:
    params = tmp_path / "params.yaml"
    write_params(params)
    out = tmp_path / "out"
    result = RUNNER.invoke(
        app,
        [
            "drift",
            "--reference",
            str(reference),
            "--current",
            str(current),
            "--output",
            str(out),
            "--params",
            str(params),
            *extra,
        ],
    )
    return result.exit_code, result.output


def test_drift_cli_writes_json_and_html_and_alerts_the_webhook(
    tmp_path: Path, reference: list[LabelRecord], alerts: AlertSink
) -> None:
    ref = write(tmp_path / "reference.jsonl", reference)
    current = write(tmp_path / "current.jsonl", teacher_labels("templated", 300, seed=10))
    code, output = drift_cli(tmp_path, ref, current, "--webhook", alerts.url)
    assert code == EXIT_DRIFT, output
    result = json.loads((tmp_path / "out/drift.json").read_text())
    assert result["drift_detected"] and set(result["per_finding"]) == set(FINDINGS)
    assert result["thresholds"]["js_threshold"] == SETTINGS.js_threshold
    assert "<html" in (tmp_path / "out/report.html").read_text()[:2000].lower()
    assert "JS distance" in output
    (alert,) = alerts.received
    assert alert["drift_detected"] and alert["drifted_findings"] and alert["current"].endswith("current.jsonl")
    assert "text" not in json.dumps(alert)


def test_drift_cli_exit_codes(tmp_path: Path, reference: list[LabelRecord]) -> None:
    ref = write(tmp_path / "reference.jsonl", reference)
    same = write(tmp_path / "same.jsonl", teacher_labels("narrative", 300, seed=11))
    small = write(tmp_path / "small.jsonl", teacher_labels("templated", 20, seed=12))
    other = write(tmp_path / "other.jsonl", teacher_labels("templated", 300, seed=13))
    assert drift_cli(tmp_path, ref, same)[0] == EXIT_NO_DRIFT
    assert drift_cli(tmp_path, ref, small)[0] == EXIT_TOO_SMALL
    assert drift_cli(tmp_path, ref, other, "--exit-zero")[0] == EXIT_NO_DRIFT
    closed = f"http://127.0.0.1:{free_port()}/alerts"
    code, output = drift_cli(tmp_path, ref, other, "--webhook", closed)
    assert code == EXIT_ALERT_FAILED and "alert not delivered" in output
    code, output = drift_cli(tmp_path, ref, tmp_path / "missing.jsonl")
    assert code == EXIT_ERROR and "missing.jsonl" in output


def test_monitor_judges_each_institution_and_week_and_keeps_a_history(
    tmp_path: Path, reference: list[LabelRecord], alerts: AlertSink
) -> None:
    incoming = tmp_path / "incoming"
    write(incoming / "a-week1.jsonl", teacher_labels("narrative", 150, 20, "st-elsewhere", "2026-11-16"))
    write(incoming / "a-week2.jsonl", teacher_labels("narrative", 150, 21, "st-elsewhere", "2026-11-24"))
    write(incoming / "b-week2.jsonl", teacher_labels("templated", 200, 22, "northfield", "2026-11-25T08:30:00"))
    write(incoming / "b-few.jsonl", teacher_labels("templated", 10, 23, "northfield", "2026-12-01"))
    (incoming / "b-few-captured-again.jsonl").write_text((incoming / "b-few.jsonl").read_text())  # counted once
    write(tmp_path / "reference.jsonl", reference)
    write_params(tmp_path / "params.yaml", {"monitoring": {"window": "W"}})
    args = [
        "monitor",
        "--reference", str(tmp_path / "reference.jsonl"),
        "--incoming", str(incoming),
        "--output", str(tmp_path / "runs"),
        "--workspace", str(tmp_path / "workspace"),
        "--webhook", alerts.url,
        "--params", str(tmp_path / "params.yaml"),
    ]  # fmt: skip
    result = RUNNER.invoke(app, args)
    assert result.exit_code == EXIT_DRIFT, result.output
    history = read_history(tmp_path / "runs/history.jsonl")
    verdicts = {(h["institution"], h["window"]): h["status"] for h in history}
    assert verdicts == {
        ("northfield", "2026-11-23/2026-11-29"): "drift",
        ("northfield", "2026-11-30/2026-12-06"): "insufficient_data",
        ("st-elsewhere", "2026-11-16/2026-11-22"): "no_drift",
        ("st-elsewhere", "2026-11-23/2026-11-29"): "no_drift",
    }
    assert [a["institution"] for a in alerts.received] == ["northfield"]
    assert (tmp_path / "runs/northfield/2026-11-23_2026-11-29/report.html").is_file()
    assert (tmp_path / "runs/drift_history.png").is_file()
    assert any((tmp_path / "workspace").iterdir())

    again = RUNNER.invoke(app, args)  # the same batches: nothing new to record or to alert
    assert again.exit_code == EXIT_DRIFT
    assert len(read_history(tmp_path / "runs/history.jsonl")) == len(history)
    assert len(alerts.received) == 1


# ----------------------------------------------------------------------------------------------
# Relabeling
# ----------------------------------------------------------------------------------------------


def prediction(report_id: str, confidence: float) -> LabelRecord:
    other = (1 - confidence) / 3
    row = {s: (confidence if s == "not_mentioned" else other) for s in STATUSES}
    return LabelRecord(
        report_id=report_id,
        labels=dict.fromkeys(FINDINGS, "not_mentioned"),
        probabilities=dict.fromkeys(FINDINGS, row),
    )


def test_the_least_certain_reports_of_the_institution_are_selected() -> None:
    reports = [Report(report_id=f"r{i}", text=f"report {i}", institution="a" if i < 4 else "b") for i in range(6)]
    predictions = [prediction("r0", 0.9), prediction("r1", 0.4), prediction("r2", 0.7), prediction("r4", 0.3)]
    assert uncertainty(None) == 1.0 and uncertainty(predictions[1]) == pytest.approx(0.6)
    chosen = select_reports(reports, predictions, budget=3, institution="a")
    assert [r.report_id for r in chosen] == ["r3", "r1", "r2"]  # r3 has no prediction: most uncertain


class FailingTeacher:
    """The rule teacher, but the run dies after some chunks, as a killed process or a lost endpoint would."""

    def __init__(self, chunks_before_failure: int) -> None:
        self.left = chunks_before_failure
        self.sent: list[str] = []

    def __call__(self, chunk: Sequence[Report]) -> list[LabelRecord]:
        if self.left == 0:
            raise ConnectionError("teacher went away")
        self.left -= 1
        self.sent += [r.report_id for r in chunk]
        return RuleTeacher().label(chunk)


def test_an_interrupted_relabel_resumes_without_losing_or_repeating_records(tmp_path: Path) -> None:
    incoming = styled_reports("templated", 100, seed=30)
    corpus = incoming[:5]  # already in training: must not be sent again
    store = AppendOnlyStore(tmp_path / "relabeled/records.jsonl")
    selection = select_reports(incoming, [], budget=80)

    first = FailingTeacher(chunks_before_failure=2)
    with pytest.raises(ConnectionError):
        relabel(selection, store, first, corpus=corpus, chunk_size=10)
    assert len(store.records()) == 20

    with store.path.open("a") as handle:  # a crash in the middle of writing a line
        handle.write('{"report_id": "torn", "te')
    second = FailingTeacher(chunks_before_failure=100)
    summary = relabel(selection, store, second, corpus=corpus, chunk_size=10)
    rows = store.records()
    ids = [row["report_id"] for row in rows]
    expected = [r.report_id for r in selection if r.report_id not in {c.report_id for c in corpus}]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert not set(first.sent) & set(second.sent)
    assert summary.labelled == len(expected) - 20 and summary.store_size == len(expected)
    assert all(set(row["labels"]) == set(FINDINGS) and row["text"] for row in rows)
    assert "torn" not in store.path.read_text()


def test_an_id_taken_by_another_text_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    report = Report(report_id="r1", text="No pneumothorax.")
    clash = Report(report_id="r1", text="Small left pleural effusion.")
    teacher = FailingTeacher(chunks_before_failure=10)
    with pytest.raises(InputError, match="r1"):
        relabel([clash], AppendOnlyStore(tmp_path / "store.jsonl"), teacher, corpus=[report])
    assert teacher.sent == []


def test_relabel_cli_follows_the_drift_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    reports = styled_reports("templated", 30, seed=40)
    write_jsonl(tmp_path / "incoming.jsonl", reports)
    write_params(tmp_path / "params.yaml", {"relabel": {"budget": 12}})
    (tmp_path / "drift.json").write_text(json.dumps({"drift_detected": False}))
    args = ["relabel", "--reports", "incoming.jsonl", "--when-drift", "drift.json", "--summary", "summary.json"]
    quiet = RUNNER.invoke(app, args)
    assert quiet.exit_code == 0 and "no drift" in quiet.output
    assert not (tmp_path / "data/relabeled/records.jsonl").exists()
    (tmp_path / "drift.json").write_text(json.dumps({"drift_detected": True}))
    loud = RUNNER.invoke(app, args)
    assert loud.exit_code == 0, loud.output
    assert json.loads((tmp_path / "summary.json").read_text())["labelled"] == 12
    assert len(read_label_records(tmp_path / "data/relabeled/records.jsonl")) == 12  # lines are label records too
