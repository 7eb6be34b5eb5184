"""Agreement between two teachers on the same reports, so a user sees where the LLM and the rules differ.

Cross-tabs come from ``deberta_rad.plots`` and Cohen's kappa from ``deberta_rad.metrics`` (the same
counting the metrics use), with teacher ``a`` in the rows and teacher ``b`` in the columns. Reports only
one teacher labelled are counted and listed, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deberta_rad.metrics import cohen_kappa
from deberta_rad.plots import confusion_matrices
from deberta_rad.schema import FINDINGS, STATUSES

Labels = Mapping[str, Mapping[str, str]]
MAX_IDS_SHOWN = 5


def _most_common_disagreement(crosstab: np.ndarray) -> dict[str, Any] | None:
    """The largest off-diagonal cell as {a, b, count}; None when the teachers never differ."""
    off_diagonal = crosstab * (1 - np.eye(len(STATUSES), dtype=crosstab.dtype))
    row, col = np.unravel_index(int(np.argmax(off_diagonal)), off_diagonal.shape)
    count = int(off_diagonal[row, col])
    return None if count == 0 else {"a": STATUSES[row], "b": STATUSES[col], "count": count}


def _crosstab_summary(crosstab: np.ndarray) -> dict[str, Any]:
    """Agreement share, kappa, disagreement count and the 4x4 counts of one cross-tab."""
    total = int(crosstab.sum())
    agreeing = int(np.trace(crosstab))
    return {
        "agreement": agreeing / total,
        "kappa": cohen_kappa(crosstab),
        "n_disagreements": total - agreeing,
        "most_common_disagreement": _most_common_disagreement(crosstab),
        "crosstab": crosstab.tolist(),
    }


def _per_status(pooled: np.ndarray) -> dict[str, dict[str, Any]]:
    """How often each teacher gives each status, and their specific agreement 2*both / (n_a + n_b)."""
    result = {}
    for i, status in enumerate(STATUSES):
        n_a, n_b, both = int(pooled[i].sum()), int(pooled[:, i].sum()), int(pooled[i, i])
        specific = 2 * both / (n_a + n_b) if n_a + n_b else None
        result[status] = {"n_a": n_a, "n_b": n_b, "both": both, "specific_agreement": specific}
    return result


def teacher_agreement(a: Labels, b: Labels) -> dict[str, Any]:
    """Compare two teachers' labels ``{report_id: {finding: status}}`` on the reports both labelled.

    Returns ``statuses`` (cross-tab order), ``n_reports``, ``n_cells``, ``only_in_a``/``only_in_b``
    (report ids), overall ``agreement``, ``kappa`` (None when undefined), ``crosstab`` (pooled 4x4,
    a rows, b columns), ``per_status`` and ``per_finding`` ({finding: {agreement, kappa,
    n_disagreements, most_common_disagreement: {a, b, count} | None, crosstab}}).
    Raises ValueError when no report is shared or a record lacks a finding or has an unknown status.
    """
    shared = [rid for rid in a if rid in b]
    if not shared:
        raise ValueError(f"the two teachers share no report ids ({len(a)} vs {len(b)} reports)")
    crosstabs = confusion_matrices({rid: b[rid] for rid in shared}, {rid: a[rid] for rid in shared})
    per_finding_tabs = {finding: np.asarray(crosstabs[finding], dtype=np.int64) for finding in FINDINGS}
    pooled = np.sum(list(per_finding_tabs.values()), axis=0)
    overall = _crosstab_summary(pooled)
    return {
        "statuses": list(STATUSES),
        "n_reports": len(shared),
        "n_cells": int(pooled.sum()),
        "only_in_a": [rid for rid in a if rid not in b],
        "only_in_b": [rid for rid in b if rid not in a],
        "agreement": overall["agreement"],
        "kappa": overall["kappa"],
        "crosstab": overall["crosstab"],
        "per_status": _per_status(pooled),
        "per_finding": {finding: _crosstab_summary(tab) for finding, tab in per_finding_tabs.items()},
    }


def _ids_line(name: str, ids: Sequence[str]) -> str:
    """How many reports only one teacher labelled, with the first few ids."""
    if not ids:
        return f"only in {name}: 0"
    more = f" and {len(ids) - MAX_IDS_SHOWN} more" if len(ids) > MAX_IDS_SHOWN else ""
    return f"only in {name}: {len(ids)} ({', '.join(ids[:MAX_IDS_SHOWN])}{more})"


def _kappa_text(kappa: float | None) -> str:
    return "n/a" if kappa is None else f"{kappa:.3f}"


def _disagreement_text(disagreement: Mapping[str, Any] | None) -> str:
    """Like ``present→absent: 12``, or a dash when the teachers always agree."""
    if disagreement is None:
        return "-"
    return f"{disagreement['a']}→{disagreement['b']}: {disagreement['count']}"


def _finding_rows(result: Mapping[str, Any], name_a: str, name_b: str) -> list[str]:
    width = max(len(f) for f in FINDINGS)
    lines = [f"{'Finding':<{width}}  {'Agree':>7}  {'Kappa':>6}  {'Differ':>6}  Most common ({name_a}→{name_b})"]
    for finding, row in result["per_finding"].items():
        lines.append(
            f"{finding:<{width}}  {row['agreement']:>7.1%}  {_kappa_text(row['kappa']):>6}  "
            f"{row['n_disagreements']:>6}  {_disagreement_text(row['most_common_disagreement'])}"
        )
    return lines


def _status_rows(result: Mapping[str, Any], name_a: str, name_b: str) -> list[str]:
    col = max(8, len(name_a) + 2, len(name_b) + 2)
    lines = [f"{'Status':<14}{name_a:>{col}}{name_b:>{col}}{'both':>{col}}  Specific agreement"]
    for status, row in result["per_status"].items():
        specific = "n/a" if row["specific_agreement"] is None else f"{row['specific_agreement']:.1%}"
        lines.append(f"{status:<14}{row['n_a']:>{col}}{row['n_b']:>{col}}{row['both']:>{col}}  {specific}")
    return lines


def _crosstab_rows(result: Mapping[str, Any], name_a: str, name_b: str) -> list[str]:
    statuses = result["statuses"]
    lines = [
        f"Cells, {name_a} (rows) × {name_b} (columns):",
        f"{'':<14}" + "".join(f"{s:>15}" for s in statuses),
    ]
    for status, counts in zip(statuses, result["crosstab"], strict=True):
        lines.append(f"{status:<14}" + "".join(f"{c:>15}" for c in counts))
    return lines


def format_agreement_table(result: Mapping[str, Any], name_a: str, name_b: str) -> str:
    """Readable report of :func:`teacher_agreement`: overall, per finding, per status, pooled cross-tab."""
    header = [
        f"Teacher agreement, {name_a} vs {name_b}: {result['n_reports']} shared reports, {result['n_cells']} cells",
        f"{_ids_line(name_a, result['only_in_a'])}; {_ids_line(name_b, result['only_in_b'])}",
        f"Overall agreement {result['agreement']:.1%}, Cohen's kappa {_kappa_text(result['kappa'])}",
    ]
    sections = [
        header,
        _finding_rows(result, name_a, name_b),
        _status_rows(result, name_a, name_b),
        _crosstab_rows(result, name_a, name_b),
    ]
    return "\n\n".join("\n".join(section) for section in sections)
