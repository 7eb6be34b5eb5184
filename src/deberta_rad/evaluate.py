"""Score labelers against gold the way DESIGN.md section 5 defines it, plus comparisons and plots.

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
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from deberta_rad.schema import FINDINGS, SCORED_STATUSES, STATUS_INDEX, STATUSES, LabelRecord
from deberta_rad.synthetic import TEACHER as SYNTHETIC_TEACHER

Labels = Mapping[str, Mapping[str, str]]

N_FINDINGS = len(FINDINGS)
N_STATUSES = len(STATUSES)
N_SCORED = len(SCORED_STATUSES)
SCORED_INDICES = np.array([STATUS_INDEX[s] for s in SCORED_STATUSES])
MAX_IDS_IN_ERROR = 5
BOOTSTRAP_CELLS_PER_CHUNK = 10_000_000  # resamples x reports held at once in the bootstrap weights

PRESENCE_LIMITATION = (
    "Presence-only gold (e.g. IU X-ray MeSH codes) marks findings as present but does not code "
    "negation or uncertainty, so it cannot score the absent or uncertain statuses: these are "
    "binary present-vs-rest scores, not the section-5 finding F1."
)


# ----------------------------------------------------------------------------------------------
# Encoding dicts into matrices
# ----------------------------------------------------------------------------------------------


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
    """Status-index matrix [N, 13] (schema.STATUS_INDEX) for the given report ids."""
    return _encode(source, labels, ids, STATUS_INDEX)


def _aligned_matrices(predictions: Labels, gold: Labels) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Gold ids plus predicted and gold status matrices aligned on them."""
    ids = _gold_ids(gold)
    _check_covered(predictions, ids)
    return ids, _encode_statuses("predicted", predictions, ids), _encode_statuses("gold", gold, ids)


def _n_unscored(predictions: Mapping[str, Any], gold: Mapping[str, Any]) -> int:
    """Predictions for reports outside the gold set: ignored for scoring but reported."""
    return sum(1 for rid in predictions if rid not in gold)


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


def _cell_status_indicators(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Per-report one-hot counts [N, 13, 3 kinds (tp, gold, pred), 3 statuses] for the bootstrap."""
    scored = SCORED_INDICES.reshape(1, 1, N_SCORED)
    is_gold = gold[..., None] == scored
    is_pred = pred[..., None] == scored
    return np.stack([is_gold & is_pred, is_gold, is_pred], axis=2).astype(np.float64)


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


def _macro_f1_from_counts(true_pos: np.ndarray, gold_pos: np.ndarray, pred_pos: np.ndarray) -> np.ndarray:
    """Macro F1 [...] over findings with support, from per-status counts [..., 13, 3]."""
    return _mean_defined(_finding_scores(true_pos, gold_pos, pred_pos)["f1"])


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
    per_status: Mapping[str, np.ndarray], finding: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """{finding: {f1, precision, recall, support, per_status: {status: {precision, recall, f1, support}}}}."""
    return {
        name: {
            **_score_dict(finding, f),
            "per_status": {s: _score_dict(per_status, (f, k)) for k, s in enumerate(SCORED_STATUSES)},
        }
        for f, name in enumerate(FINDINGS)
    }


def _metrics_from_confusion(confusion: np.ndarray) -> dict[str, Any]:
    """All section-5 single-labeler metrics from per-finding confusion counts [13, 4, 4]."""
    counts = _status_counts_from_confusion(confusion)
    finding = _finding_scores(*counts)
    per_finding = _per_finding_dicts(_prf(*counts), finding)
    pooled = _prf(*_status_counts_from_confusion(confusion.sum(axis=0)))
    status_scores = {s: _score_dict(pooled, k) for k, s in enumerate(SCORED_STATUSES)}
    overall = confusion.sum(axis=0)
    return {
        "macro_f1": _optional(_mean_defined(finding["f1"])),
        "findings_left_out": [f for f, v in per_finding.items() if v["f1"] is None],
        "per_finding": per_finding,
        "status_f1": {s: scores["f1"] for s, scores in status_scores.items()},
        "status_scores": status_scores,
        "agreement": float(np.trace(overall) / overall.sum()),
        "kappa": cohen_kappa(overall),
        "n_cells": int(overall.sum()),
    }


def compute_metrics(predictions: Labels, gold: Labels) -> dict[str, Any]:
    """Section-5 metrics of ``predictions`` on the reports of ``gold``.

    Returns keys ``macro_f1``, ``findings_left_out``, ``per_finding`` ({finding: {f1, precision,
    recall, support, per_status: {status: {precision, recall, f1, support}}}}), ``status_f1``,
    ``status_scores``, ``agreement``, ``kappa``, ``n_reports``, ``n_cells``, ``n_unscored_predictions``.
    Undefined scores are None (see the module docstring). Raises ValueError when a gold report has
    no prediction, so nothing is silently dropped; predictions outside gold are only counted.
    """
    ids, pred, gold_matrix = _aligned_matrices(predictions, gold)
    metrics = _metrics_from_confusion(_confusion(pred, gold_matrix))
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
# Comparing labelers
# ----------------------------------------------------------------------------------------------


def _scipy_result(test: Any, a: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    """Run a paired scipy test; None where it is undefined (fewer than 2 findings, all differences 0)."""
    if len(a) < 2 or np.all(a == b):
        return {"statistic": None, "p_value": None}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        result = test(a, b)
    return {"statistic": _optional(result.statistic), "p_value": _optional(result.pvalue)}


def _paired_finding_tests(f1_a: np.ndarray, f1_b: np.ndarray) -> dict[str, Any]:
    """Paper Table II tests over the per-finding F1s that both labelers score."""
    both = ~np.isnan(f1_a) & ~np.isnan(f1_b)
    a, b = f1_a[both], f1_b[both]
    return {
        "n_findings": int(both.sum()),
        "t_test": _scipy_result(stats.ttest_rel, a, b),
        "wilcoxon": _scipy_result(stats.wilcoxon, a, b),
    }


def _bootstrap_weights(rng: np.random.Generator, n_resamples: int, n_reports: int) -> np.ndarray:
    """How often each report is drawn in each resample, [n_resamples, n_reports]."""
    draws = rng.integers(0, n_reports, size=(n_resamples, n_reports))
    flat = draws + np.arange(n_resamples)[:, None] * n_reports
    return np.bincount(flat.ravel(), minlength=n_resamples * n_reports).reshape(n_resamples, n_reports)


def _resampled_macro_f1(weights: np.ndarray, indicators: np.ndarray) -> np.ndarray:
    """Macro F1 of each resample: per-report counts [N, 13, 3, 3] summed with resample weights."""
    counts = (weights @ indicators.reshape(len(indicators), -1)).reshape(len(weights), *indicators.shape[1:])
    return _macro_f1_from_counts(counts[:, :, 0], counts[:, :, 1], counts[:, :, 2])


def _bootstrap_difference(
    indicators_a: np.ndarray, indicators_b: np.ndarray, n_resamples: int, seed: int, confidence: float = 0.95
) -> dict[str, Any]:
    """Paired bootstrap over reports of macro_f1(a) - macro_f1(b): same resample for both labelers."""
    n_reports = len(indicators_a)
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CELLS_PER_CHUNK // n_reports)
    differences = []
    for start in range(0, n_resamples, chunk):
        weights = _bootstrap_weights(rng, min(chunk, n_resamples - start), n_reports).astype(np.float64)
        differences.append(_resampled_macro_f1(weights, indicators_a) - _resampled_macro_f1(weights, indicators_b))
    diffs = np.concatenate(differences)
    diffs = diffs[~np.isnan(diffs)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail]) if len(diffs) else (np.nan, np.nan)
    return {
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": confidence,
        "ci_low": _optional(low),
        "ci_high": _optional(high),
    }


def _disagreements(
    ids: list[str], pred_a: np.ndarray, pred_b: np.ndarray, gold: np.ndarray, max_listed: int
) -> dict[str, Any]:
    """Cells where two labelers differ: total, count per finding and the first ``max_listed`` (ids only)."""
    rows, cols = np.nonzero(pred_a != pred_b)
    by_finding = np.bincount(cols, minlength=N_FINDINGS)
    first = [
        {
            "report_id": ids[r],
            "finding": FINDINGS[c],
            "status_a": STATUSES[pred_a[r, c]],
            "status_b": STATUSES[pred_b[r, c]],
            "gold": STATUSES[gold[r, c]],
        }
        for r, c in zip(rows[:max_listed], cols[:max_listed], strict=True)
    ]
    return {
        "n_total": len(rows),
        "by_finding": dict(zip(FINDINGS, by_finding.tolist(), strict=True)),
        "first": first,
    }


def _encode_labeler(name: str, labels: Labels, ids: list[str]) -> np.ndarray:
    """A labeler's status matrix on the gold ids; errors name the labeler."""
    try:
        _check_covered(labels, ids)
    except ValueError as err:
        raise ValueError(f"labeler {name!r}: {err}") from None
    return _encode_statuses(f"labeler {name!r}", labels, ids)


def _finding_f1(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Section-5 finding F1s [13] (NaN for findings without support)."""
    return _finding_scores(*_status_counts_from_confusion(_confusion(pred, gold)))["f1"]


def _difference(a: float | None, b: float | None) -> float | None:
    """a - b, undefined when either score is."""
    return None if a is None or b is None else a - b


def _labeler_pairs(names: list[str], all_pairs: bool) -> list[tuple[str, str]]:
    """The first labeler against each other one, or every pair."""
    if all_pairs:
        return list(itertools.combinations(names, 2))
    return [(names[0], other) for other in names[1:]]


def compare_labelers(
    gold: Labels,
    labelers: Mapping[str, Labels],
    n_bootstrap: int = 2000,
    seed: int = 0,
    all_pairs: bool = False,
    max_disagreements: int = 20,
) -> dict[str, Any]:
    """Compare labelers on the same gold (section 5 significance), the first against each other one.

    Returns keys ``n_reports``, ``labelers`` ({name: {macro_f1, finding_f1: {finding: f1 | None},
    n_unscored_predictions}}) and ``pairs``: a list of {a, b, macro_f1_a, macro_f1_b, difference
    (a - b), n_findings, t_test: {statistic, p_value}, wilcoxon: {statistic, p_value}, bootstrap:
    {n_resamples, seed, confidence, ci_low, ci_high}, disagreements: {n_total, by_finding, first:
    [{report_id, finding, status_a, status_b, gold}]}}. Tests that are undefined (identical F1s,
    fewer than two findings) give None.
    """
    if len(labelers) < 2:
        raise ValueError("compare_labelers needs at least two labelers")
    if n_bootstrap < 1:
        raise ValueError("n_bootstrap must be at least 1")
    ids = _gold_ids(gold)
    gold_matrix = _encode_statuses("gold", gold, ids)
    preds = {name: _encode_labeler(name, labels, ids) for name, labels in labelers.items()}
    finding_f1 = {name: _finding_f1(pred, gold_matrix) for name, pred in preds.items()}
    summary = {
        name: {
            "macro_f1": _optional(_mean_defined(finding_f1[name])),
            "finding_f1": {f: _optional(v) for f, v in zip(FINDINGS, finding_f1[name], strict=True)},
            "n_unscored_predictions": _n_unscored(labelers[name], gold),
        }
        for name in labelers
    }
    indicators = {name: _cell_status_indicators(pred, gold_matrix) for name, pred in preds.items()}
    pairs = [
        {
            "a": a,
            "b": b,
            "macro_f1_a": summary[a]["macro_f1"],
            "macro_f1_b": summary[b]["macro_f1"],
            "difference": _difference(summary[a]["macro_f1"], summary[b]["macro_f1"]),
            **_paired_finding_tests(finding_f1[a], finding_f1[b]),
            "bootstrap": _bootstrap_difference(indicators[a], indicators[b], n_bootstrap, seed),
            "disagreements": _disagreements(ids, preds[a], preds[b], gold_matrix, max_disagreements),
        }
        for a, b in _labeler_pairs(list(labelers), all_pairs)
    ]
    return {"n_reports": len(ids), "labelers": summary, "pairs": pairs}


# ----------------------------------------------------------------------------------------------
# Confusion matrices and plots
# ----------------------------------------------------------------------------------------------


def confusion_matrices(predictions: Labels, gold: Labels) -> dict[str, list[list[int]]]:
    """Per-finding 4x4 counts, gold status rows x predicted status columns, in STATUSES order."""
    _, pred, gold_matrix = _aligned_matrices(predictions, gold)
    return {f: cm.tolist() for f, cm in zip(FINDINGS, _confusion(pred, gold_matrix), strict=True)}


def confusion_rows(predictions: Labels, gold: Labels) -> list[dict[str, str]]:
    """One ``{finding, actual, predicted}`` row per cell, the input DVC's confusion plot template reads."""
    _, pred, gold_matrix = _aligned_matrices(predictions, gold)
    return [
        {"finding": FINDINGS[f], "actual": STATUSES[g], "predicted": STATUSES[p]}
        for g_row, p_row in zip(gold_matrix.tolist(), pred.tolist(), strict=True)
        for f, (g, p) in enumerate(zip(g_row, p_row, strict=True))
    ]


def plot_confusion_matrices(cms: Mapping[str, list[list[int]]], out_png: Path) -> Path:
    """Grid of per-finding confusion heatmaps (colour = row share, text = count) saved as a PNG."""
    from matplotlib.figure import Figure  # lazy: plotting is the only matplotlib user here

    n_cols = 4
    n_rows = -(-len(cms) // n_cols)
    fig = Figure(figsize=(4.2 * n_cols, 3.9 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    short = ["pres", "abs", "unc", "n/m"]
    for ax, (finding, cm) in zip(axes, cms.items(), strict=False):
        counts = np.asarray(cm)
        shares = _safe_divide(counts, counts.sum(axis=1, keepdims=True))
        ax.imshow(np.nan_to_num(shares), cmap="Blues", vmin=0.0, vmax=1.0)
        for (i, j), count in np.ndenumerate(counts):
            colour = "white" if shares[i, j] > 0.6 else "black"
            ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color=colour)
        ax.set_title(finding, fontsize=10)
        ax.set_xticks(range(N_STATUSES), short, fontsize=8)
        ax.set_yticks(range(N_STATUSES), short, fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("gold", fontsize=8)
    for ax in axes[len(cms) :]:
        ax.set_axis_off()
    fig.suptitle("Confusion per finding (pres=present, abs=absent, unc=uncertain, n/m=not mentioned)")
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


# ----------------------------------------------------------------------------------------------
# Text tables
# ----------------------------------------------------------------------------------------------


def _fmt(value: float | None, width: int = 7) -> str:
    """A score right-aligned to ``width`` with 3 decimals, or n/a when undefined."""
    return f"{'n/a' if value is None else f'{value:.3f}':>{width}}"


def _left_out_line(left_out: list[str]) -> str:
    """States how many findings the Macro F1 leaves out and which."""
    if not left_out:
        return f"all {N_FINDINGS} findings scored"
    return f"{len(left_out)} of {N_FINDINGS} findings left out (no gold support): {', '.join(left_out)}"


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
        f"Macro F1: {_fmt(metrics['macro_f1'], 0)}  ({_left_out_line(metrics['findings_left_out'])})",
        f"Reports: {metrics['n_reports']}  cells: {metrics['n_cells']}  "
        f"agreement: {metrics['agreement']:.3f}  Cohen's kappa: {kappa}",
        "",
        *_per_finding_table(metrics["per_finding"]),
        "",
        *_status_table(metrics["status_scores"]),
    ]
    if metrics.get("n_unscored_predictions"):
        lines += ["", f"{metrics['n_unscored_predictions']} prediction(s) outside the gold set were ignored"]
    return "\n".join(lines)


def _labeler_f1_table(labelers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per-finding F1 of each labeler side by side (paper Table II), Macro F1 last."""
    names = list(labelers)
    width = max(len(f) for f in FINDINGS)
    col = max(10, *(len(n) + 2 for n in names))
    lines = [f"{'Finding':<{width}}" + "".join(f"{n:>{col}}" for n in names)]
    for finding in FINDINGS:
        scores = "".join(_fmt(labelers[n]["finding_f1"][finding], col) for n in names)
        lines.append(f"{finding:<{width}}{scores}")
    lines.append(f"{'Macro F1':<{width}}" + "".join(_fmt(labelers[n]["macro_f1"], col) for n in names))
    return lines


def _test_text(result: Mapping[str, float | None]) -> str:
    """statistic and p-value of a paired test, or n/a when undefined."""
    if result["p_value"] is None:
        return "n/a (no differing findings)"
    return f"statistic {result['statistic']:.3f}, p = {result['p_value']:.4g}"


def _pair_lines(pair: Mapping[str, Any]) -> list[str]:
    """Difference, tests, bootstrap CI and a few disagreements for one labeler pair."""
    boot = pair["bootstrap"]
    dis = pair["disagreements"]
    lines = [
        f"{pair['a']} vs {pair['b']}: Macro F1 difference (a - b) {_fmt(pair['difference'], 0)}",
        f"  paired t-test over {pair['n_findings']} findings: {_test_text(pair['t_test'])}",
        f"  Wilcoxon signed-rank: {_test_text(pair['wilcoxon'])}",
        f"  paired bootstrap over reports ({boot['n_resamples']} resamples, seed {boot['seed']}): "
        f"{100 * boot['confidence']:.0f}% CI [{_fmt(boot['ci_low'], 0)}, {_fmt(boot['ci_high'], 0)}]",
        f"  disagreeing cells: {dis['n_total']}",
    ]
    lines += [
        f"    {d['report_id']}  {d['finding']}: {d['status_a']} vs {d['status_b']} (gold {d['gold']})"
        for d in dis["first"]
    ]
    if dis["n_total"] > len(dis["first"]):
        lines.append(f"    ... {dis['n_total'] - len(dis['first'])} more")
    return lines


def format_comparison_table(comparison: Mapping[str, Any]) -> str:
    """Plain-text report of :func:`compare_labelers` output."""
    lines = [f"Reports: {comparison['n_reports']}", "", *_labeler_f1_table(comparison["labelers"])]
    for pair in comparison["pairs"]:
        lines += ["", *_pair_lines(pair)]
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


def score_files(predictions_path: Path, gold_path: Path, gold_format: str = "auto") -> dict[str, Any]:
    """The `evaluate` command: section-5 metrics for status gold, presence scores for presence gold."""
    from deberta_rad.data import labels_by_id, read_label_records
    from deberta_rad.gold import read_gold

    predictions = labels_by_id(read_label_records(predictions_path))
    gold = read_gold(gold_path, gold_format)
    if gold.kind == "presence":
        return presence_metrics(predictions, gold.labels)
    return compute_metrics(predictions, gold.labels)


NO_EVIDENCE = "(no phrase: the teacher did not mention it)"


def teacher_disagreements(predictions: Labels, teacher: Sequence[LabelRecord]) -> list[dict[str, Any]]:
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
    model_dir: Path, split_dir: Path, plots_dir: Path, batch_size: int = 64, disagreements_out: Path | None = None
) -> dict[str, Any]:
    """The evaluate stage: label a split with the student and score it against the teacher's labels
    and, where the sources carried it, ground truth. Writes DVC plots and, to ``disagreements_out``, the
    cells where the student differs from the teacher by finding and phrase; returns the metrics."""
    from deberta_rad.data import labels_by_id, read_label_records, read_reports
    from deberta_rad.predict import load_engine

    reports = read_reports(split_dir / "reports.jsonl")
    engine = load_engine(model_dir, batch_size=batch_size)
    started = time.perf_counter()
    records = engine.label(reports, model_name=str(model_dir), progress=True)
    seconds = time.perf_counter() - started
    predictions = labels_by_id(records)
    results: dict[str, Any] = {"inference": {"reports": len(reports), "reports_per_s": len(reports) / seconds}}
    for reference in ("labels", "gold"):
        path = split_dir / f"{reference}.jsonl"
        references = read_label_records(path) if path.is_file() else []
        if not references:
            continue
        name = "teacher" if reference == "labels" else "gold"
        gold = labels_by_id(references)
        results[name] = {"source": label_source(references), **compute_metrics(predictions, gold)}
        if name == "teacher":
            cells = teacher_disagreements(predictions, references)
            results[name]["disagreements"] = disagreement_counts(cells)
            if disagreements_out:
                disagreements_out.parent.mkdir(parents=True, exist_ok=True)
                disagreements_out.write_text(format_disagreements(cells))
        plot_confusion_matrices(confusion_matrices(predictions, gold), plots_dir / f"confusion_{name}.png")
        write_confusion_plots(confusion_rows(predictions, gold), plots_dir / "confusion" / name)
        rows = [{"finding": f, "f1": m["f1"]} for f, m in results[name]["per_finding"].items() if m["f1"] is not None]
        (plots_dir / f"per_finding_f1_{name}.json").write_text(json.dumps(rows, indent=1))
    return results


def label_source(records: Sequence[LabelRecord]) -> str:
    """Who made a reference's labels: "synthetic" for the embedded generator's ground truth (its own
    conventions, not evidence of quality on real reports), else the teachers, e.g. "rules/vocabulary-2.0.0"."""
    names = sorted({f"{r.teacher.name}/{r.teacher.model}" if r.teacher else "unknown" for r in records})
    return "synthetic" if names == [f"{SYNTHETIC_TEACHER.name}/{SYNTHETIC_TEACHER.model}"] else ", ".join(names)


def write_confusion_plots(rows: list[dict[str, str]], out_dir: Path) -> None:
    """One `{actual, predicted}` file per finding, the data DVC's `confusion` template draws (dvc.yaml
    declares the folder), so `dvc plots diff` shows each finding's matrix for two versions side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for finding in FINDINGS:
        cells = [{"actual": r["actual"], "predicted": r["predicted"]} for r in rows if r["finding"] == finding]
        (out_dir / f"{finding.lower().replace(' ', '_')}.json").write_text(json.dumps(cells))
