"""The report's two PNG plots: metrics per round, and every client's value per round.

matplotlib (the ``report`` extra) is imported when a plot is drawn, not with this module;
:func:`can_plot` tells whether it is installed."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.config.extras import extra_message, has_extra
from fedlearn.engine.messages import Stage
from fedlearn.errors import ConfigError
from fedlearn.report.atomic import write_atomic
from fedlearn.report.summary import Report, evaluation_values

if TYPE_CHECKING:
    from matplotlib.axes import Axes


#: The note a report carries when its plots were not drawn.
PLOTS_SKIPPED = "plots skipped: install fedlearn[report]"


def can_plot() -> bool:
    """Whether matplotlib (the ``report`` extra) is installed."""
    return has_extra("report")


def _pyplot() -> Any:
    if not can_plot():
        raise ConfigError(extra_message("report", "drawing a report's plots"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _shade_failed_rounds(ax: Axes, report: Report) -> None:
    for i, rnd in enumerate(report.failed_rounds):
        label = "failed round" if i == 0 else None
        ax.axvspan(rnd - 0.5, rnd + 0.5, color="tab:red", alpha=0.12, label=label)


def _round_axis(ax: Axes, report: Report) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if report.rounds:
        ax.set_xlim(report.rounds[0].round - 0.6, report.rounds[-1].round + 0.6)
    ax.grid(alpha=0.3)


def _figure_legend(fig: Any, axes: Iterable[Axes]) -> None:
    """One legend for the figure, right of the plots, each label once."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside right upper", fontsize="small")


def plot_metrics(report: Report) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True, layout="constrained")
    try:
        for ax, name in zip(axes, ("accuracy", "loss"), strict=True):
            points = [(r.round, r.metrics[name]) for r in report.rounds if name in r.metrics]
            _shade_failed_rounds(ax, report)
            if points:
                xs = [rnd for rnd, _ in points]
                ax.fill_between(
                    xs,
                    [s.p10 for _, s in points],
                    [s.p90 for _, s in points],
                    alpha=0.25,
                    color="tab:blue",
                    label="p10-p90 over clients",
                )
                ax.plot(
                    xs, [s.mean for _, s in points], "o-", color="tab:blue", label="weighted mean"
                )
                ax.plot(
                    xs,
                    [s.p50 for _, s in points],
                    "--",
                    color="tab:blue",
                    alpha=0.7,
                    label="median client",
                )
                ax.plot(
                    xs, [s.worst for _, s in points], "v:", color="tab:red", label="worst client"
                )
            else:
                _nothing_reported(ax, name)
            ax.set_ylabel(name)
            _round_axis(ax, report)
        axes[-1].set_xlabel("round")
        fig.suptitle(f"Run {report.run_id}: evaluation over clients per round")
        _figure_legend(fig, axes)
        return _png(fig)
    finally:
        plt.close(fig)


def plot_clients(report: Report) -> bytes:
    plt = _pyplot()
    with_data = [
        n for n in ("accuracy", *report.metric_names) if any(n in r.metrics for r in report.rounds)
    ]
    name = with_data[0] if with_data else "accuracy"
    per_round: dict[int, list[tuple[int, float]]] = {}
    for record in report.clients:
        if record.stage is Stage.EVALUATE and record.ok:
            value = evaluation_values(record).get(name)
            if value is not None and math.isfinite(value):
                per_round.setdefault(record.round, []).append((record.client_id, value))
    width = min(max(8.0, 0.45 * len(report.rounds)), 40.0)
    fig, ax = plt.subplots(figsize=(width, 5), layout="constrained")
    try:
        _shade_failed_rounds(ax, report)
        rounds = sorted(per_round)
        if rounds:
            ax.boxplot(
                [[v for _, v in per_round[rnd]] for rnd in rounds],
                positions=rounds,
                widths=0.6,
                showfliers=False,
                manage_ticks=False,
            )
            for rnd in rounds:
                points = per_round[rnd]
                offsets = np.linspace(-0.22, 0.22, len(points)) if len(points) > 1 else [0.0]
                ax.scatter(
                    [rnd + o for o in offsets],
                    [v for _, v in points],
                    s=14,
                    alpha=0.6,
                    color="tab:blue",
                    zorder=3,
                    label="one client",
                )
            worst = [(r.round, r.metrics[name]) for r in report.rounds if name in r.metrics]
            ax.scatter(
                [rnd for rnd, _ in worst],
                [s.worst for _, s in worst],
                s=40,
                marker="v",
                color="tab:red",
                zorder=4,
                label="worst client",
            )
            for rnd, s in worst:
                ax.annotate(
                    f"c{s.worst_client}",
                    (rnd, s.worst),
                    textcoords="offset points",
                    xytext=(6, -4),
                    fontsize="x-small",
                    color="tab:red",
                )
            ax.plot(
                [rnd for rnd, _ in worst],
                [s.mean for _, s in worst],
                "D",
                color="black",
                markersize=4,
                zorder=4,
                label="weighted mean",
            )
        else:
            _nothing_reported(ax, name)
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        _round_axis(ax, report)
        ax.set_title(f"Run {report.run_id}: {name} of each client per round")
        _figure_legend(fig, [ax])
        return _png(fig)
    finally:
        plt.close(fig)


def plot_privacy(report: Report) -> bytes:
    """ε after each round (differential privacy), with the budget when the run had one."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    try:
        points = [(r.round, r.epsilon) for r in report.rounds if r.epsilon is not None]
        finite = [(x, y) for x, y in points if math.isfinite(y)]
        _shade_failed_rounds(ax, report)
        ax.plot([x for x, _ in finite], [y for _, y in finite], "o-", color="tab:purple", label="ε")
        budget = report.config.get("privacy", {}).get("budget")
        tops = [y for _, y in finite]
        if isinstance(budget, int | float):
            ax.axhline(float(budget), color="tab:red", linestyle="--", label="budget")
            tops.append(float(budget))
        ax.set_xlabel("round")
        ax.set_ylabel(f"ε at δ = {report.delta:g}")
        ax.set_ylim(0, 1.1 * max(tops, default=1.0) or 1.0)
        _round_axis(ax, report)
        ax.set_title(f"Run {report.run_id}: privacy spent (ε) after each round")
        _figure_legend(fig, [ax])
        return _png(fig)
    finally:
        plt.close(fig)


def _nothing_reported(ax: Any, name: str) -> None:
    """A grey note in the middle of an axes that has no data for ``name``."""
    ax.text(
        0.5,
        0.5,
        f"no {name} reported",
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="gray",
    )


PLOTS = {"metrics": plot_metrics, "clients": plot_clients, "privacy": plot_privacy}
"""The report's plots by name, in the order they are drawn."""


def write_plots(report: Report, pngs: Mapping[str, Path]) -> None:
    """Draw the plots ``pngs`` names (``metrics``, ``clients``, ``privacy``) and write
    each to its file."""
    for name, path in pngs.items():
        write_atomic(path, PLOTS[name](report))
