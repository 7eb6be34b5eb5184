"""The evaluate stage (`deberta-rad evaluate-split`) and the `evaluate` command (`score_files`): label
a split with the student, score it against the teacher's labels and any ground truth (``metrics``),
write the confusion plots (``plots``) and list where the student differs from its teacher.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from deberta_rad.data import write_text_atomically
from deberta_rad.metrics import Labels, StatusCodes, compute_metrics, presence_metrics
from deberta_rad.plots import confusion_matrices, plot_confusion_matrices, write_confusion_plots
from deberta_rad.schema import FINDINGS, LabelRecord
from deberta_rad.synthetic import TEACHER as SYNTHETIC_TEACHER


def score_files(predictions_path: Path, gold_path: Path, gold_format: str = "auto") -> dict[str, Any]:
    """The `evaluate` command: section-5 metrics for status gold, presence scores for presence gold."""
    from deberta_rad.data import iter_label_records
    from deberta_rad.gold import read_gold

    predictions = StatusCodes(iter_label_records(predictions_path))
    gold = read_gold(gold_path, gold_format)
    if gold.kind == "presence":
        return presence_metrics(predictions, gold.labels)
    return compute_metrics(predictions, gold.labels, gold.findings)


NO_EVIDENCE = "(no phrase: the teacher did not mention it)"


def teacher_disagreements(predictions: Labels, teacher: Iterable[LabelRecord]) -> list[dict[str, Any]]:
    """Cells where the student's status differs from the teacher's, grouped by finding, the two statuses
    and the teacher's evidence phrase (what it read in the report), commonest first. The phrases are
    report text: they belong in a local file, never in MLflow or the metrics."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for record in teacher:
        student = predictions[record.report_id]
        for finding, status in record.labels.items():
            if student[finding] != status:
                phrases = (record.evidence or {}).get(finding) or [NO_EVIDENCE]
                key = (finding, status, student[finding], "; ".join(phrases))
                groups.setdefault(key, []).append(record.report_id)
    cells = [
        {"finding": f, "teacher": t, "student": s, "phrase": phrase, "count": len(ids), "report_ids": ids}
        for (f, t, s, phrase), ids in groups.items()
    ]
    return sorted(cells, key=lambda cell: (FINDINGS.index(cell["finding"]), -cell["count"], cell["phrase"]))


def disagreement_counts(cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The text-free summary for the metrics: cells per finding and per (teacher -> student) statuses."""
    by_finding: dict[str, dict[str, int]] = {}
    for cell in cells:
        pairs = by_finding.setdefault(cell["finding"], {})
        pair = f"{cell['teacher']}_to_{cell['student']}"  # MLflow metric names take no ">"
        pairs[pair] = pairs.get(pair, 0) + cell["count"]
    return {
        "n_cells": sum(cell["count"] for cell in cells),
        "by_finding": {f: {"n_cells": sum(pairs.values()), **pairs} for f, pairs in by_finding.items()},
    }


def format_disagreements(cells: Sequence[Mapping[str, Any]], max_ids: int = 3) -> str:
    """A Markdown report of the disagreements by finding and phrase, for a person to read locally."""
    lines = [
        "# Where the student disagrees with its teacher (test split)",
        "",
        "Grouped by finding, the teacher's and the student's status, and the phrase the teacher labelled",
        "from. Holds report text: keep it local (it is a DVC output, not logged to MLflow).",
    ]
    for finding in FINDINGS:
        rows = [cell for cell in cells if cell["finding"] == finding]
        if not rows:
            continue
        lines += ["", f"## {finding}: {sum(c['count'] for c in rows)} cells", ""]
        lines += ["| cells | teacher | student | teacher's phrase | reports |", "|---:|---|---|---|---|"]
        for cell in rows:
            ids = ", ".join(cell["report_ids"][:max_ids]) + (" ..." if cell["count"] > max_ids else "")
            phrase = cell["phrase"].replace("|", "\\|")
            lines.append(f"| {cell['count']} | {cell['teacher']} | {cell['student']} | {phrase} | {ids} |")
    if not cells:
        lines += ["", "None: the student gives the teacher's status in every cell."]
    return "\n".join(lines) + "\n"


def evaluate_split(
    model_dir: Path,
    split_dir: Path,
    plots_dir: Path | None,
    batch_size: int = 64,
    disagreements_out: Path | None = None,
) -> dict[str, Any]:
    """The evaluate stage: label a split with the student and score it against the teacher's labels,
    ground truth where the sources carried it, and the reviewed gold (`reviewed.jsonl`) where a
    radiologist reviewed reports of the split. Writes DVC plots (unless ``plots_dir`` is None: a
    champion scored again at promotion) and, to ``disagreements_out``, the cells where the student
    differs from the teacher by finding and phrase; returns the metrics. Reports and labels stream;
    what stays per report is its predicted and reference status codes."""
    from deberta_rad.data import iter_label_records, iter_reports
    from deberta_rad.predict import load_engine

    reports = iter_reports(split_dir / "reports.jsonl")  # a missing split fails before the model loads
    engine = load_engine(model_dir, batch_size=batch_size)
    started = time.perf_counter()
    stream = engine.label_stream(reports, model_name=str(model_dir), progress=True)
    predictions = StatusCodes(stream)
    seconds = time.perf_counter() - started
    results: dict[str, Any] = {"inference": {"reports": len(predictions), "reports_per_s": len(predictions) / seconds}}
    for reference, name in (("labels", "teacher"), ("gold", "gold"), ("reviewed", "reviewed")):
        path = split_dir / f"{reference}.jsonl"
        if not path.is_file():
            continue
        gold = StatusCodes()
        source = label_source(_added(iter_label_records(path), gold))
        if not gold:
            continue
        results[name] = {"source": source, **compute_metrics(predictions, gold)}
        if name == "teacher":
            cells = teacher_disagreements(predictions, iter_label_records(path))
            results[name]["disagreements"] = disagreement_counts(cells)
            if disagreements_out:
                write_text_atomically(disagreements_out, format_disagreements(cells))
        if plots_dir is not None:
            write_plots(predictions, gold, results[name], plots_dir, name)
    return results


def write_plots(
    predictions: StatusCodes, gold: StatusCodes, scores: Mapping[str, Any], plots_dir: Path, name: str
) -> None:
    """DVC's plots of one reference: the confusion matrices (image and per finding) and the per-finding F1."""
    plot_confusion_matrices(confusion_matrices(predictions, gold), plots_dir / f"confusion_{name}.png")
    write_confusion_plots(predictions, gold, plots_dir / "confusion" / name)
    rows = [{"finding": f, "f1": m["f1"]} for f, m in scores["per_finding"].items() if m["f1"] is not None]
    (plots_dir / f"per_finding_f1_{name}.json").write_text(json.dumps(rows, indent=1))


def _added(records: Iterable[LabelRecord], codes: StatusCodes) -> Iterator[LabelRecord]:
    """Pass records through, keeping each one's status codes on the way."""
    for record in records:
        codes.add(record)
        yield record


def label_source(records: Iterable[LabelRecord]) -> str:
    """Who made a reference's labels: "synthetic" for the embedded generator's ground truth (its own
    conventions, not evidence of quality on real reports), else the teachers, e.g. "rules/vocabulary-2.0.0"."""
    names = sorted({f"{r.teacher.name}/{r.teacher.model}" if r.teacher else "unknown" for r in records})
    return "synthetic" if names == [f"{SYNTHETIC_TEACHER.name}/{SYNTHETIC_TEACHER.model}"] else ", ".join(names)
