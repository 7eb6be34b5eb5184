"""`benchmarks/gpu_bench.py combine` (issue 24) when one side of `bench-train` failed: the side that ran keeps
its figures in gpu.json and the table, and the section still counts as an error (the first GPU run stopped
the plain Trainer's side at its time limit, and its DeepSpeed figures were lost)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_bench import combine, table  # noqa: E402


def test_one_side_of_bench_train_is_kept_when_the_other_timed_out(tmp_path: Path) -> None:
    steps = [("bench-train-deepspeed", 0, 33.0, 60), ("bench-train-plain", 124, 27.2, 27)]
    (tmp_path / "steps.tsv").write_text("".join(f"{n}\t{rc}\t{s}\t{limit}\n" for n, rc, s, limit in steps))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "bench-train-plain.log").write_text("loading\n  0%|          | 0/30\n")
    stage = {"reports_per_s": 239.7, "working_memory_mb": 8148.6, "precision": "bf16"}
    (tmp_path / "train_deepspeed.json").write_text(json.dumps({"train_stage": stage}))

    result = combine(tmp_path, dry_run=False, wall_s=180)

    training = result["training"]
    assert training["reports_per_s"] == {"deepspeed": 239.7} and "deepspeed_speedup" not in training
    assert training["missing"]["plain"].startswith("step bench-train-plain failed with exit code 124 (timed out)")
    assert result["errors"]["training"] == training["missing"]["plain"]
    rows = table(result)
    assert "239.7 reports/s (bf16), peak 8149 MB" in next(r for r in rows.splitlines() if "DeepSpeed ZeRO-2" in r)
    assert "plain Trainer" not in rows and "ZeRO-2 / plain" not in rows


def test_no_side_of_bench_train_leaves_the_section_an_error(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text("bench-train-deepspeed\t1\t3.0\t60\nbench-train-plain\t1\t2.0\t50\n")
    result = combine(tmp_path, dry_run=False, wall_s=10)
    assert set(result["training"]) == {"error"}
    assert result["training"]["error"].startswith("FileNotFoundError: no bench-train figures: step bench-train-")
