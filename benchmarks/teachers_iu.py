"""Presence F1 of the rule and keyword teachers against IU X-ray MeSH codes (../shared/data).

    python benchmarks/teachers_iu.py [--data PATH] [--json OUT]

Labels the IU dev reports (FINDINGS + IMPRESSION) with both teachers in one run and prints per-finding
presence precision/recall/F1 and the presence macro-F1, counting "present" as positive and, on a
second line, "present or uncertain". Prints counts and scores only, never report text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from deberta_rad.data import iu_report_text
from deberta_rad.evaluate import presence_metrics
from deberta_rad.gold import iu_presence_gold
from deberta_rad.schema import FINDINGS, Report
from deberta_rad.teachers import get_teacher

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "iu-xray" / "dev.jsonl"
TEACHERS = ("rules", "keyword")


def load_reports(path: Path, gold_ids: set[str]) -> tuple[list[Report], dict[str, int]]:
    """Coded IU records with text; counts say how many were skipped and why."""
    reports, counts = [], {"records": 0, "uncoded": 0, "empty_text": 0}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            counts["records"] += 1
            if record["report_id"] not in gold_ids:
                counts["uncoded"] += 1
                continue
            text = iu_report_text(record)
            if not text:
                counts["empty_text"] += 1
                continue
            reports.append(Report(report_id=record["report_id"], text=text))
    return reports, counts


def run_teacher(name: str, reports: list[Report]) -> tuple[dict[str, dict[str, str]], float]:
    """Predicted statuses by report id, and the labelling time in seconds."""
    teacher = get_teacher(name)
    start = time.perf_counter()
    records = teacher.label(reports)
    return {r.report_id: dict(r.labels) for r in records}, time.perf_counter() - start


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Per-finding P/R/F1 for each teacher side by side, then the macro lines."""
    header = f"{'finding':28s} {'gold':>5s}" + "".join(f" | {n + ' P':>9s} {'R':>5s} {'F1':>5s}" for n in results)
    lines = [header, "-" * len(header)]
    reference = next(iter(results.values()))["present"]
    first = reference["per_finding"]
    for finding in FINDINGS:
        row = f"{finding:28s} {first[finding]['support']:5d}"
        for scores in results.values():
            s = scores["present"]["per_finding"][finding]
            row += f" | {_fmt(s['precision']):>9s} {_fmt(s['recall']):>5s} {_fmt(s['f1']):>5s}"
        lines.append(row)
    lines.append("-" * len(header))
    for mode, label in (("present", "macro F1 (present)"), ("present_or_uncertain", "macro F1 (pres.+unc.)")):
        row = f"{label:34s}"
        for scores in results.values():
            row += f" | {'':>9s} {'':>5s} {_fmt(scores[mode]['macro_f1']):>5s}"
        lines.append(row)
    left_out = reference["findings_left_out"]
    lines.append(f"findings left out of the macro (no gold positives): {len(left_out)} {left_out}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IU X-ray dev.jsonl")
    parser.add_argument("--json", type=Path, default=None, help="write the scores as JSON here")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"IU data not found at {args.data} (expected ../shared/data beside the repo)")

    gold = iu_presence_gold(args.data)
    reports, counts = load_reports(args.data, set(gold))
    gold = {r.report_id: gold[r.report_id] for r in reports}
    print(
        f"IU dev: {counts['records']} records, {counts['uncoded']} skipped as uncoded ('No Indexing'), "
        f"{counts['empty_text']} skipped with empty findings and impression, {len(reports)} scored"
    )
    results: dict[str, dict[str, Any]] = {}
    for name in TEACHERS:
        predictions, seconds = run_teacher(name, reports)
        results[name] = {
            "seconds": round(seconds, 3),
            "present": presence_metrics(predictions, gold),
            "present_or_uncertain": presence_metrics(predictions, gold, count_uncertain=True),
        }
        print(f"{name}: labelled {len(reports)} reports in {seconds:.2f} s")
    print(format_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"counts": counts, "n_scored": len(reports), "teachers": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
