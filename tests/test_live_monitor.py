"""The long-lived monitor (`monitor --follow`) on a capture folder that grows, restarts and crashes, and
the Alertmanager receiver that queues relabeling (`relabel-on-alert`). The end-to-end run with the real
service, Prometheus and Alertmanager is in test_pipeline.py."""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from test_monitoring import styled_reports, teacher_labels

from deberta_rad.alert_relabel import PayloadError, RelabelQueue, drifted_institutions, serve
from deberta_rad.data import read_reports, write_jsonl
from deberta_rad.live_monitor import LiveMonitor, window_seconds
from deberta_rad.monitor import read_history
from deberta_rad.params import MonitoringParams
from deberta_rad.schema import LabelRecord

SETTINGS = MonitoringParams(window="D", window_reports=150)
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def reference() -> list[LabelRecord]:
    return teacher_labels("narrative", 400, seed=1)


def captured(style: str, n: int, seed: int, institution: str, at: datetime = NOW) -> list[LabelRecord]:
    return teacher_labels(style, n, seed, institution, at.isoformat(timespec="seconds"))


def append_capture(folder: Path, records: list[LabelRecord], day: str = "2026-12-02") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{day}.jsonl").open("a", encoding="utf-8") as handle:
        handle.writelines(r.model_dump_json(exclude_none=True) + "\n" for r in records)


def live(reference: list[LabelRecord], root: Path, clock: datetime = NOW) -> LiveMonitor:
    return LiveMonitor(reference, root / "capture", root / "out", SETTINGS, clock=lambda: clock)


def sample(monitor: LiveMonitor, name: str, **labels: str) -> float | None:
    return monitor.metrics.registry.get_sample_value(name, labels)


def test_a_full_window_is_judged_per_institution_and_published(reference: list[LabelRecord], tmp_path: Path) -> None:
    arrivals = captured("narrative", 160, 2, "general") + captured("templated", 150, 3, "north")
    append_capture(tmp_path / "capture", arrivals)
    monitor = live(reference, tmp_path)
    verdicts = {r["institution"]: r for r in monitor.poll()}

    assert verdicts["north"]["drift_detected"] and not verdicts["general"]["drift_detected"]
    assert sample(monitor, "deberta_rad_drift_alarm", institution="north") == 1
    assert sample(monitor, "deberta_rad_drift_alarm", institution="general") == 0
    assert sample(monitor, "deberta_rad_drift_window_reports", institution="general") == 150  # a full window
    assert sample(monitor, "deberta_rad_monitor_windows_judged_total", institution="north", verdict="drift") == 1
    assert sample(monitor, "deberta_rad_drift_js_distance", institution="north", finding="Edema") is not None
    shares = [
        sample(monitor, "deberta_rad_status_share", institution="north", finding="Edema", status=s)
        for s in ("present", "absent", "uncertain", "not_mentioned")
    ]
    assert sum(shares) == pytest.approx(1, abs=0.01)
    assert sample(monitor, "deberta_rad_monitor_window_seconds") == 86400
    assert monitor.poll() == []  # nothing new, nothing judged again


def test_a_window_not_yet_full_waits_until_its_day_ends(reference: list[LabelRecord], tmp_path: Path) -> None:
    append_capture(tmp_path / "capture", captured("narrative", 120, 4, "general"))
    assert live(reference, tmp_path).poll() == []
    tomorrow = NOW + timedelta(days=1)
    append_capture(tmp_path / "capture", captured("narrative", 20, 5, "general", at=tomorrow), day="2026-12-03")
    monitor = live(reference, tmp_path, clock=tomorrow)
    assert [(r["institution"], r["n_current"], r["status"]) for r in monitor.poll()] == [("general", 120, "no_drift")]
    assert len(monitor.pending("general")) == 20  # tomorrow's reports wait for tomorrow's window


def test_a_small_window_is_not_judged_and_leaves_the_alarm_as_it_was(
    reference: list[LabelRecord], tmp_path: Path
) -> None:
    append_capture(tmp_path / "capture", captured("templated", 150, 5, "north"))
    assert live(reference, tmp_path).poll()[0]["drift_detected"]
    append_capture(tmp_path / "capture", captured("narrative", 20, 6, "north"))
    monitor = live(reference, tmp_path, clock=NOW + timedelta(days=1))
    assert [r["status"] for r in monitor.poll()] == ["insufficient_data"]
    assert sample(monitor, "deberta_rad_drift_alarm", institution="north") == 1


def test_a_restart_resumes_without_judging_a_window_twice_or_skipping_one(
    reference: list[LabelRecord], tmp_path: Path
) -> None:
    capture = tmp_path / "capture"
    append_capture(capture, captured("narrative", 100, 7, "general"))
    assert live(reference, tmp_path).poll() == []  # read, pending
    append_capture(capture, captured("narrative", 100, 8, "general"))
    restarted = live(reference, tmp_path)
    assert [r["n_current"] for r in restarted.poll()] == [150]  # the first 100 were kept over the restart
    assert sample(restarted, "deberta_rad_drift_alarm", institution="general") == 0

    # A crash after the history line but before the pending file was emptied: not judged again.
    append_capture(capture, captured("narrative", 100, 9, "general"))
    monitor = live(reference, tmp_path)
    monitor.read_new()
    [pending] = (tmp_path / "out/pending").glob("general-*.jsonl")
    shutil.copy(pending, tmp_path / "kept")
    assert len(monitor.poll()) == 1
    shutil.copy(tmp_path / "kept", pending)
    after_crash = live(reference, tmp_path)
    assert after_crash.poll() == []
    history = read_history(tmp_path / "out/history.jsonl")
    assert [h["sequence"] for h in history] == [1, 2]
    assert sum(h["n_current"] for h in history) == 300  # every captured report judged once
    assert sample(after_crash, "deberta_rad_drift_window_reports", institution="general") == 150  # restored


def test_a_line_still_being_written_waits_and_a_bad_line_is_counted_not_fatal(
    reference: list[LabelRecord], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture = tmp_path / "capture"
    records = captured("narrative", 150, 10, "general")
    append_capture(capture, records[:-1])
    with (capture / "2026-12-02.jsonl").open("a") as handle:
        handle.write('{"report_id": "x", "secret text"}\n')
        bad_time = records[0].model_copy(update={"report_id": "late", "timestamp": "next tuesday"})
        handle.write(bad_time.model_dump_json(exclude_none=True) + "\n")
        handle.write(records[-1].model_dump_json(exclude_none=True)[:40])
    monitor = live(reference, tmp_path)
    assert monitor.poll() == []  # 149 whole records: not full yet
    assert sample(monitor, "deberta_rad_monitor_bad_lines_total") == 2
    assert "timestamp is not a time" in caplog.text
    assert "2026-12-02.jsonl" in caplog.text and "secret" not in caplog.text
    with (capture / "2026-12-02.jsonl").open("a") as handle:
        handle.write(records[-1].model_dump_json(exclude_none=True)[40:] + "\n")
    assert [r["n_current"] for r in monitor.poll()] == [150]


def test_a_line_a_crash_cut_short_is_read_again_and_a_replaced_capture_file_from_its_start(
    reference: list[LabelRecord], tmp_path: Path
) -> None:
    capture = tmp_path / "capture"
    append_capture(capture, captured("narrative", 100, 12, "general"))
    monitor = live(reference, tmp_path)
    monitor.read_new()
    [pending] = (tmp_path / "out/pending").glob("general-*.jsonl")
    with pending.open("a") as handle:  # killed while appending, before the offsets were saved
        handle.write('{"report_id": "general-cut", "lab')
    (tmp_path / "out/follow_state.json").write_text('{"offsets": {}}')
    restarted = live(reference, tmp_path)
    restarted.read_new()
    assert len(restarted.pending("general")) == 100  # the cut line skipped, the re-read lines counted once
    replaced = captured("narrative", 60, 13, "general")
    (capture / "2026-12-02.jsonl").write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in replaced))
    restarted.read_new()
    assert len(restarted.pending("general")) == 160


def test_window_lengths_follow_the_calendar() -> None:
    assert window_seconds("W", NOW) == 7 * 86400
    assert window_seconds("M", datetime(2026, 2, 10, tzinfo=UTC)) == 28 * 86400
    assert window_seconds("min", NOW) == 60


def test_a_window_reports_below_min_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window_reports"):
        MonitoringParams(min_window=200, window_reports=100)


# ----------------------------------------------------------------------------------------------
# relabel-on-alert
# ----------------------------------------------------------------------------------------------


def alert_payload(institution: str, status: str = "firing", started: str = "2026-12-02T12:00:00Z") -> dict:
    """What Alertmanager posts (webhook payload version 4)."""
    return {
        "version": "4",
        "groupKey": f'{{}}/{{kind="label_drift"}}:{{institution="{institution}"}}',
        "status": status,
        "receiver": "relabel-on-alert",
        "groupLabels": {"institution": institution},
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "LabelDrift", "institution": institution, "kind": "label_drift"},
                "startsAt": started,
            }
        ],
    }


@pytest.fixture
def jobs(tmp_path: Path) -> RelabelQueue:
    feed = [r.model_copy(update={"institution": "north"}) for r in styled_reports("templated", 30, seed=11)]
    feed += [r.model_copy(update={"institution": "general"}) for r in styled_reports("narrative", 20, seed=12)]
    write_jsonl(tmp_path / "feed.jsonl", feed)
    (tmp_path / "data/incoming").mkdir(parents=True)
    return RelabelQueue(tmp_path, tmp_path / "feed.jsonl", tmp_path / "data/incoming/reports.jsonl", command=["false"])


def test_an_alert_episode_queues_its_institution_once(jobs: RelabelQueue) -> None:
    answer = jobs.take(alert_payload("north"))
    assert [(q["institution"], q["reports"]) for q in answer["queued"]] == [("north", 30)]
    assert jobs.take(alert_payload("north"))["already"][0]["state"] == "queued"  # Alertmanager's repeat
    assert jobs.take(alert_payload("north", status="resolved")) == {"queued": [], "already": [], "nothing": []}
    assert len(jobs.take(alert_payload("north", started="2026-12-09T08:00:00Z"))["queued"]) == 1  # a new episode
    assert jobs.take(alert_payload("east"))["nothing"][0]["state"] == "no reports in the feed"
    job = answer["queued"][0]["job"]
    assert {json.loads(line)["institution"] for line in (jobs.folder / f"{job}.jsonl").open()} == {"north"}


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ({"status": "firing"}, "no 'alerts' list"),
        ({"alerts": []}, "no 'groupKey'"),
        ({"groupKey": "g", "alerts": [1]}, r"alerts\[0\]: no 'labels'"),
    ],
)
def test_what_is_not_an_alertmanager_payload_is_named(payload: dict, problem: str) -> None:
    with pytest.raises(PayloadError, match=problem):
        drifted_institutions(payload)


def test_a_failed_episode_is_queued_again_and_the_worker_outlives_a_job_that_raises(jobs: RelabelQueue) -> None:
    first = jobs.take(alert_payload("north"))["queued"][0]["job"]
    jobs.command = ["no-such-loop-command"]
    jobs.run_safely(first)
    assert jobs.jobs()[first]["state"].startswith("failed (FileNotFoundError")
    assert not (jobs.folder / f"{first}.jsonl").exists()  # its reports' copy is gone
    assert [q["job"] for q in jobs.take(alert_payload("north"))["queued"]] == [first]  # Alertmanager's retry


def test_the_receiver_answers_over_http_runs_the_loop_and_records_a_failure(jobs: RelabelQueue) -> None:
    port = free_port()
    server = serve(jobs, "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.post(f"{url}/alerts", content=b"not json").status_code == 400
        bad = httpx.post(f"{url}/alerts", json={"alerts": []})
        assert bad.status_code == 400 and "groupKey" in bad.json()["error"]
        assert httpx.post(f"{url}/other", json={}).status_code == 404
        queued = httpx.post(f"{url}/alerts", json=alert_payload("north")).json()["queued"][0]
        deadline = time.monotonic() + 30
        while jobs.jobs()[queued["job"]]["state"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.2)
        state = httpx.get(f"{url}/jobs").json()["jobs"][0]["state"]
        assert state.startswith("failed (exit 1")  # `false` stands for a loop that fails
        given = read_reports(jobs.incoming)  # what the loop was given: the institution's reports in the feed
        assert len(given) == 30 and {r.institution for r in given} == {"north"}
    finally:
        server.shutdown()
        server.server_close()
