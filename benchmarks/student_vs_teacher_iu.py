"""IU X-ray presence F1 of a trained student and of the teacher it learned from, on the same reports.

    python benchmarks/student_vs_teacher_iu.py --model models/student --split-dir data/splits/test \
        [--data ../shared/data/iu-xray/dev.jsonl] [--json OUT]

Scores the IU reports of a split (the ones with MeSH codes) in one run: the student's predictions and
the teacher labels stored in the split, against the human MeSH codes (DESIGN.md section 6). Prints
counts and scores only, never report text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from teachers_iu import DEFAULT_DATA

from deberta_rad.data import labels_by_id, read_label_records, read_reports
from deberta_rad.gold import iu_presence_gold
from deberta_rad.metrics import presence_metrics
from deberta_rad.predict import predict_reports
from deberta_rad.schema import FINDINGS


def scores(predictions: dict[str, dict[str, str]], gold: dict[str, dict[str, bool]]) -> dict[str, Any]:
    return {
        "present": presence_metrics(predictions, gold),
        "present_or_uncertain": presence_metrics(predictions, gold, count_uncertain=True),
    }


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Per-finding presence F1 (gold positives in brackets) of each labeler, then the macro lines."""
    names = list(results)
    first = results[names[0]]["present"]["per_finding"]
    lines = [f"{'finding':34s}" + "".join(f" {name[:12]:>12s}" for name in names)]
    for finding in FINDINGS:
        cells = "".join(f" {_fmt(r['present']['per_finding'][finding]['f1']):>12s}" for r in results.values())
        lines.append(f"{finding + ' (' + str(first[finding]['support']) + ')':34s}{cells}")
    for mode, title in (("present", "macro F1 (present)"), ("present_or_uncertain", "macro F1 (pres.+unc.)")):
        lines.append(f"{title:34s}" + "".join(f" {_fmt(r[mode]['macro_f1']):>12s}" for r in results.values()))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/student", help="model directory or MLflow model URI")
    parser.add_argument("--split-dir", type=Path, default=Path("data/splits/test"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IU X-ray dev.jsonl (MeSH codes)")
    parser.add_argument("--json", type=Path, default=None, help="write the scores as JSON here")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"IU data not found at {args.data} (expected ../shared/data beside the repo)")

    all_gold = iu_presence_gold(args.data)
    reports = [r for r in read_reports(args.split_dir / "reports.jsonl") if r.report_id in all_gold]
    if not reports:
        raise SystemExit(f"{args.split_dir} holds no coded IU report: ingest IU dev to score on it")
    gold = {r.report_id: all_gold[r.report_id] for r in reports}
    teacher_records = read_label_records(args.split_dir / "labels.jsonl")
    teacher = {rid: labels for rid, labels in labels_by_id(teacher_records).items() if rid in gold}
    student_records, speed = predict_reports(args.model, reports)
    teacher_name = teacher_records[0].teacher.name if teacher_records[0].teacher else "teacher"
    results = {"student": scores(labels_by_id(student_records), gold), teacher_name: scores(teacher, gold)}
    print(f"{args.split_dir}: {len(reports)} coded IU reports; student labelled them at {speed:.1f} reports/s")
    print(format_table(results))
    student_f1, teacher_f1 = (r["present"]["macro_f1"] for r in results.values())
    print(f"student - {teacher_name} presence macro F1: {student_f1 - teacher_f1:+.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n_scored": len(reports), "labelers": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
