"""Score a labeler against gold the way DESIGN.md section 5 defines it: the metric definitions
(status F1/P/R, Macro F1, agreement, Cohen's kappa, presence scores) and their text tables.

Everything works on plain dicts ``report_id -> {finding: status}`` so any labeler (teacher, student,
a peer's CSV) can be scored the same way. Labels are encoded once into an ``[N, 13]`` matrix of
status indices (``schema.STATUS_INDEX``) and all arithmetic is vectorised over it, because the same
functions run on 100k-report corpora and inside a 2,000-resample bootstrap.

Zero-division conventions (shared by every function here):

- precision of a status nobody predicted is 0.0;
- recall and F1 of a status with no gold support are undefined (``None``) and that status is left
  out of the finding's support-weighted mean;
- a finding with no gold support in present/absent/uncertain gets ``None`` (shown as n/a) and is
  left out of the Macro F1; its name is listed in ``findings_left_out``.

A gold format may not code every finding (CheXpert/CheXbert CSV has no Infiltrate or Pleural Thickening
column; ``gold.GoldSet.findings`` says which it codes). Pass those as ``findings``: the others are
not scored at all (no per-finding row, not in the Macro F1, status F1, agreement or kappa, no
disagreements) and are listed in ``findings_not_scored``, never counted as gold ``not_mentioned``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from deberta_rad.schema import FINDINGS, SCORED_STATUSES, STATUS_INDEX, STATUSES, LabelRecord

Labels = Mapping[str, Mapping[str, str]]

N_FINDINGS = len(FINDINGS)
N_STATUSES = len(STATUSES)
N_SCORED = len(SCORED_STATUSES)
SCORED_INDICES = np.array([STATUS_INDEX[s] for s in SCORED_STATUSES])
MAX_IDS_IN_ERROR = 5

PRESENCE_LIMITATION = (
    "Presence-only gold (e.g. IU X-ray MeSH codes) marks findings as present but does not code "
    "negation or uncertainty, so it cannot score the absent or uncertain statuses: these are "
    "binary present-vs-rest scores, not the section-5 finding F1."
)


# ----------------------------------------------------------------------------------------------
# Encoding dicts into matrices
# ----------------------------------------------------------------------------------------------


class StatusCodes(Mapping[str, Mapping[str, str]]):
    """report_id -> {finding: status}, the shape metrics read, kept as 13 status bytes per report: the
    one thing evaluation must hold per report (predictions and gold alike), in about a tenth of the
    memory of the dicts."""

    def __init__(self, records: Iterable[LabelRecord] = ()) -> None:
        self.codes: dict[str, bytes] = {}
        for record in records:
            self.add(record)

    def add(self, record: LabelRecord) -> None:
        self.codes[record.report_id] = bytes(STATUS_INDEX[record.labels[f]] for f in FINDINGS)

    def __getitem__(self, report_id: str) -> dict[str, str]:
        return {f: STATUSES[code] for f, code in zip(FINDINGS, self.codes[report_id], strict=True)}

    def __iter__(self) -> Iterator[str]:
        return iter(self.codes)

    def __len__(self) -> int:
        return len(self.codes)


def _gold_ids(gold: Mapping[str, Any]) -> list[str]:
    """The report ids to score, in gold order; an empty gold set is an error, not a perfect score."""
    if not gold:
        raise ValueError("gold is empty: nothing to score")
    return list(gold)


def _check_covered(prediction_ids: Mapping[str, Any], gold_ids: list[str]) -> None:
    """Refuse to score when gold reports lack a prediction: dropping them would inflate scores."""
    missing = [rid for rid in gold_ids if rid not in prediction_ids]
    if missing:
        shown = ", ".join(missing[:MAX_IDS_IN_ERROR])
        more = f" and {len(missing) - MAX_IDS_IN_ERROR} more" if len(missing) > MAX_IDS_IN_ERROR else ""
        raise ValueError(f"{len(missing)} gold report(s) have no prediction: {shown}{more}")


def _encode_row(source: str, report_id: str, labels: Mapping[str, Any], encode_value: Mapping[Any, int]) -> list[int]:
    """One report's labels as indices in FINDINGS order; a missing finding or unknown value is an error."""
    missing = [f for f in FINDINGS if f not in labels]
    unknown = [f for f in labels if f not in FINDINGS]
    if missing or unknown:
        raise ValueError(
            f"{source} report {report_id!r}: findings must be the 13 of the schema; "
            f"missing {missing}, unknown {unknown}"
        )
    try:
        return [encode_value[labels[f]] for f in FINDINGS]
    except KeyError as err:
        raise ValueError(f"{source} report {report_id!r}: invalid label value {err.args[0]!r}") from None


def _encode(
    source: str,
    labels: Labels | Mapping[str, Mapping[str, bool]],
    ids: list[str],
    encode_value: Mapping[Any, int],
) -> np.ndarray:
    """Matrix [len(ids), 13] of encoded labels, rows in the order of ``ids``; ``source`` names errors."""
    rows = [_encode_row(source, rid, labels[rid], encode_value) for rid in ids]
    return np.array(rows, dtype=np.int64).reshape(len(ids), N_FINDINGS)


def _encode_statuses(source: str, labels: Labels, ids: list[str]) -> np.ndarray:
    """Status-index matrix [N, 13] (schema.STATUS_INDEX) for the given report ids: from StatusCodes'
    bytes directly (one byte per cell, no row objects), else label by label."""
    if isinstance(labels, StatusCodes):
        return np.frombuffer(b"".join(labels.codes[rid] for rid in ids), dtype=np.uint8).reshape(len(ids), N_FINDINGS)
    return _encode(source, labels, ids, STATUS_INDEX)


def _aligned_matrices(predictions: Labels, gold: Labels) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Gold ids plus predicted and gold status matrices aligned on them."""
    ids = _gold_ids(gold)
    _check_covered(predictions, ids)
    return ids, _encode_statuses("predicted", predictions, ids), _encode_statuses("gold", gold, ids)


def _n_unscored(predictions: Mapping[str, Any], gold: Mapping[str, Any]) -> int:
    """Predictions for reports outside the gold set: ignored for scoring but reported."""
    return sum(1 for rid in predictions if rid not in gold)


def _scored_mask(findings: Sequence[str] | None) -> np.ndarray:
    """Boolean [13]: the findings the gold codes (all of them when ``findings`` is None)."""
    if findings is None:
        return np.ones(N_FINDINGS, dtype=bool)
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown:
        raise ValueError(f"scored findings must be among the 13 of the schema; unknown {unknown}")
    if not findings:
        raise ValueError("the gold codes none of the 13 findings: nothing to score")
    return np.isin(np.array(FINDINGS), list(findings))


def _not_scored(scored: np.ndarray) -> list[str]:
    return [f for f, kept in zip(FINDINGS, scored, strict=True) if not kept]


# ----------------------------------------------------------------------------------------------
# Counting and scoring (vectorised, any leading batch dimensions)
# ----------------------------------------------------------------------------------------------


def _confusion(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Per-finding 4x4 confusion counts [13, gold status, predicted status]."""
    cell_code = (np.arange(N_FINDINGS) * N_STATUSES + gold) * N_STATUSES + pred
    counts = np.bincount(cell_code.ravel(), minlength=N_FINDINGS * N_STATUSES * N_STATUSES)
    return counts.reshape(N_FINDINGS, N_STATUSES, N_STATUSES)


def _status_counts_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True positives, gold positives and predicted positives [..., 3] of the scored statuses."""
    idx = SCORED_INDICES
    true_pos = confusion[..., idx, idx]
    gold_pos = confusion[..., idx, :].sum(axis=-1)
    pred_pos = confusion[..., :, idx].sum(axis=-2)
    return true_pos, gold_pos, pred_pos


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise ratio with NaN where the denominator is zero (undefined, decided by the caller)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _prf(true_pos: np.ndarray, gold_pos: np.ndarray, pred_pos: np.ndarray) -> dict[str, np.ndarray]:
    """One-vs-rest precision/recall/F1 with the module's zero-division conventions (NaN = undefined)."""
    precision = np.nan_to_num(_safe_divide(true_pos, pred_pos), nan=0.0)
    recall = _safe_divide(true_pos, gold_pos)
    f1 = _safe_divide(2 * true_pos, gold_pos + pred_pos)
    f1 = np.where(gold_pos > 0, f1, np.nan)
    return {"precision": precision, "recall": recall, "f1": f1, "support": np.asarray(gold_pos)}


def _support_weighted(values: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Mean over the last axis weighted by gold support; statuses without support drop out (NaN-safe)."""
    weighted = np.where(support > 0, np.nan_to_num(values) * support, 0.0).sum(axis=-1)
    return _safe_divide(weighted, support.sum(axis=-1))


def _mean_defined(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the defined (non-NaN) entries; NaN when none is defined."""
    defined = ~np.isnan(values)
    return _safe_divide(np.where(defined, values, 0.0).sum(axis=-1), defined.sum(axis=-1))


def _finding_scores(true_pos: np.ndarray, gold_pos: np.ndarray, pred_pos: np.ndarray) -> dict[str, np.ndarray]:
    """Finding-level support-weighted P/R/F1 [..., 13] from per-status counts [..., 13, 3]."""
    per_status = _prf(true_pos, gold_pos, pred_pos)
    scores = {key: _support_weighted(per_status[key], gold_pos) for key in ("precision", "recall", "f1")}
    scores["support"] = gold_pos.sum(axis=-1)
    return scores


def _optional(value: float | np.floating) -> float | None:
    """JSON-friendly score: NaN (undefined) becomes None."""
    return None if np.isnan(value) else float(value)


def _score_dict(scores: Mapping[str, np.ndarray], index: tuple[int, ...] | int) -> dict[str, Any]:
    """Plain-Python {precision, recall, f1, support} of one entry of vectorised scores."""
    return {
        "precision": _optional(scores["precision"][index]),
        "recall": _optional(scores["recall"][index]),
        "f1": _optional(scores["f1"][index]),
        "support": int(scores["support"][index]),
    }


# ----------------------------------------------------------------------------------------------
# Section-5 metrics
# ----------------------------------------------------------------------------------------------


def cohen_kappa(confusion: np.ndarray) -> float | None:
    """Cohen's kappa of a pooled 4x4 confusion; None when chance agreement is 1 (kappa undefined)."""
    n = int(confusion.sum())
    chance_pairs = int(confusion.sum(axis=1) @ confusion.sum(axis=0))  # exact integers: no rounding
    if chance_pairs == n * n:
        return None
    observed = np.trace(confusion) / n
    expected = chance_pairs / n**2
    return float((observed - expected) / (1.0 - expected))


def _per_finding_dicts(
    per_status: Mapping[str, np.ndarray], finding: Mapping[str, np.ndarray], scored: np.ndarray
) -> dict[str, dict[str, Any]]:
    """{finding: {f1, precision, recall, support, per_status: {status: {precision, recall, f1, support}}}}
    for the scored findings."""
    return {
        name: {
            **_score_dict(finding, f),
            "per_status": {s: _score_dict(per_status, (f, k)) for k, s in enumerate(SCORED_STATUSES)},
        }
        for f, name in enumerate(FINDINGS)
        if scored[f]
    }


def _metrics_from_confusion(confusion: np.ndarray, scored: np.ndarray) -> dict[str, Any]:
    """All section-5 single-labeler metrics from per-finding confusion counts [13, 4, 4], over the
    ``scored`` findings only (the counts of the others are dropped)."""
    confusion = np.where(scored[:, None, None], confusion, 0)
    counts = _status_counts_from_confusion(confusion)
    finding = _finding_scores(*counts)
    per_finding = _per_finding_dicts(_prf(*counts), finding, scored)
    pooled = _prf(*_status_counts_from_confusion(confusion.sum(axis=0)))
    status_scores = {s: _score_dict(pooled, k) for k, s in enumerate(SCORED_STATUSES)}
    overall = confusion.sum(axis=0)
    return {
        "macro_f1": _optional(_mean_defined(finding["f1"])),
        "findings_left_out": [f for f, v in per_finding.items() if v["f1"] is None],
        "findings_not_scored": _not_scored(scored),
        "per_finding": per_finding,
        "status_f1": {s: scores["f1"] for s, scores in status_scores.items()},
        "status_scores": status_scores,
        "agreement": float(np.trace(overall) / overall.sum()),
        "kappa": cohen_kappa(overall),
        "n_cells": int(overall.sum()),
    }


def compute_metrics(predictions: Labels, gold: Labels, findings: Sequence[str] | None = None) -> dict[str, Any]:
    """Section-5 metrics of ``predictions`` on the reports of ``gold``, over the ``findings`` the gold
    codes (default all 13; ``gold.GoldSet.findings`` says which a gold file codes).

    Returns keys ``macro_f1``, ``findings_left_out`` (scored but without gold support),
    ``findings_not_scored`` (not coded by the gold), ``per_finding`` (the scored findings: {finding: {f1,
    precision, recall, support, per_status: {status: {precision, recall, f1, support}}}}), ``status_f1``,
    ``status_scores``, ``agreement``, ``kappa``, ``n_reports``, ``n_cells``, ``n_unscored_predictions``.
    Undefined scores are None (see the module docstring). Raises ValueError when a gold report has
    no prediction, so nothing is silently dropped; predictions outside gold are only counted.
    """
    scored = _scored_mask(findings)
    ids, pred, gold_matrix = _aligned_matrices(predictions, gold)
    metrics = _metrics_from_confusion(_confusion(pred, gold_matrix), scored)
    return {**metrics, "n_reports": len(ids), "n_unscored_predictions": _n_unscored(predictions, gold)}


def presence_metrics(
    predictions: Labels, gold_presence: Mapping[str, Mapping[str, bool]], count_uncertain: bool = False
) -> dict[str, Any]:
    """Binary presence scores for gold that only marks findings present (IU X-ray MeSH codes).

    A prediction counts as positive when its status is present (or uncertain with
    ``count_uncertain``). Returns keys ``per_finding`` ({finding: {precision, recall, f1, support}}),
    ``macro_f1`` (over findings with gold positives), ``findings_left_out``, ``count_uncertain``,
    ``n_reports``, ``n_unscored_predictions`` and ``limitation``.
    """
    ids = _gold_ids(gold_presence)
    _check_covered(predictions, ids)
    positive = ["present", "uncertain"] if count_uncertain else ["present"]
    pred_pos = np.isin(_encode_statuses("predicted", predictions, ids), [STATUS_INDEX[s] for s in positive])
    gold_pos = _encode("gold", gold_presence, ids, {True: 1, False: 0}).astype(bool)
    scores = _prf((pred_pos & gold_pos).sum(axis=0), gold_pos.sum(axis=0), pred_pos.sum(axis=0))
    per_finding = {f: _score_dict(scores, i) for i, f in enumerate(FINDINGS)}
    return {
        "per_finding": per_finding,
        "macro_f1": _optional(_mean_defined(scores["f1"])),
        "findings_left_out": [f for f, v in per_finding.items() if v["f1"] is None],
        "count_uncertain": count_uncertain,
        "n_reports": len(ids),
        "n_unscored_predictions": _n_unscored(predictions, gold_presence),
        "limitation": PRESENCE_LIMITATION,
    }


# ----------------------------------------------------------------------------------------------
# Text tables
# ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, width: int = 7) -> str:
    """A score right-aligned to ``width`` with 3 decimals, or n/a when undefined."""
    return f"{'n/a' if value is None else f'{value:.3f}':>{width}}"


def _left_out_line(left_out: list[str], not_scored: Sequence[str] = ()) -> str:
    """States how many findings the Macro F1 leaves out and which: not coded by the gold, or coded but
    without gold support."""
    parts = []
    if not_scored:
        parts.append(
            f"{len(not_scored)} of {N_FINDINGS} not scored (the gold does not code them): {', '.join(not_scored)}"
        )
    if left_out:
        parts.append(f"{len(left_out)} of {N_FINDINGS} findings left out (no gold support): {', '.join(left_out)}")
    return "; ".join(parts) or f"all {N_FINDINGS} findings scored"


def _not_scored_lines(not_scored: Sequence[str]) -> list[str]:
    """The line under a per-finding table that names the findings it has no row for."""
    return [f"Not scored (the gold does not code them): {', '.join(not_scored)}"] if not_scored else []


def _per_finding_table(per_finding: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Finding F1/P/R/support plus the three status F1s, one row per finding."""
    width = max(len(f) for f in FINDINGS)
    with_statuses = all("per_status" in m for m in per_finding.values())
    status_heads = "".join(f"{'F1 ' + s:>14}" for s in SCORED_STATUSES) if with_statuses else ""
    lines = [f"{'Finding':<{width}} {'F1':>7}{'P':>7}{'R':>7}{'Support':>9}{status_heads}"]
    for finding, m in per_finding.items():
        status_f1 = "".join(_fmt(m["per_status"][s]["f1"], 14) for s in SCORED_STATUSES) if "per_status" in m else ""
        lines.append(
            f"{finding:<{width}} {_fmt(m['f1'])}{_fmt(m['precision'])}{_fmt(m['recall'])}{m['support']:>9}{status_f1}"
        )
    return lines


def _status_table(status_scores: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Pooled one-vs-rest scores per status (paper Table V)."""
    lines = [f"{'Status':<10} {'F1':>7}{'P':>7}{'R':>7}{'Support':>9}"]
    for status, s in status_scores.items():
        scores = f"{_fmt(s['f1'])}{_fmt(s['precision'])}{_fmt(s['recall'])}"
        lines.append(f"{status:<10} {scores}{s['support']:>9}")
    return lines


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Paper-style plain-text report of :func:`compute_metrics` output."""
    kappa = "n/a" if metrics["kappa"] is None else f"{metrics['kappa']:.3f}"
    lines = [
        f"Macro F1: {_fmt(metrics['macro_f1'], 0)}  "
        f"({_left_out_line(metrics['findings_left_out'], metrics.get('findings_not_scored', ()))})",
        f"Reports: {metrics['n_reports']}  cells: {metrics['n_cells']}  "
        f"agreement: {metrics['agreement']:.3f}  Cohen's kappa: {kappa}",
        "",
        *_per_finding_table(metrics["per_finding"]),
        *_not_scored_lines(metrics.get("findings_not_scored", ())),
        "",
        *_status_table(metrics["status_scores"]),
    ]
    if metrics.get("n_unscored_predictions"):
        lines += ["", f"{metrics['n_unscored_predictions']} prediction(s) outside the gold set were ignored"]
    return "\n".join(lines)


def format_presence_table(metrics: Mapping[str, Any]) -> str:
    """Presence macro F1 and the per-finding binary scores, with the limitation spelled out."""
    lines = [
        f"Presence Macro F1: {_fmt(metrics['macro_f1'], 0)}  ({_left_out_line(metrics['findings_left_out'])})",
        f"Reports: {metrics['n_reports']}",
        "",
        *_per_finding_table(metrics["per_finding"]),
        "",
        metrics["limitation"],
    ]
    return "\n".join(lines)
