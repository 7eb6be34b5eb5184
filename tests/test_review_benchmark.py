"""`benchmarks/review_iu.py --combine` (issue 23): the table of several runs' --json files, selected minus
random per K over the seeds, and what one corrected report is worth against the seed's no-review student."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def row(strategy: str, k: int, seed: int, corrected: int, f1: float, errors: int) -> dict:
    return {
        "strategy": strategy,
        "k": k,
        "seed": seed,
        "corrected_reports": corrected,
        "corrected_cells": corrected,
        "f1": f1,
        "errors": errors,
    }


def combine(*paths: Path) -> subprocess.CompletedProcess:
    script = REPO / "benchmarks" / "review_iu.py"
    return subprocess.run(
        [sys.executable, str(script), "--combine", *map(str, paths)], capture_output=True, text=True, timeout=300
    )


def test_combine_pairs_the_seeds_and_prices_a_correction(tmp_path: Path) -> None:
    selected, chance = tmp_path / "selected.json", tmp_path / "random.json"
    variant = ", confirmed repeated"
    selected.write_text(
        json.dumps(
            {
                "results": [
                    row("no review", 0, 1, 0, 0.80, 100),
                    row("selected" + variant, 10, 1, 4, 0.84, 92),
                    row("no review", 0, 2, 0, 0.82, 90),
                    row("selected" + variant, 10, 2, 2, 0.83, 88),
                ]
            }
        )
    )
    chance.write_text(
        json.dumps(
            {"results": [row("random" + variant, 10, 1, 0, 0.80, 100), row("random" + variant, 10, 2, 1, 0.825, 89)]}
        )
    )
    result = combine(selected, chance)
    assert result.returncode == 0, result.stderr
    assert "| no review | 0 | 2 | 0 | 0 | 0.810 (0.800-0.820) | 95.0 |" in result.stdout
    # gaps 0.04 and 0.005: their standard deviation 0.0247 over the root of 2 (0.017499... in floating point)
    pairs = (
        f"selected{variant}, K = 10: minus random +0.022 on average over 2 seeds (standard error 0.017), ahead under 2"
    )
    pairs += "; errors -4.5, fewer under 2 of 2"  # selected's errors minus random's: 92 - 100, 88 - 89
    assert pairs in result.stdout
    # gains 0.04, 0, 0.01, 0.005 over 4, 0, 2, 1 corrections; errors -8, 0, -2, -1
    slope = "per corrected report, over 4 reviewed students: F1 +0.0101 (standard error 0.0020, r = 0.96), errors -2.03"
    assert slope in result.stdout


def test_combine_names_a_file_that_is_not_a_run_and_a_row_without_its_figures(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text("[1, 2]")
    result = combine(other)
    assert result.returncode == 1 and f"--combine: {other} is not a --json file of this benchmark" in result.stderr
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"results": [row("no review", 0, 1, 0, 0.8, 90), {"strategy": "random", "k": 10}]}))
    result = combine(partial)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "row 2 lacks corrected_cells, corrected_reports, f1, seed" in result.stderr


def test_combine_leaves_out_a_fit_the_rows_cannot_make(tmp_path: Path) -> None:
    """Equal gains have no correlation, and errors counted at one correction count only have no slope."""
    run = tmp_path / "run.json"
    rows = [row("no review", 0, seed, 0, 0.80, 100) for seed in (1, 2, 3, 4)]
    rows += [row("selected", 10, seed, 4, 0.80, 99) for seed in (1, 2, 3)]
    rows.append({key: value for key, value in row("selected", 10, 4, 2, 0.80, 99).items() if key != "errors"})
    run.write_text(json.dumps({"results": rows}))
    result = combine(run)
    assert result.returncode == 0, result.stderr
    assert (
        "per corrected report, over 4 reviewed students: F1 +0.0000 (standard error n/a, r = n/a) (against"
        in result.stdout
    )
    assert "errors" not in result.stdout.splitlines()[-1]
