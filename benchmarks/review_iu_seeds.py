"""Many training seeds of the review benchmark side by side, on a machine with cores (and a GPU) to spare.

    python benchmarks/review_iu_seeds.py --seeds 20-59 [--budgets 100 200 400] --workers 16 --stop-after 480 \
        --out seeds.json [review_iu.py options: --params P --data D --epochs N ...]

Each seed's selected row (its no-review student, which ranks the pool, then the selected students at every
K) is one `review_iu.py` process, and each of its random students another (they need no ranker), each of one
torch thread, `--workers` at a time, in seed order. No job starts after `--stop-after` seconds, nor one that
the slowest finished job of its kind says would not end by then, nor any after it (seeds are run in order,
so that their rows pair up); at `--stop-after` the jobs still running are stopped, and the students they
finished are kept (review_iu.py rewrites its --json after each). Then every row goes to --out and the table,
the selected-minus-random pairs and a correction's worth are printed (`review_iu.py --combine`). The seeds
are fixed before any student is scored, and a seed cut short is reported with the students it has. Each
job's log (counts and scores, no report text) is in --work's logs/ folder; its students are deleted once it
ends (a student and its checkpoints take about 1 GB) unless --keep-students.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# One torch thread per job; no progress bars in the job logs (files).
JOB_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}


@dataclass
class Job:
    """One `review_iu.py` process: a seed's students of one strategy at these budgets."""

    seed: int
    strategy: str
    budgets: list[int]
    work: Path
    started: float = 0.0
    ended: float = 0.0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        if self.strategy == "selected":
            return f"selected-s{self.seed}"
        return f"{self.strategy}-{'-'.join(map(str, self.budgets))}-s{self.seed}"

    @property
    def rows_file(self) -> Path:
        return self.work / "rows" / f"{self.name}.json"

    @property
    def log_file(self) -> Path:
        return self.work / "logs" / f"{self.name}.log"

    @property
    def students(self) -> Path:
        return self.work / "students" / self.name

    def command(self, options: list[str]) -> list[str]:
        """The `review_iu.py` command line of this job, with the options every job shares."""
        command = [sys.executable, str(HERE / "review_iu.py"), "--train-seeds", str(self.seed)]
        command += ["--strategies", self.strategy, "--budgets", *map(str, self.budgets)]
        return [*command, "--json", str(self.rows_file), "--work", str(self.students), *options]

    def start(self, options: list[str]) -> None:
        """Start the job's process, its output to its log."""
        for folder in (self.rows_file.parent, self.log_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(options), stdout=log, stderr=subprocess.STDOUT, env=os.environ | JOB_ENV
            )
        self.started = time.monotonic()


def seed_list(text: str) -> list[int]:
    """``20-59`` or ``20,21,30``: the training seeds, in order."""
    try:
        if "-" in text:
            first, last = (int(part) for part in text.split("-", 1))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: seeds are FIRST-LAST or a comma-separated list") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r}: no seeds (FIRST is above LAST)")
    return seeds


def expected_seconds(kind: str, finished: list[Job]) -> float | None:
    """How long a job of this strategy may take: the slowest finished one of its kind (else of any kind)."""
    own = [job.ended - job.started for job in finished if job.strategy == kind]
    every = [job.ended - job.started for job in finished]
    return max(own or every) if every else None


def stop(jobs: list[Job], grace: float = 10.0) -> None:
    """End running jobs: SIGTERM to each, then SIGKILL to any still running ``grace`` seconds later."""
    processes = [job.process for job in jobs if job.process is not None]
    for process in processes:
        process.send_signal(signal.SIGTERM)
    until = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(0.0, until - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_jobs(queue: list[Job], options: list[str], workers: int, stop_after: float, keep: bool) -> list[Job]:
    """Run the queue ``workers`` at a time until it is empty or time is up; the jobs that ended by themselves."""
    began = time.monotonic()
    deadline = began + stop_after
    running: list[Job] = []
    finished: list[Job] = []
    while queue or running:
        now = time.monotonic()
        while queue and len(running) < workers:
            expected = expected_seconds(queue[0].strategy, finished)
            if now >= deadline or (expected is not None and now + expected > deadline):
                print(f"[{now - began:5.0f} s] not starting {len(queue)} more jobs: they would not end in time")
                queue.clear()
                break
            job = queue.pop(0)
            job.start(options)
            running.append(job)
            print(f"[{now - began:5.0f} s] started {job.name}", flush=True)
        for job in [j for j in running if j.process is not None and j.process.poll() is not None]:
            job.ended = time.monotonic()
            running.remove(job)
            finished.append(job)
            code = job.process.returncode if job.process else None
            print(f"[{job.ended - began:5.0f} s] {job.name} ended (exit {code}) after {job.ended - job.started:.0f} s")
            if not keep:
                shutil.rmtree(job.students, ignore_errors=True)
        if running and time.monotonic() >= deadline:
            print(f"[{time.monotonic() - began:5.0f} s] time is up: stopping {', '.join(j.name for j in running)}")
            stop(running)
            for job in running:
                if not keep:
                    shutil.rmtree(job.students, ignore_errors=True)
            running.clear()
        time.sleep(1)
    return finished


def merged_rows(jobs: list[Job]) -> tuple[float | None, list[dict[str, Any]]]:
    """Every job's rows, and the epochs their students trained."""
    epochs, rows = None, []
    for job in jobs:
        if job.rows_file.is_file():
            run = json.loads(job.rows_file.read_text())
            epochs = run["epochs"]
            rows += run["results"]
    return epochs, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=seed_list, required=True, help="training seeds: FIRST-LAST or a,b,c")
    parser.add_argument("--budgets", type=int, nargs="+", default=[100, 200, 400], help="the K of every row")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="jobs at a time (default: cores)")
    parser.add_argument("--stop-after", type=float, default=float("inf"), help="seconds; then running jobs stop")
    parser.add_argument("--out", type=Path, required=True, help="every row, as review_iu.py --json writes them")
    parser.add_argument("--work", type=Path, default=None, help="logs, rows and students (default: a temp folder)")
    parser.add_argument("--keep-students", action="store_true", help="keep each job's students")
    args, options = parser.parse_known_args()
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: at least 1")
    work = args.work or Path(tempfile.mkdtemp(prefix="review-iu-seeds-"))
    queue = [
        job
        for seed in args.seeds
        for job in [Job(seed, "selected", args.budgets, work), *(Job(seed, "random", [k], work) for k in args.budgets)]
    ]
    print(f"{len(queue)} jobs for {len(args.seeds)} seeds, {args.workers} at a time; logs in {work}/logs")
    every = list(queue)
    ended = run_jobs(queue, options, args.workers, args.stop_after, args.keep_students)
    failed = [job for job in ended if job.process is not None and job.process.returncode != 0]
    for job in failed:
        print(f"{job.name} failed; the end of {job.log_file}:\n" + job.log_file.read_text()[-2000:])
    epochs, rows = merged_rows(every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"epochs": epochs, "results": rows}, indent=2))
    print(f"wrote {len(rows)} students' rows to {args.out}", flush=True)
    if rows:
        subprocess.run([sys.executable, str(HERE / "review_iu.py"), "--combine", str(args.out)], check=False)
    sys.exit(1 if failed or not rows else 0)


if __name__ == "__main__":
    main()
