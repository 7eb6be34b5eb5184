"""The relabeling loop's middle step: send a drifted institution's reports (a budgeted sample, the
model's least certain predictions first) to the teacher and append report and pseudo-labels to the
DVC-tracked store `data/relabeled/records.jsonl`, which the ingest stage reads as one more source.

The store is append-only, one JSON line per report (the report's fields plus the teacher's labels),
written and flushed one teacher chunk at a time. An interrupted run leaves whole lines (a torn last
line is cut off on the next start) and a rerun labels only what is missing, so nothing is lost and
nothing is written twice. Reports already in the corpus or the store, by id or by text, are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deberta_rad.data import AppendOnlyStore, InputError, read_label_records, read_reports, text_hash
from deberta_rad.monitor import mean_confidence
from deberta_rad.schema import LabelRecord, Report

Labeler = Callable[[Sequence[Report]], list[LabelRecord]]


def uncertainty(record: LabelRecord | None) -> float:
    """One minus the prediction's confidence; a report without a prediction (or its probabilities)
    counts as most uncertain (1.0), so the ranking does not starve it."""
    confidence = None if record is None else mean_confidence(record)
    return 1.0 if confidence is None else 1.0 - confidence


def select_reports(
    reports: Sequence[Report],
    predictions: Sequence[LabelRecord],
    budget: int,
    institution: str | None = None,
) -> list[Report]:
    """The `budget` reports of the institution whose predictions are least certain (stable order on ties).
    The selection does not depend on what was labelled before, so a rerun picks the same reports."""
    by_id = {p.report_id: p for p in predictions}
    candidates = [r for r in reports if institution is None or r.institution == institution]
    ranked = sorted(candidates, key=lambda r: -uncertainty(by_id.get(r.report_id)))
    return ranked[:budget]


@dataclass
class RelabelSummary:
    selected: int
    already_known: int
    labelled: int
    store_size: int

    def describe(self, store: Path) -> str:
        return (
            f"selected {self.selected} reports; {self.already_known} were already in the corpus or the store; "
            f"labelled {self.labelled}; {store} now holds {self.store_size}"
        )


def relabel(
    selection: Sequence[Report],
    store: AppendOnlyStore,
    labeler: Labeler,
    corpus: Sequence[Report] = (),
    chunk_size: int = 32,
) -> RelabelSummary:
    """Label what the selection holds that neither the corpus nor the store has, chunk by chunk."""
    from tqdm.auto import tqdm

    stored = [Report.model_validate(row) for row in store.records()]
    known = [*corpus, *stored]
    known_texts = {r.report_id: text_hash(r.text) for r in known}
    clashes = [r.report_id for r in selection if known_texts.get(r.report_id, text_hash(r.text)) != text_hash(r.text)]
    if clashes:
        raise InputError(
            f"{len(clashes)} selected report ids are already in the corpus or the store with another text, "
            f"e.g. {clashes[:5]}; give the new institution's reports their own ids"
        )
    seen_texts = set(known_texts.values())
    todo = []
    for report in selection:
        digest = text_hash(report.text)
        if digest in seen_texts:  # the same report (or the same text) is already there
            continue
        seen_texts.add(digest)
        todo.append(report)
    for start in tqdm(range(0, len(todo), chunk_size), desc="relabelling", unit="chunk"):
        chunk = todo[start : start + chunk_size]
        records = labeler(chunk)
        if [r.report_id for r in records] != [r.report_id for r in chunk]:
            raise RuntimeError("the teacher answered for other reports than it was sent")
        store.append(list(zip(chunk, records, strict=True)))
    return RelabelSummary(len(selection), len(selection) - len(todo), len(todo), len(stored) + len(todo))


def relabel_files(
    reports_path: Path,
    predictions_path: Path | None,
    store_path: Path,
    budget: int,
    labeler: Labeler,
    institution: str | None = None,
    corpus_path: Path | None = None,
) -> RelabelSummary:
    """`deberta-rad relabel`: read the inputs, select, label, append."""
    reports = read_reports(reports_path)
    predictions = read_label_records(predictions_path) if predictions_path else []
    if institution and not any(r.institution == institution for r in reports):
        raise InputError(f"{reports_path}: no report from institution {institution!r}")
    corpus = read_reports(corpus_path) if corpus_path and corpus_path.is_file() else []
    selection = select_reports(reports, predictions, budget, institution)
    return relabel(selection, AppendOnlyStore(store_path), labeler, corpus)
