"""Confusion matrices of a labeler against gold and their plots: per-finding 4x4 counts, a PNG grid
of heatmaps, and the per-finding `{actual, predicted}` files DVC's confusion template draws.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from deberta_rad.metrics import N_STATUSES, Labels, _aligned_matrices, _confusion, _safe_divide
from deberta_rad.schema import FINDINGS, STATUSES


def confusion_matrices(predictions: Labels, gold: Labels) -> dict[str, list[list[int]]]:
    """Per-finding 4x4 counts, gold status rows x predicted status columns, in STATUSES order."""
    _, pred, gold_matrix = _aligned_matrices(predictions, gold)
    return {f: cm.tolist() for f, cm in zip(FINDINGS, _confusion(pred, gold_matrix), strict=True)}


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


# Each cell of DVC's confusion data as JSON (gold status row x predicted status column), made once.
CELL_JSON = [[json.dumps({"actual": actual, "predicted": predicted}) for predicted in STATUSES] for actual in STATUSES]


def write_confusion_plots(predictions: Labels, gold: Labels, out_dir: Path) -> None:
    """One `{actual, predicted}` file per finding, one entry per report, the data DVC's `confusion`
    template draws (dvc.yaml declares the folder), so `dvc plots diff` shows each finding's matrix for two
    versions side by side. Written an entry at a time: a split's cells are never all held as objects."""
    _, pred, gold_matrix = _aligned_matrices(predictions, gold)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f, finding in enumerate(FINDINGS):
        cells = (CELL_JSON[g][p] for g, p in zip(gold_matrix[:, f].tolist(), pred[:, f].tolist(), strict=True))
        with (out_dir / f"{finding.lower().replace(' ', '_')}.json").open("w", encoding="utf-8") as out:
            out.write("[")
            for i, cell in enumerate(cells):
                out.write(f", {cell}" if i else cell)
            out.write("]")
