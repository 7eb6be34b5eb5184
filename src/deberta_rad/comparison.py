"""Compare labelers on the same gold (DESIGN.md section 5 significance): Macro F1 differences with
paired t-test and Wilcoxon signed-rank over the per-finding F1s, a paired bootstrap over reports,
the cells where two labelers differ, and the text table of it all.

Scores and zero-division conventions are those of ``deberta_rad.metrics``; the bootstrap recounts
them vectorised over resamples from per-report one-hot counts.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from deberta_rad.metrics import (
    N_FINDINGS,
    N_SCORED,
    SCORED_INDICES,
    Labels,
    _check_covered,
    _confusion,
    _encode_statuses,
    _finding_scores,
    _fmt,
    _gold_ids,
    _mean_defined,
    _n_unscored,
    _not_scored,
    _not_scored_lines,
    _optional,
    _scored_mask,
    _status_counts_from_confusion,
)
from deberta_rad.schema import FINDINGS, STATUSES

BOOTSTRAP_CELLS_PER_CHUNK = 10_000_000  # resamples x reports held at once in the bootstrap weights


# ----------------------------------------------------------------------------------------------
# Comparing labelers
# ----------------------------------------------------------------------------------------------


def _cell_status_indicators(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Per-report one-hot counts [N, 13, 3 kinds (tp, gold, pred), 3 statuses] for the bootstrap."""
    scored = SCORED_INDICES.reshape(1, 1, N_SCORED)
    is_gold = gold[..., None] == scored
    is_pred = pred[..., None] == scored
    return np.stack([is_gold & is_pred, is_gold, is_pred], axis=2).astype(np.float64)


def _macro_f1_from_counts(true_pos: np.ndarray, gold_pos: np.ndarray, pred_pos: np.ndarray) -> np.ndarray:
    """Macro F1 [...] over findings with support, from per-status counts [..., 13, 3]."""
    return _mean_defined(_finding_scores(true_pos, gold_pos, pred_pos)["f1"])


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
    ids: list[str], pred_a: np.ndarray, pred_b: np.ndarray, gold: np.ndarray, max_listed: int, scored: np.ndarray
) -> dict[str, Any]:
    """Cells of scored findings where two labelers differ: total, count per finding and the first
    ``max_listed`` (ids only)."""
    rows, cols = np.nonzero((pred_a != pred_b) & scored)
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
        "by_finding": {f: n for f, n, kept in zip(FINDINGS, by_finding.tolist(), scored, strict=True) if kept},
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
    findings: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Compare labelers on the same gold (section 5 significance), the first against each other one,
    over the ``findings`` the gold codes (default all 13; see `compute_metrics`).

    Returns keys ``n_reports``, ``findings_not_scored``, ``labelers`` ({name: {macro_f1, finding_f1:
    {scored finding: f1 | None}, n_unscored_predictions}}) and ``pairs``: a list of {a, b, macro_f1_a,
    macro_f1_b, difference (a - b), n_findings, t_test: {statistic, p_value}, wilcoxon: {statistic,
    p_value}, bootstrap: {n_resamples, seed, confidence, ci_low, ci_high}, disagreements: {n_total,
    by_finding, first: [{report_id, finding, status_a, status_b, gold}]}}. Tests that are undefined
    (identical F1s, fewer than two findings) give None.
    """
    if len(labelers) < 2:
        raise ValueError("compare_labelers needs at least two labelers")
    if n_bootstrap < 1:
        raise ValueError("n_bootstrap must be at least 1")
    scored = _scored_mask(findings)
    ids = _gold_ids(gold)
    gold_matrix = _encode_statuses("gold", gold, ids)
    preds = {name: _encode_labeler(name, labels, ids) for name, labels in labelers.items()}
    finding_f1 = {name: np.where(scored, _finding_f1(pred, gold_matrix), np.nan) for name, pred in preds.items()}
    summary = {
        name: {
            "macro_f1": _optional(_mean_defined(finding_f1[name])),
            "finding_f1": {
                f: _optional(v) for f, v, kept in zip(FINDINGS, finding_f1[name], scored, strict=True) if kept
            },
            "n_unscored_predictions": _n_unscored(labelers[name], gold),
        }
        for name in labelers
    }
    indicators = {
        name: _cell_status_indicators(pred, gold_matrix) * scored[None, :, None, None] for name, pred in preds.items()
    }
    pairs = [
        {
            "a": a,
            "b": b,
            "macro_f1_a": summary[a]["macro_f1"],
            "macro_f1_b": summary[b]["macro_f1"],
            "difference": _difference(summary[a]["macro_f1"], summary[b]["macro_f1"]),
            **_paired_finding_tests(finding_f1[a], finding_f1[b]),
            "bootstrap": _bootstrap_difference(indicators[a], indicators[b], n_bootstrap, seed),
            "disagreements": _disagreements(ids, preds[a], preds[b], gold_matrix, max_disagreements, scored),
        }
        for a, b in _labeler_pairs(list(labelers), all_pairs)
    ]
    return {"n_reports": len(ids), "findings_not_scored": _not_scored(scored), "labelers": summary, "pairs": pairs}


# ----------------------------------------------------------------------------------------------
# Text table
# ----------------------------------------------------------------------------------------------


def _labeler_f1_table(labelers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per-finding F1 of each labeler side by side (paper Table II) for the scored findings, Macro F1 last."""
    names = list(labelers)
    width = max(len(f) for f in FINDINGS)
    col = max(10, *(len(n) + 2 for n in names))
    lines = [f"{'Finding':<{width}}" + "".join(f"{n:>{col}}" for n in names)]
    for finding in labelers[names[0]]["finding_f1"]:
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
    lines = [
        f"Reports: {comparison['n_reports']}",
        "",
        *_labeler_f1_table(comparison["labelers"]),
        *_not_scored_lines(comparison.get("findings_not_scored", ())),
    ]
    for pair in comparison["pairs"]:
        lines += ["", *_pair_lines(pair)]
    return "\n".join(lines)
