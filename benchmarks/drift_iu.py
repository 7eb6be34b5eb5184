"""Drift on real report sources: IU X-ray as the reference, a held-back part of IU and the MIMIC-style
radlabels reports as current windows, all labelled by the same model, in one run.

    python benchmarks/drift_iu.py --model models/student [--json OUT] [--html-dir DIR]

IU dev is split by text into a reference part and a held-back part (`--held-back` share, seeded, so
identical texts stay on one side). Each current window is judged with `deberta-rad drift`'s test
(params.yaml `monitoring`) and, as the baseline, with per-finding chi-square p < 0.05 alone, the
rule of Evidently's default drift preset (the p-value here is the monitor's two-sample one); the
baseline's alarm rule is "at least half of the findings drift". Prints counts and scores only, never report text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from teachers_iu import DEFAULT_DATA

from deberta_rad.data import read_reports, split_of, text_hash
from deberta_rad.monitor import run_drift, write_result
from deberta_rad.params import Fractions, load_params
from deberta_rad.predict import predict_reports
from deberta_rad.schema import FINDINGS

RADLABELS = DEFAULT_DATA.parents[1] / "radlabels-synthetic" / "reports.jsonl"


def naive_verdict(result: dict) -> tuple[int, bool]:
    """Findings with chi-square p < 0.05, and whether at least half of them drift."""
    drifted = sum(1 for scores in result["per_finding"].values() if scores["chi_square_p_value"] < 0.05)
    return drifted, drifted >= len(FINDINGS) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/student", help="model directory or MLflow model URI")
    parser.add_argument("--iu", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--radlabels", type=Path, default=RADLABELS)
    parser.add_argument("--held-back", type=float, default=0.2, help="share of IU dev held back as a current window")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--html-dir", type=Path, default=None, help="write each window's drift.json and report.html")
    args = parser.parse_args()
    for path in (args.iu, args.radlabels):
        if not path.is_file():
            raise SystemExit(f"{path} is absent (../shared is not beside the repo)")

    settings = load_params("params.yaml").monitoring
    iu = read_reports(args.iu)
    fractions = Fractions(train=1 - args.held_back, val=0.0, test=args.held_back)
    side = {r.report_id: split_of(f"text:{text_hash(r.text)}", args.seed, fractions) for r in iu}
    reference_reports = [r for r in iu if side[r.report_id] == "train"]
    held_back_reports = [r for r in iu if side[r.report_id] == "test"]
    reference, speed = predict_reports(args.model, reference_reports)
    windows = {
        "IU held back": predict_reports(args.model, held_back_reports)[0],
        "radlabels (MIMIC style)": predict_reports(args.model, read_reports(args.radlabels))[0],
    }
    print(f"\nreference: {len(reference)} IU dev reports labelled by {args.model} ({speed:.0f} reports/s)")
    print(
        f"{'current window':<26}{'reports':>8}{'drifted':>9}{'share':>7}{'confidence':>15}  {'verdict':<10}"
        f"{'baseline chi2 p<0.05':>22}"
    )
    results = {}
    for name, current in windows.items():
        result, snapshot = run_drift(reference, current, settings)
        naive_count, naive_alarm = naive_verdict(result)
        results[name] = result | {"baseline": {"findings_p_below_0_05": naive_count, "alarm": naive_alarm}}
        confidence = result["confidence"] or {}
        moved = f"{confidence.get('reference_mean', 0):.3f}->{confidence.get('current_mean', 0):.3f}"
        print(
            f"{name:<26}{len(current):>8}{len(result['drifted_findings']):>9}{result['share_drifted']:>7.2f}"
            f"{moved:>15}  {'ALARM' if result['drift_detected'] else 'quiet':<10}"
            f"{naive_count:>12} of 13 {'ALARM' if naive_alarm else 'quiet'}"
        )
        if args.html_dir:
            write_result(result, snapshot, args.html_dir / name.split()[0].lower())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
