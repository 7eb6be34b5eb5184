"""The long-lived drift monitor, `deberta-rad monitor --follow`: it reads the service's capture (one JSONL
per UTC day, predicted statuses and confidence, never text) as it grows, and judges an institution's
window against the reference as soon as the window holds `monitoring.window_reports` reports or its
time window (`monitoring.window`, a calendar period) has ended, whichever comes first. Each verdict goes
to the history, the Evidently workspace and the Prometheus metrics that `monitoring/alerts.yml` reads.

A restart resumes where it stopped; everything it needs is in the output folder:
- `follow_state.json`: per capture file, the bytes read so far (rewritten atomically);
- `pending/<institution>.jsonl`: records read but not judged yet;
- `history.jsonl`: one line per judged window, numbered per institution.
A window is judged once: when a crash left its records in `pending/` after its history line was
written, the records' fingerprint is in the history and they are dropped instead of judged again (its
snapshot and webhook alert, sent after the history line, are then at most once). A crash between
reading lines and saving the offsets reads them twice; a report id counts once per window. A line a
kill cut short is skipped when read (see monitor.append_lines); the monitor stops between polls on
SIGTERM, so systemd and Kubernetes do not cut one. A capture file shorter than what was read of it
(replaced) is read again from its start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deberta_rad.data import write_atomically
from deberta_rad.monitor import (
    UNKNOWN_INSTITUTION,
    add_to_workspace,
    alert_payload,
    append_lines,
    group_fingerprint,
    period_of,
    read_history,
    read_json_lines,
    run_drift,
    safe_name,
    write_result,
)
from deberta_rad.net import post_alert
from deberta_rad.params import MonitoringParams
from deberta_rad.schema import STATUSES, LabelRecord

logger = logging.getLogger(__name__)

STATE_FILE = "follow_state.json"
HISTORY_FILE = "history.jsonl"


def folder_name(institution: str) -> str:
    """A file-system name for an institution that keeps "a/b" and "a_b" apart."""
    return f"{safe_name(institution)}-{hashlib.sha256(institution.encode()).hexdigest()[:8]}"


def window_seconds(frequency: str, now: datetime) -> float:
    """The length of the current window (a month is not always 30 days)."""
    period = period_of(now, frequency)
    return float(((period + 1).start_time - period.start_time).total_seconds())


class MonitorMetrics:
    """What Prometheus scrapes from the monitor (names: monitoring/README.md, read by alerts.yml and the
    Grafana dashboard)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        by_institution, by_finding = ["institution"], ["institution", "finding"]

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, doc, list(labels), registry=self.registry)

        self.alarm = gauge("deberta_rad_drift_alarm", "1 when the last judged window drifted.", by_institution)
        self.confidence_alarm = gauge(
            "deberta_rad_confidence_drift_alarm", "1 when the last judged window's confidence drifted.", by_institution
        )
        self.share = gauge("deberta_rad_drift_share", "Share of findings drifted in the last window.", by_institution)
        self.window_reports = gauge(
            "deberta_rad_drift_window_reports", "Reports in the last judged window.", by_institution
        )
        self.js = gauge("deberta_rad_drift_js_distance", "Jensen-Shannon distance of a finding's statuses.", by_finding)
        self.p_value = gauge("deberta_rad_drift_p_value", "Chi-square p-value of a finding's statuses.", by_finding)
        self.status_share = gauge(
            "deberta_rad_status_share",
            "Share of each status of a finding in the last judged window.",
            ["institution", "finding", "status"],
        )
        self.judged = Counter(
            "deberta_rad_monitor_windows_judged",
            "Windows judged, by verdict.",
            ["institution", "verdict"],
            registry=self.registry,
        )
        self.bad_lines = Counter(
            "deberta_rad_monitor_bad_lines",
            "Capture lines that are not label records (skipped, logged).",
            registry=self.registry,
        )
        self.last_judged = gauge("deberta_rad_monitor_last_judged_timestamp_seconds", "When a window was last judged.")
        self.window = gauge("deberta_rad_monitor_window_seconds", "The length of the time window (monitoring.window).")
        self.latest = 0.0

    def show(self, institution: str, result: dict, judged_at: float) -> None:
        """Publish a window's verdict; a window too small to judge leaves the alarm as it was."""
        self.latest = max(judged_at, self.latest)
        self.last_judged.set(self.latest)
        self.window_reports.labels(institution).set(result["n_current"])
        if result["status"] == "insufficient_data":
            return
        self.alarm.labels(institution).set(int(result["drift_detected"]))
        confidence = result.get("confidence") or {}
        self.confidence_alarm.labels(institution).set(int(bool(confidence.get("drifted"))))
        self.share.labels(institution).set(result["share_drifted"])
        for finding, scores in result.get("per_finding", {}).items():
            if scores["jensen_shannon"] is not None:
                self.js.labels(institution, finding).set(scores["jensen_shannon"])
            self.p_value.labels(institution, finding).set(scores["chi_square_p_value"])
            for status in STATUSES:
                self.status_share.labels(institution, finding, status).set(scores["current_share"].get(status, 0.0))

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics from a background thread (prometheus_client's own server)."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)


@dataclass
class LiveMonitor:
    """Follows a capture folder and judges each institution's windows; `poll` does one round."""

    reference: Sequence[LabelRecord]
    capture: Path
    output: Path
    settings: MonitoringParams
    metrics: MonitorMetrics = field(default_factory=MonitorMetrics)
    webhook: str | None = None
    workspace: Path | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        state = self.output / STATE_FILE
        if state.is_file():
            self.offsets = json.loads(state.read_text())["offsets"]
        self.metrics.window.set(window_seconds(self.settings.window, self.clock()))
        self.metrics.latest = self.clock().timestamp()  # "stalled" counts from the start
        self.metrics.last_judged.set(self.metrics.latest)
        self._restore_metrics()

    # --- reading the capture ------------------------------------------------------------------

    def read_new(self) -> int:
        """Move whole new capture lines into the institutions' pending files; returns how many."""
        moved: dict[str, list[str]] = {}
        paths = sorted(self.capture.glob("*.jsonl"))
        present = {path.name for path in paths}
        self.offsets = {name: at for name, at in self.offsets.items() if name in present}  # files gone
        for path in paths:
            start = self.offsets.get(path.name, 0)
            if path.stat().st_size < start:  # replaced or cut: read it again from its start
                logger.warning("%s is shorter than what was read of it: reading it again from the start", path)
                start = 0
            with path.open("rb") as handle:
                handle.seek(start)
                chunk = handle.read()
            whole = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for its newline
            offset = start
            for raw in whole.splitlines(keepends=True):
                line = raw.decode("utf-8", errors="replace").rstrip("\n")
                record = self._record(line, f"{path} (the line at byte {offset})")
                if record is not None:
                    moved.setdefault(record.institution or UNKNOWN_INSTITUTION, []).append(line)
                offset += len(raw)
            self.offsets[path.name] = offset
        for institution, lines in moved.items():
            append_lines(self._pending_path(institution), lines)
        write_atomically(self.output / STATE_FILE, lambda p: p.write_text(json.dumps({"offsets": self.offsets})))
        return sum(len(lines) for lines in moved.values())

    def _record(self, line: str, where: str) -> LabelRecord | None:
        """A capture line as a record; a line that is not one is logged by place (never content) and counted."""
        if not line.strip():
            return None
        try:
            record = LabelRecord.model_validate_json(line)
            if record.timestamp:
                period_of(record.timestamp, self.settings.window)
        except ValidationError as error:
            problem = f"not a label record ({error.error_count()} problems)"
        except ValueError:
            problem = "its timestamp is not a time"
        else:
            return record
        logger.error("%s: %s, skipped", where, problem)
        self.metrics.bad_lines.inc()
        return None

    def _pending_path(self, institution: str) -> Path:
        return self.output / "pending" / f"{folder_name(institution)}.jsonl"

    def _window_dir(self, institution: str, sequence: int) -> Path:
        return self.output / folder_name(institution) / f"{sequence:06d}"

    def pending(self, institution: str) -> list[LabelRecord]:
        """The institution's records not judged yet, one per report id (its latest answer)."""
        records = {}
        for row in read_json_lines(self._pending_path(institution)):
            record = LabelRecord.model_validate(row)
            records[record.report_id] = record
        return list(records.values())

    def institutions(self) -> list[str]:
        """The institutions with pending records (named by their first record: file names are sanitised)."""
        names = set()
        for path in (self.output / "pending").glob("*.jsonl"):
            rows = read_json_lines(path)
            if rows:
                names.add(rows[0].get("institution") or UNKNOWN_INSTITUTION)
        return sorted(names)

    # --- judging ----------------------------------------------------------------------------

    def closed_window(self, records: Sequence[LabelRecord]) -> list[LabelRecord]:
        """The first `window_reports` records once there are that many, else the records of a calendar
        window that has ended; none while the window is still open."""
        if len(records) >= self.settings.window_reports:
            return list(records[: self.settings.window_reports])
        frequency = self.settings.window
        first = min((period_of(r.timestamp, frequency) for r in records if r.timestamp), default=None)
        if first is None or first >= period_of(self.clock(), frequency):
            return []
        return [r for r in records if r.timestamp and period_of(r.timestamp, frequency) == first]

    def poll(self) -> list[dict]:
        """Read what is new and judge every window that closed; returns the new verdicts. The pending
        file is rewritten once per institution and poll, so a backlog of many windows stays linear."""
        self.read_new()
        results = []
        for institution in self.institutions():
            records = self.pending(institution)
            left = records
            while window := self.closed_window(left):
                result = self.judge(institution, window)
                if result is not None:
                    results.append(result)
                judged = {r.report_id for r in window}
                left = [r for r in left if r.report_id not in judged]
            if len(left) < len(records):
                self._keep_pending(institution, left)
        return results

    def _keep_pending(self, institution: str, records: Sequence[LabelRecord]) -> None:
        """Replace the institution's pending file with the records not judged yet (atomically)."""
        lines = "".join(r.model_dump_json(exclude_none=True) + "\n" for r in records)
        write_atomically(self._pending_path(institution), lambda p: p.write_text(lines, encoding="utf-8"))

    def judge(self, institution: str, records: Sequence[LabelRecord]) -> dict | None:
        """Judge one closed window and record it everywhere; None for a window the history holds already
        (a crash came after its history line, before its records left the pending file)."""
        history = [h for h in self._followed_history() if h["institution"] == institution]
        fingerprint = group_fingerprint(records)
        if fingerprint in {h["fingerprint"] for h in history}:
            return None
        sequence = len(history) + 1
        stamps = sorted(r.timestamp for r in records if r.timestamp)
        result, snapshot = run_drift(self.reference, records, self.settings, institution)
        result = {
            "institution": institution,
            "window": f"{stamps[0]}/{stamps[-1]}" if stamps else "all",
            "sequence": sequence,
            "fingerprint": fingerprint,
        } | result
        write_result(result, snapshot, self._window_dir(institution, sequence))
        append_lines(self.output / HISTORY_FILE, [json.dumps({k: v for k, v in result.items() if k != "per_finding"})])
        if self.workspace is not None and snapshot is not None:
            add_to_workspace(self.workspace, institution, snapshot)
        self.metrics.judged.labels(institution, result["status"]).inc()
        self.metrics.show(institution, result, self.clock().timestamp())
        logger.info("%s window %d: %s (%d reports)", institution, sequence, result["status"], len(records))
        if self.webhook and result["drift_detected"]:
            failure = post_alert(self.webhook, alert_payload(result, institution=institution, window=result["window"]))
            if failure:
                logger.error("alert not delivered: %s", failure)
        return result

    def _followed_history(self) -> list[dict]:
        """The windows `--follow` judged (numbered); a one-shot `monitor`'s lines in the same file are not."""
        return [h for h in read_history(self.output / HISTORY_FILE) if "sequence" in h]

    def _restore_metrics(self) -> None:
        """After a restart, the alarms and scores of each institution's last judged window, from disk."""
        last: dict[str, dict] = {}
        for line in self._followed_history():
            last[line["institution"]] = line
        for institution, line in last.items():
            saved = self._window_dir(institution, line["sequence"]) / "drift.json"
            result = json.loads(saved.read_text()) if saved.is_file() else line
            judged_at = datetime.fromisoformat(line["checked_at"]).timestamp()
            self.metrics.show(institution, result, judged_at)

    def follow(self, interval_s: float, stop: threading.Event) -> Iterator[list[dict]]:
        """Poll every `interval_s` seconds until `stop` is set (between polls, never within one, so a
        SIGTERM from systemd or Kubernetes leaves no file half written); yields each round's verdicts."""
        while not stop.is_set():
            self.metrics.window.set(window_seconds(self.settings.window, self.clock()))  # months differ
            yield self.poll()
            stop.wait(interval_s)


def describe(result: dict[str, Any]) -> str:
    """One line per verdict for the console."""
    share = "" if result.get("share_drifted") is None else f", share {result['share_drifted']:.2f}"
    return (
        f"{result['institution']} window {result['sequence']} ({result['n_current']} reports): "
        f"{result['status']}{share}"
    )
