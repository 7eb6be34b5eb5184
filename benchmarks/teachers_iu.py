"""Rule teacher vs keyword baseline: IU X-ray presence F1 on both halves, and agreement with radlabels.

    python benchmarks/teachers_iu.py [--data IU_JSONL] [--radlabels RADLABELS_JSONL] [--json OUT]
        [--student MODEL ...]

`--student` (a model directory or MLflow URI, repeatable) puts trained students in the IU table beside
the teachers: train one with only the development half in ingest.sources (README "Evaluation") and its
locked-half figure is the student's out-of-sample quality, measured in the same run as its teacher's.

IU dev is cut into the development and locked halves of DESIGN.md section 6. The rule vocabulary was
read against the development half, so its figures there are in-sample; the locked half is only scored,
and its figure is the one to quote. "locked, new texts" leaves out locked reports whose text also occurs
in the development half (IU repeats its normal reports word for word). Presence counts "present" as
positive (and, on a second line, "present or uncertain") against the MeSH codes.

The radlabels synthetic MIMIC-style reports carry another labeler's output (RadGraph-XL + aliases): a
peer, not gold, with its own conventions (a hedged finding is "definitely present" there, and a
consolidation is also an air space opacity). Agreement and kappa per finding show where the two differ.

Prints counts and scores only, never report text.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from deberta_rad.data import iu_report_text, json_lines, read_jsonl_reports
from deberta_rad.gold import PresenceGold, iu_half, iu_presence_gold, read_radlabels_jsonl
from deberta_rad.metrics import compute_metrics, presence_metrics
from deberta_rad.predict import load_engine
from deberta_rad.registry import resolve_model
from deberta_rad.schema import FINDINGS, LabelRecord, Report
from deberta_rad.teachers import Teacher, get_teacher
from deberta_rad.teachers.agreement import teacher_agreement

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = SHARED / "iu-xray" / "dev.jsonl"
DEFAULT_RADLABELS = SHARED / "radlabels-synthetic" / "reports.jsonl"
TEACHERS = ("rules", "keyword")
SUBSETS = ("development", "locked", "locked, new texts")

Predictions = dict[str, dict[str, str]]


def iu_subsets(path: Path, gold: PresenceGold) -> tuple[dict[str, list[Report]], dict[str, int]]:
    """Coded IU reports by subset; counts say how many records were skipped and why."""
    subsets: dict[str, list[Report]] = {name: [] for name in SUBSETS}
    counts = {"records": 0, "uncoded": 0, "empty_text": 0}
    for _, record in json_lines(path):
        counts["records"] += 1
        if record["report_id"] not in gold:
            counts["uncoded"] += 1
            continue
        text = iu_report_text(record)
        if not text:
            counts["empty_text"] += 1
            continue
        subsets[iu_half(record["report_id"])].append(Report(report_id=record["report_id"], text=text))
    development_texts = {report.text for report in subsets["development"]}
    subsets["locked, new texts"] = [r for r in subsets["locked"] if r.text not in development_texts]
    return subsets, counts


class StudentLabeler:
    """A trained student behind the teachers' `label` call, so it is scored exactly like them."""

    def __init__(self, model_ref: str) -> None:
        model_dir, self.model_name = resolve_model(model_ref)
        self.engine = load_engine(model_dir)

    def label(self, reports: list[Report]) -> list[LabelRecord]:
        return self.engine.label(reports, model_name=self.model_name)


def student_labelers(model_refs: list[str]) -> dict[str, StudentLabeler]:
    """`student` for one model; `student:<folder>` for each of several."""
    if len(model_refs) == 1:
        return {"student": StudentLabeler(model_refs[0])}
    return {f"student:{Path(ref).name}": StudentLabeler(ref) for ref in model_refs}


def label(teacher: Teacher, reports: list[Report]) -> tuple[Predictions, float]:
    """Statuses by report id, and the labelling time in seconds."""
    start = time.perf_counter()
    records = teacher.label(reports)
    return {r.report_id: dict(r.labels) for r in records}, time.perf_counter() - start


def iu_scores(
    teachers: dict[str, Teacher], subsets: dict[str, list[Report]], gold: PresenceGold
) -> dict[str, dict[str, Any]]:
    """Per teacher and subset: presence metrics counting present, and present or uncertain."""
    results: dict[str, dict[str, Any]] = {}
    for name, teacher in teachers.items():
        results[name] = {}
        for subset, reports in subsets.items():
            predictions, seconds = label(teacher, reports)
            subset_gold = {r.report_id: gold[r.report_id] for r in reports}
            results[name][subset] = {
                "n_reports": len(reports),
                "seconds": round(seconds, 3),
                "present": presence_metrics(predictions, subset_gold),
                "present_or_uncertain": presence_metrics(predictions, subset_gold, count_uncertain=True),
            }
    return results


def radlabels_scores(teachers: dict[str, Teacher], path: Path) -> dict[str, dict[str, Any]]:
    """Per teacher: agreement and kappa with the peer labels, and the section-5 metrics against them."""
    peer = read_radlabels_jsonl(path)
    reports = read_jsonl_reports(path)
    results = {}
    for name, teacher in teachers.items():
        predictions, _ = label(teacher, reports)
        results[name] = {
            "agreement": teacher_agreement(predictions, peer),
            "metrics": compute_metrics(predictions, peer),
        }
    return results


def format_iu_table(results: dict[str, dict[str, Any]]) -> str:
    """Per-finding presence F1 per labeler and subset, then the macro lines."""
    names = list(results)
    columns = [(name, subset) for name in names for subset in SUBSETS]
    short = {"development": "dev*", "locked": "locked", "locked, new texts": "new"}
    head1 = f"{'':28s} {'gold +':>14s}" + "".join(f" | {name[:20]:^20s}" for name in names)
    head2 = f"{'finding':28s} {'dev/locked':>14s}" + "".join(
        " | " + " ".join(f"{short[s]:>6s}" for s in SUBSETS) for _ in names
    )
    lines = [head1, head2, "-" * len(head2)]
    first = results[names[0]]
    for finding in FINDINGS:
        supports = "/".join(str(first[s]["present"]["per_finding"][finding]["support"]) for s in SUBSETS[:2])
        cells = [_fmt(results[n][s]["present"]["per_finding"][finding]["f1"]) for n, s in columns]
        lines.append(f"{finding:28s} {supports:>14s}" + _grouped(cells))
    lines.append("-" * len(head2))
    for mode, title in (("present", "macro F1 (present)"), ("present_or_uncertain", "macro F1 (pres.+unc.)")):
        cells = [_fmt(results[n][s][mode]["macro_f1"]) for n, s in columns]
        lines.append(f"{title:43s}" + _grouped(cells))
    counts = " / ".join(f"{s} {first[s]['n_reports']}" for s in SUBSETS)
    lines.append(f"reports: {counts}")
    lines.append(
        "* in-sample: the rule vocabulary's errors were read on the development half (and a student trained on it "
        "learnt from it); quote the locked half"
    )
    return "\n".join(lines)


def format_radlabels_table(results: dict[str, dict[str, Any]]) -> str:
    """Per-finding agreement, kappa and F1 against the peer labels, with the commonest disagreement."""
    head = f"{'finding':28s}" + "".join(f" | {name + ' agree':>13s} {'kappa':>6s} {'F1':>6s}" for name in TEACHERS)
    lines = [head + " | rules vs peer, commonest difference", "-" * (len(head) + 36)]
    for finding in FINDINGS:
        row = f"{finding:28s}"
        for name in TEACHERS:
            tab = results[name]["agreement"]["per_finding"][finding]
            f1 = results[name]["metrics"]["per_finding"][finding]["f1"]
            row += f" | {tab['agreement']:13.3f} {_fmt(tab['kappa']):>6s} {_fmt(f1):>6s}"
        common = results[TEACHERS[0]]["agreement"]["per_finding"][finding]["most_common_disagreement"]
        row += " | " + (f"{common['a']} vs {common['b']} ({common['count']})" if common else "none")
        lines.append(row)
    lines.append("-" * (len(head) + 36))
    overall = f"{'all cells':28s}"
    for name in TEACHERS:
        agreement = results[name]["agreement"]
        overall += f" | {agreement['agreement']:13.3f} {_fmt(agreement['kappa']):>6s} "
        overall += f"{_fmt(results[name]['metrics']['macro_f1']):>6s}"
    lines.append(overall + " | (F1 column: macro F1)")
    return "\n".join(lines)


def _grouped(cells: list[str]) -> str:
    size = len(SUBSETS)
    return "".join(" | " + " ".join(f"{c:>6s}" for c in cells[i : i + size]) for i in range(0, len(cells), size))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="IU X-ray dev.jsonl")
    parser.add_argument("--radlabels", type=Path, default=DEFAULT_RADLABELS, help="radlabels reports.jsonl")
    parser.add_argument("--json", type=Path, default=None, help="write the scores as JSON here")
    parser.add_argument("--student", action="append", default=[], help="a trained student to score too (repeatable)")
    args = parser.parse_args()
    for path in (args.data, args.radlabels):
        if not path.is_file():
            raise SystemExit(f"{path} not found (expected ../shared/data beside the repo)")

    gold = iu_presence_gold(args.data)
    subsets, counts = iu_subsets(args.data, gold)
    print(
        f"IU dev: {counts['records']} records, {counts['uncoded']} skipped as uncoded ('No Indexing'), "
        f"{counts['empty_text']} skipped with empty findings and impression"
    )
    teachers = {name: get_teacher(name) for name in TEACHERS}  # each vocabulary compiled once
    iu = iu_scores({**teachers, **student_labelers(args.student)}, subsets, gold)
    print("\nPresence F1 against the IU MeSH codes")
    print(format_iu_table(iu))
    radlabels = radlabels_scores(teachers, args.radlabels)
    print(f"\nAgreement with the radlabels peer labels ({radlabels['rules']['agreement']['n_reports']} reports)")
    print(format_radlabels_table(radlabels))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"counts": counts, "iu": iu, "radlabels": radlabels}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
