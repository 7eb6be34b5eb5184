"""The rule teacher's quality on real reports it was not tuned on, through the benchmark's own command.

A guard, not a target: it fails when a vocabulary change loses the locked half of IU dev. Read the
development half's errors to find out why (benchmarks/teachers_iu.py prints scores only); never tune a
pattern on a locked-half miss (DESIGN.md section 6).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import IU_DEV, RADLABELS, REPO, needs_shared

from deberta_rad.schema import FINDINGS


@needs_shared(IU_DEV)
@needs_shared(RADLABELS)
def test_teachers_iu_benchmark_holds_on_the_locked_half(tmp_path: Path) -> None:
    out = tmp_path / "teachers.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "teachers_iu.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "locked" in result.stdout and "in-sample" in result.stdout
    scores = json.loads(out.read_text())
    rules, keyword = scores["iu"]["rules"], scores["iu"]["keyword"]
    locked = rules["locked"]["present"]
    development = rules["development"]["present"]
    assert (rules["locked"]["n_reports"], rules["development"]["n_reports"]) == (942, 888)
    assert locked["macro_f1"] >= 0.85
    assert abs(development["macro_f1"] - locked["macro_f1"]) <= 0.03
    weak = {f: s["f1"] for f, s in locked["per_finding"].items() if f != "No Finding" and s["f1"] < 0.70}
    assert weak == {}
    assert locked["macro_f1"] > keyword["locked"]["present"]["macro_f1"] + 0.05
    peer = scores["radlabels"]["rules"]["agreement"]
    assert set(peer["per_finding"]) == set(FINDINGS) and peer["n_reports"] == 1000
