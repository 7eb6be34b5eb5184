"""`benchmarks/review_iu_seeds.py` (issue 23): the seeds it reads, how it schedules `review_iu.py` jobs against its
time limit (here with jobs that only sleep: a real student takes minutes), and how it merges their rows."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from review_iu_seeds import Job, merged_rows, run_jobs, seed_list  # noqa: E402


class SleepingJob(Job):
    """A job whose process sleeps instead of training students."""

    seconds: float = 0.0

    def command(self, options: list[str]) -> list[str]:
        return [sys.executable, "-c", f"import time; time.sleep({self.seconds})"]


def sleeping(seed: int, strategy: str, seconds: float, work: Path) -> SleepingJob:
    job = SleepingJob(seed, strategy, [10], work)
    job.seconds = seconds
    return job


def test_seeds_are_a_range_or_a_list_and_anything_else_is_named() -> None:
    assert seed_list("20-23") == [20, 21, 22, 23]
    assert seed_list("5,9") == [5, 9]
    with pytest.raises(argparse.ArgumentTypeError, match="'twenty': seeds are FIRST-LAST"):
        seed_list("twenty")
    with pytest.raises(argparse.ArgumentTypeError, match="'30-20': no seeds"):
        seed_list("30-20")


def test_time_up_stops_the_running_job_and_starts_none_that_would_overrun(tmp_path: Path) -> None:
    quick, slow = sleeping(1, "random", 0.5, tmp_path), sleeping(1, "selected", 60, tmp_path)
    after = sleeping(2, "random", 0.5, tmp_path)
    finished = run_jobs([quick, slow, after], [], workers=2, stop_after=4, keep=False)
    assert finished == [quick, after]
    assert slow.process is not None and slow.process.returncode == -signal.SIGTERM  # stopped, not left to sleep

    first, second = sleeping(3, "random", 2, tmp_path), sleeping(4, "random", 2, tmp_path)
    assert run_jobs([first, second], [], workers=1, stop_after=3, keep=False) == [first]
    assert second.process is None  # 2 s more would pass the limit, so it never started


def test_rows_of_every_job_are_merged_and_a_job_that_wrote_none_is_skipped(tmp_path: Path) -> None:
    done, cut = Job(20, "selected", [100], tmp_path), Job(20, "random", [100], tmp_path)
    done.rows_file.parent.mkdir(parents=True)
    done.rows_file.write_text(json.dumps({"epochs": 4, "results": [{"strategy": "no review", "seed": 20}]}))
    assert merged_rows([done, cut]) == (4, [{"strategy": "no review", "seed": 20}])
    assert cut.name == "random-100-s20" and done.name == "selected-s20"


def test_a_worker_count_below_one_is_refused() -> None:
    script = REPO / "benchmarks" / "review_iu_seeds.py"
    result = subprocess.run(
        [sys.executable, str(script), "--seeds", "1", "--workers", "0", "--out", "x.json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "--workers 0: at least 1" in result.stderr
