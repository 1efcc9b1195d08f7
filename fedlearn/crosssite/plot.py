"""The cross-site heatmap: each model's metric at each site, and its per-site delta
against a baseline model.

matplotlib (the ``report`` extra) is imported when the plot is drawn; without it the
evaluation writes its CSV and JSON files and says the PNG was skipped.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedlearn.crosssite.matrix import SiteMatrix
from fedlearn.report.plots import _png, _pyplot, can_plot
from fedlearn.report.summary import lower_is_better

#: The note an evaluation carries when its heatmap was not drawn.
HEATMAP_SKIPPED = "heatmap skipped: install fedlearn[report]"

_ANNOTATE_CELLS = 400  # values written into the cells up to this many per panel


def plot_matrix(matrix: SiteMatrix, baseline: str, metric: str | None = None) -> bytes:
    """A PNG: left, ``metric`` (default ``accuracy``, else the first one) per model and
    site; right, each model's value minus ``baseline``'s at every site, coloured so that
    better is blue and worse is red whichever way the metric points."""
    plt = _pyplot()
    names = matrix.metrics()
    name = metric or next(iter(names), "accuracy")
    labels = [e.label for e in matrix.entries]
    sites = list(matrix.sites.items())
    values = np.full((len(labels), len(sites)), np.nan)
    for i, label in enumerate(labels):
        for j, (cid, _) in enumerate(sites):
            v = matrix.value(label, cid, name)
            if v is not None and math.isfinite(v):
                values[i, j] = v
    base = values[labels.index(baseline)] if baseline in labels else np.full(len(sites), np.nan)
    deltas = values - base
    # RdBu runs from red (low) to blue (high): a gain of a higher-is-better metric is
    # blue; for a lower-is-better one ("_r") a drop is
    lower = lower_is_better(name)
    width = min(max(9.0, 0.5 * len(sites) * 2 + 4), 40.0)
    height = min(max(3.5, 0.4 * len(labels) + 2), 30.0)
    fig, axes = plt.subplots(1, 2, figsize=(width, height), layout="constrained")
    try:
        _panel(
            fig,
            axes[0],
            values,
            labels,
            sites,
            cmap="viridis_r" if lower else "viridis",
            title=f"{name} at each site",
        )
        limit = float(np.nanmax(np.abs(deltas))) if np.isfinite(deltas).any() else 1.0
        _panel(
            fig,
            axes[1],
            deltas,
            labels,
            sites,
            cmap="RdBu_r" if lower else "RdBu",
            title=f"{name} minus {baseline}, per site",
            vmin=-(limit or 1.0),
            vmax=limit or 1.0,
            signed=True,
        )
        axes[1].set_yticklabels([])
        fig.suptitle(f"Cross-site evaluation {matrix.evaluation}")
        return _png(fig)
    finally:
        plt.close(fig)


def _panel(
    fig: Any,
    ax: Any,
    values: np.ndarray,
    labels: list[str],
    sites: list[tuple[int, str]],
    *,
    cmap: str,
    title: str,
    vmin: float | None = None,
    vmax: float | None = None,
    signed: bool = False,
) -> None:
    shown = np.ma.masked_invalid(values)
    image = ax.imshow(shown, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(len(sites)), [site for _, site in sites], fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set_xlabel("site")
    ax.set_title(title, fontsize="medium")
    if values.size <= _ANNOTATE_CELLS:
        for (i, j), v in np.ndenumerate(values):
            text = "-" if not math.isfinite(v) else (f"{v:+.2f}" if signed else f"{v:.2f}")
            r, g, b, _ = image.cmap(image.norm(v)) if math.isfinite(v) else (1, 1, 1, 1)
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, text, ha="center", va="center", fontsize="x-small", color=ink)


__all__ = ["HEATMAP_SKIPPED", "can_plot", "plot_matrix"]
