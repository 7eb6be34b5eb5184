"""`benchmarks/scale.py` at tiny sizes (issue 24): every stage runs on each size through the CLI, and the
table and JSON carry its figures and the fitted growth exponents."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "pseudo_label", "split", "augment", "evaluate"]


@pytest.mark.slow
def test_scale_benchmark_runs_every_stage_at_each_size_and_fits_exponents(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    args = ["--sizes", "40", "80", "--workers", "1", "--work-dir", str(tmp_path / "work"), "--json", str(out)]
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale.py"), *args], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "time ~ N^a" in result.stdout
    report = json.loads(out.read_text())
    assert [(run["stage"], run["size"]) for run in report["runs"]] == [(s, n) for n in (40, 80) for s in STAGES]
    assert all(run["wall_s"] > 0 and run["peak_rss_mb"] > 10 for run in report["runs"])
    assert set(report["exponents"]) == set(STAGES)
    assert all(isinstance(fit["time"], float) for fit in report["exponents"].values())
    ingested = (tmp_path / "work" / "n80" / "data" / "reports.jsonl").read_text().splitlines()
    assert 0 < len(ingested) <= 80


def test_growth_exponent_is_the_log_log_slope() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from scale import growth_exponent
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert growth_exponent([10, 100, 1000], [2, 20, 200]) == pytest.approx(1.0)
    assert growth_exponent([10, 100, 1000], [5, 5, 5]) == pytest.approx(0.0)
    assert growth_exponent([10], [1]) is None
