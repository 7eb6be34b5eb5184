"""`deberta-rad relabel-on-alert`: the Alertmanager webhook receiver that starts the relabeling loop for a
drifted institution (monitoring/alertmanager.yml routes `kind="label_drift"` here).

A firing alert group queues one job per institution and drift episode: the episode is the group key
and the alerts' start time, so Alertmanager's repeats (repeat_interval) and retries of the same group
queue nothing new while its job is queued, running or done; one that failed, or found none of the
institution's reports in the feed yet, is queued again. A job takes the institution's reports from the
feed (params `relabel.feed`; the service keeps no text, so the texts come from the hospital's own
export) at the moment it is queued, and a single worker runs the jobs in order: the reports become the
loop's input (`relabel.incoming`) and `dvc repro pipelines/relabel/dvc.yaml` predicts them, judges
drift and sends the budgeted sample to the teacher. `monitoring/relabel/jobs.jsonl` records each job's
states (append-only, ids and counts, never text); jobs queued or running when the receiver stopped run
again when it starts (the relabel step itself resumes without repeating a report). A job's copy of its
reports is deleted when it ends.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from deberta_rad.data import InputError, read_reports, write_jsonl
from deberta_rad.monitor import append_lines, read_json_lines
from deberta_rad.params import load_params
from deberta_rad.settings import venv_command

logger = logging.getLogger(__name__)

JOBS_DIR = Path("monitoring/relabel")
LOOP = "pipelines/relabel/dvc.yaml"
OPEN_STATES = ("queued", "running")
HANDLED_STATES = (*OPEN_STATES, "done")  # an episode in any other state is queued again
MAX_BODY = 10_000_000  # bytes; Alertmanager's payloads are a few kB per alert


class PayloadError(ValueError):
    """A request that is not an Alertmanager webhook payload; the message says what is wrong."""


def drifted_institutions(payload: object) -> dict[str, str]:
    """institution -> the drift episode's start (the earliest `startsAt`) of the payload's firing alerts.
    Resolved notifications and alerts without an institution label start nothing."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise PayloadError("not an Alertmanager webhook payload: no 'alerts' list")
    if "groupKey" not in payload:
        raise PayloadError("not an Alertmanager webhook payload: no 'groupKey'")
    episodes: dict[str, str] = {}
    for number, alert in enumerate(payload["alerts"]):
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise PayloadError(f"alerts[{number}]: no 'labels' object")
        institution = alert["labels"].get("institution")
        if alert.get("status") != "firing" or not institution:
            continue
        started = str(alert.get("startsAt", ""))
        episodes[institution] = min(episodes.get(institution, started), started)
    return episodes


def job_id(group_key: str, institution: str, started: str) -> str:
    """The same for every notification of one drift episode of one institution."""
    return hashlib.sha256(f"{group_key}\n{institution}\n{started}".encode()).hexdigest()[:12]


@dataclass
class RelabelQueue:
    """The jobs file and the worker that runs the loop for one job at a time, in a project checkout."""

    project: Path
    feed: Path
    incoming: Path
    command: Sequence[str] = field(default_factory=lambda: [venv_command("dvc"), "repro", LOOP])
    _lock: threading.RLock = field(default_factory=threading.RLock)  # the HTTP threads and the worker
    _todo: queue.Queue[str] = field(default_factory=queue.Queue)

    @property
    def folder(self) -> Path:
        return self.project / JOBS_DIR

    def jobs(self) -> dict[str, dict]:
        """Each job's latest state."""
        latest: dict[str, dict] = {}
        for entry in read_json_lines(self.folder / "jobs.jsonl"):
            latest[entry["job"]] = latest.get(entry["job"], {}) | entry
        return latest

    def _record(self, job: str, **state: object) -> dict:
        """Append a job's new state (one line, under the lock the HTTP threads and the worker share)."""
        entry = {"job": job, **state, "at": datetime.now(UTC).isoformat(timespec="milliseconds")}
        with self._lock:
            append_lines(self.folder / "jobs.jsonl", [json.dumps(entry)])
        return entry

    def take(self, payload: object) -> dict[str, list[dict]]:
        """Queue a job per new drift episode in the payload; says what was queued and what was not."""
        episodes = drifted_institutions(payload)
        group_key = str(payload["groupKey"])  # type: ignore[index]  # checked by drifted_institutions
        answer: dict[str, list[dict]] = {"queued": [], "already": [], "nothing": []}
        with self._lock:
            known = self.jobs()
            for institution, started in sorted(episodes.items()):
                job = job_id(group_key, institution, started)
                if job in known and known[job]["state"] in HANDLED_STATES:
                    answer["already"].append({"job": job, "institution": institution, "state": known[job]["state"]})
                    continue
                entry = self._queue(job, institution, started, group_key)
                answer["queued" if entry["state"] == "queued" else "nothing"].append(entry)
        return answer

    def _queue(self, job: str, institution: str, started: str, group_key: str) -> dict:
        """Freeze the institution's reports in the feed as the job's input, then queue it."""
        reports = [r for r in read_reports(self.feed) if r.institution == institution]
        details = {"institution": institution, "episode_start": started, "group_key": group_key}
        if not reports:
            logger.warning("drift on %s, but %s holds none of its reports: nothing queued", institution, self.feed)
            return self._record(job, state="no reports in the feed", reports=0, **details)
        write_jsonl(self.folder / f"{job}.jsonl", reports)
        entry = self._record(job, state="queued", reports=len(reports), **details)
        logger.info("queued relabeling of %d reports of %s (job %s)", len(reports), institution, job)
        self._todo.put(job)
        return entry

    def resume(self) -> list[str]:
        """Queue again the jobs a stop interrupted."""
        open_jobs = [job for job, entry in self.jobs().items() if entry["state"] in OPEN_STATES]
        for job in open_jobs:
            self._todo.put(job)
        return open_jobs

    def work(self) -> None:
        """Run queued jobs one at a time, for ever (a daemon thread)."""
        while True:
            self.run_safely(self._todo.get())

    def run_safely(self, job: str) -> None:
        """Run a job; one that raises is recorded as failed, and the worker goes on to the next."""
        try:
            self.run(job)
        except Exception as error:  # whatever went wrong, the next job must still run
            logger.exception("relabeling job %s failed", job)
            self._record(job, state=f"failed ({type(error).__name__}: {error})")

    def run(self, job: str) -> dict:
        """The loop for one job: its reports become `relabel.incoming`, then `dvc repro` of the loop."""
        self._record(job, state="running")
        reports, log = self.folder / f"{job}.jsonl", self.folder / f"{job}.log"
        try:
            shutil.copyfile(reports, self.incoming)
            with log.open("ab") as out:
                code = subprocess.call(list(self.command), cwd=self.project, stdout=out, stderr=subprocess.STDOUT)
        finally:
            reports.unlink()  # report text: the loop's input and the relabeled store keep what they need
        summary_path = self.project / "monitoring/loop/relabel.json"
        summary = json.loads(summary_path.read_text()) if code == 0 and summary_path.is_file() else None
        state = "done" if code == 0 else f"failed (exit {code}, see {log})"
        logger.info("relabeling job %s: %s", job, state)
        return self._record(job, state=state, summary=summary)


def handler_for(jobs: RelabelQueue) -> type[BaseHTTPRequestHandler]:
    class AlertHandler(BaseHTTPRequestHandler):
        """POST /alerts (Alertmanager's webhook), GET /jobs (the jobs' states), GET /healthz."""

        def do_POST(self) -> None:
            if self.path != "/alerts":
                self._answer(404, {"error": f"no route {self.path}: Alertmanager posts to /alerts"})
                return
            try:
                payload = json.loads(self.rfile.read(self._length()))
            except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError, as is a bad length
                self._answer(400, {"error": "the body is not JSON with a valid Content-Length"})
                return
            try:
                answer = jobs.take(payload)
            except PayloadError as error:
                self._answer(400, {"error": str(error)})
            except InputError as error:  # the feed cannot be read: 500, so Alertmanager retries
                logger.error("%s", error)
                self._answer(500, {"error": str(error)})
            else:
                self._answer(200, answer)

        def _length(self) -> int:
            length = int(self.headers.get("Content-Length") or "")
            if not 0 < length <= MAX_BODY:
                raise ValueError(f"Content-Length {length}")
            return length

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._answer(200, {"status": "ok"})
            elif self.path == "/jobs":
                self._answer(200, {"jobs": list(jobs.jobs().values())})
            else:
                self._answer(404, {"error": f"no route {self.path}"})

        def _answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            """Requests to the debug log, not stderr (http.server's default)."""
            logger.debug("%s %s", self.address_string(), format % args)

    return AlertHandler


def relabel_queue(project: Path, feed: Path | None = None) -> RelabelQueue:
    """The queue for a project checkout, with the feed and the loop's input from its params.yaml."""
    settings = load_params(project / "params.yaml").relabel
    return RelabelQueue(project=project, feed=feed or project / settings.feed, incoming=project / settings.incoming)


def serve(jobs: RelabelQueue, host: str, port: int) -> ThreadingHTTPServer:
    """Start the worker (with the interrupted jobs first) and return the HTTP server, not yet serving."""
    resumed = jobs.resume()
    if resumed:
        logger.warning("resuming %d interrupted relabeling jobs: %s", len(resumed), ", ".join(resumed))
    threading.Thread(target=jobs.work, name="relabel-worker", daemon=True).start()
    jobs.incoming.parent.mkdir(parents=True, exist_ok=True)
    return ThreadingHTTPServer((host, port), handler_for(jobs))
