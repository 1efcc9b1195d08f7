"""Per-client evaluation reports for a recorded run.

A run's aggregate metric hides the clients it serves badly, so the report keeps the
per-client view: for every round and every numeric evaluation metric it gives the
``num_examples``-weighted mean over the clients that evaluated, the worst client (its
id and value), and the 10th/50th/90th percentiles over clients. It also lists every
client failure (round, stage, client, error) and every failed round.

:func:`summarize` reads a :class:`~fedlearn.store.RunStore` into a :class:`Report`;
:func:`write_report` writes ``report.json``, ``clients.csv``, ``rounds.csv`` and two
plots into a run directory; :func:`print_report` prints the report as rich tables.
Importing this module loads neither matplotlib nor rich; the functions that need them
import them when called.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedlearn.coordinator import ClientRecord
from fedlearn.messages import Stage
from fedlearn.records import Scalar
from fedlearn.store import RunStore

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.console import Console
    from rich.text import Text

__all__ = [
    "CORE_METRICS",
    "LOWER_IS_BETTER",
    "ClientFailure",
    "MetricSummary",
    "Report",
    "ReportFiles",
    "RoundSummary",
    "evaluation_values",
    "lower_is_better",
    "print_report",
    "summarize",
    "write_report",
]

#: Metric names for which a lower value is better (the worst client has the maximum).
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss"})
#: Name endings that also mean "lower is better" (``val_loss``, ``calibration_error``).
_LOWER_SUFFIXES = ("loss", "error")
#: Metrics every report has columns for, in this order, before any user metric.
CORE_METRICS: tuple[str, ...] = ("loss", "accuracy")
PERCENTILES: tuple[float, float, float] = (10.0, 50.0, 90.0)

# Column names of clients.csv that are not metrics; a metric of the same name gets a prefix.
_CLIENT_COLUMNS = ("round", "stage", "client_id", "ok", "num_examples", "loss")
_CLIENT_TAIL = ("error",)
_STAGE_ORDER = {stage: i for i, stage in enumerate(Stage)}


def lower_is_better(name: str) -> bool:
    """Whether a lower value of metric ``name`` is better (``loss``, ``*loss``, ``*error``)."""
    lowered = name.lower()
    return lowered in LOWER_IS_BETTER or lowered.endswith(_LOWER_SUFFIXES)


@dataclass(frozen=True)
class MetricSummary:
    """One evaluation metric of one round, over the clients that reported a finite value.

    ``worst`` is the maximum for lower-is-better metrics and the minimum otherwise; on a
    tie the client with the smallest id is named. ``nonfinite_clients`` lists clients
    whose value was NaN or infinite; they are left out of every number here.
    """

    name: str
    lower_is_better: bool
    clients: int
    num_examples: int
    mean: float
    worst: float
    worst_client: int
    p10: float
    p50: float
    p90: float
    nonfinite_clients: tuple[int, ...] = ()


@dataclass(frozen=True)
class RoundSummary:
    """What happened in one round: stage counts, status and per-metric client statistics.

    ``metrics`` maps a metric name to its summary over the round's successful evaluation
    replies (absent when no client reported it); ``train_metrics`` and ``eval_metrics``
    are the strategy's own aggregates as recorded in the round row.
    """

    round: int
    ok: bool
    error: str | None
    duration_s: float
    train_selected: int
    train_ok: int
    train_failed: int
    eval_selected: int
    eval_ok: int
    eval_failed: int
    metrics: Mapping[str, MetricSummary]
    train_metrics: Mapping[str, Scalar]
    eval_metrics: Mapping[str, Scalar]

    def metric(self, name: str) -> MetricSummary | None:
        """The summary of metric ``name`` in this round, if any client reported it."""
        return self.metrics.get(name)


@dataclass(frozen=True)
class ClientFailure:
    """A client that failed a task, and why."""

    round: int
    stage: Stage
    client_id: int
    error: str


@dataclass(frozen=True)
class Report:
    """A run's per-round, per-client evaluation summary.

    ``clients`` holds every client row (training and evaluation) in round, stage
    (train, then evaluate) and client order; ``metric_names`` are the evaluation
    metrics summarized (``loss`` and ``accuracy`` first, then user metrics by name).
    """

    run_id: str
    status: str
    seed: int | None
    created: float | None
    config: Mapping[str, Any]
    metric_names: tuple[str, ...]
    rounds: tuple[RoundSummary, ...]
    failures: tuple[ClientFailure, ...]
    clients: tuple[ClientRecord, ...] = field(repr=False)

    @property
    def failed_rounds(self) -> tuple[int, ...]:
        """The rounds whose update was not applied."""
        return tuple(r.round for r in self.rounds if not r.ok)

    @property
    def ok(self) -> bool:
        """Whether the run finished with every round applied (client failures allowed)."""
        return self.status == "finished" and not self.failed_rounds


@dataclass(frozen=True)
class ReportFiles:
    """The files :func:`write_report` wrote, and the report they hold."""

    report: Report = field(repr=False)
    report_json: Path
    clients_csv: Path
    rounds_csv: Path
    metrics_png: Path
    clients_png: Path


# --------------------------------------------------------------------------- summary


def evaluation_values(record: ClientRecord) -> dict[str, float]:
    """The numeric evaluation values of one client row: ``loss`` plus numeric metrics.

    ``record.loss`` wins over a metric called ``loss``; booleans and strings are skipped.
    """
    values = {
        name: float(value)
        for name, value in record.metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    if record.loss is not None:
        values["loss"] = float(record.loss)
    return values


def summarize(store: RunStore) -> Report:
    """Summarize the run recorded in ``store``: per-round client statistics and failures.

    A run still in progress gives the rounds committed so far.
    """
    info = store.run_info()
    # Rounds first: client rows of a round committed after this read are left out.
    round_records = store.rounds()
    known = {r.round for r in round_records}
    clients = tuple(sorted((c for c in store.clients() if c.round in known), key=_client_order))
    evaluated: dict[int, list[ClientRecord]] = {}
    for record in clients:
        if record.stage is Stage.EVALUATE and record.ok:
            evaluated.setdefault(record.round, []).append(record)
    names = _metric_names(r for rows in evaluated.values() for r in rows)
    rounds = tuple(
        RoundSummary(
            round=r.round,
            ok=r.ok,
            error=r.error,
            duration_s=r.duration_s,
            train_selected=r.train_selected,
            train_ok=r.train_ok,
            train_failed=max(r.train_selected - r.train_ok, 0),
            eval_selected=r.eval_selected,
            eval_ok=r.eval_ok,
            eval_failed=max(r.eval_selected - r.eval_ok, 0),
            metrics=_round_metrics(evaluated.get(r.round, []), names),
            train_metrics=dict(r.train_metrics),
            eval_metrics=dict(r.eval_metrics),
        )
        for r in round_records
    )
    failures = tuple(
        ClientFailure(c.round, c.stage, c.client_id, c.error or "unknown error")
        for c in clients
        if not c.ok
    )
    seed = info.get("seed")
    created = info.get("created")
    return Report(
        run_id=store.run_id,
        status=str(info.get("status", "unknown")),
        seed=int(seed) if seed is not None else None,
        created=float(created) if created is not None else None,
        config=dict(info.get("config", {})),
        metric_names=names,
        rounds=rounds,
        failures=failures,
        clients=clients,
    )


def _client_order(record: ClientRecord) -> tuple[int, int, int]:
    return record.round, _STAGE_ORDER[record.stage], record.client_id


def _metric_names(records: Iterable[ClientRecord]) -> tuple[str, ...]:
    found: set[str] = set()
    for record in records:
        found.update(evaluation_values(record))
    return CORE_METRICS + tuple(sorted(found - set(CORE_METRICS)))


def _round_metrics(
    records: Sequence[ClientRecord], names: Sequence[str]
) -> dict[str, MetricSummary]:
    columns: dict[str, list[tuple[int, int, float]]] = {}
    for record in records:
        for name, value in evaluation_values(record).items():
            columns.setdefault(name, []).append((record.client_id, record.num_examples, value))
    out: dict[str, MetricSummary] = {}
    for name in names:
        summary = metric_summary(name, columns.get(name, []))
        if summary is not None:
            out[name] = summary
    return out


def metric_summary(name: str, rows: Sequence[tuple[int, int, float]]) -> MetricSummary | None:
    """Summarize ``(client_id, num_examples, value)`` rows of one metric (None if no
    value is finite)."""
    finite = [row for row in rows if math.isfinite(row[2])]
    nonfinite = tuple(cid for cid, _, value in rows if not math.isfinite(value))
    if not finite:
        return None
    ids = [cid for cid, _, _ in finite]
    weights = np.array([max(n, 0) for _, n, _ in finite], dtype=np.float64)
    values = np.array([v for _, _, v in finite], dtype=np.float64)
    total = float(weights.sum())
    mean = float(weights @ values / total) if total > 0 else float(values.mean())
    lower = lower_is_better(name)
    worst = int(np.argmax(values)) if lower else int(np.argmin(values))
    p10, p50, p90 = (float(p) for p in np.percentile(values, PERCENTILES))
    return MetricSummary(
        name=name,
        lower_is_better=lower,
        clients=len(finite),
        num_examples=int(total),
        mean=mean,
        worst=float(values[worst]),
        worst_client=ids[worst],
        p10=p10,
        p50=p50,
        p90=p90,
        nonfinite_clients=nonfinite,
    )


# --------------------------------------------------------------------------- files


def write_report(store: RunStore, out_dir: Path) -> ReportFiles:
    """Summarize ``store`` and write the report files into ``out_dir`` (created if missing).

    Writes ``report.json`` (the summary, failures and every client row; NaN and infinite
    values become ``null``), ``clients.csv`` (one row per round, stage and client),
    ``rounds.csv`` (one row per round), ``metrics_per_round.png`` and
    ``clients_per_round.png``. Each file is written to a temporary name and renamed.
    """
    report = summarize(store)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(
        report=report,
        report_json=out_dir / "report.json",
        clients_csv=out_dir / "clients.csv",
        rounds_csv=out_dir / "rounds.csv",
        metrics_png=out_dir / "metrics_per_round.png",
        clients_png=out_dir / "clients_per_round.png",
    )
    _write_atomic(files.report_json, _report_json(report).encode())
    _write_atomic(files.clients_csv, _csv_bytes(*_client_table(report)))
    _write_atomic(files.rounds_csv, _csv_bytes(*_round_table(report)))
    _write_atomic(files.metrics_png, _plot_metrics(report))
    _write_atomic(files.clients_png, _plot_clients(report))
    return files


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Stage):
        return value.value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _report_json(report: Report) -> str:
    body = asdict(report)
    run = {key: body.pop(key) for key in ("run_id", "status", "seed", "created", "config")}
    document = {
        "run": run,
        "ok": report.ok,
        "failed_rounds": list(report.failed_rounds),
        "lower_is_better": [name for name in report.metric_names if lower_is_better(name)],
        **body,
    }
    return json.dumps(_jsonable(document), indent=2, allow_nan=False) + "\n"


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Stage):
        return value.value
    return str(value)


def _csv_bytes(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_csv_cell(v) for v in row] for row in rows)
    return buffer.getvalue().encode()


def _client_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    names = sorted({name for record in report.clients for name in record.metrics})
    reserved = set(_CLIENT_COLUMNS) | set(_CLIENT_TAIL)
    header = [
        *_CLIENT_COLUMNS,
        *(f"metric:{n}" if n in reserved else n for n in names),
        *_CLIENT_TAIL,
    ]
    rows = [
        [
            c.round,
            c.stage,
            c.client_id,
            c.ok,
            c.num_examples,
            c.loss,
            *(c.metrics.get(name) for name in names),
            c.error,
        ]
        for c in report.clients
    ]
    return header, rows


_METRIC_FIELDS = ("mean", "worst", "worst_client", "p10", "p50", "p90", "clients")


def _round_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    header = [
        "round",
        "ok",
        "error",
        "duration_s",
        "train_selected",
        "train_ok",
        "train_failed",
        "eval_selected",
        "eval_ok",
        "eval_failed",
        *(f"{name}_{f}" for name in report.metric_names for f in _METRIC_FIELDS),
    ]
    rows: list[list[Any]] = []
    for r in report.rounds:
        row: list[Any] = [
            r.round,
            r.ok,
            r.error,
            r.duration_s,
            r.train_selected,
            r.train_ok,
            r.train_failed,
            r.eval_selected,
            r.eval_ok,
            r.eval_failed,
        ]
        for name in report.metric_names:
            summary = r.metric(name)
            row.extend(getattr(summary, f) if summary is not None else None for f in _METRIC_FIELDS)
        rows.append(row)
    return header, rows


# --------------------------------------------------------------------------- plots


def _pyplot() -> Any:
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


def _plot_metrics(report: Report) -> bytes:
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
                ax.text(
                    0.5,
                    0.5,
                    f"no {name} reported",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    color="gray",
                )
            ax.set_ylabel(name)
            _round_axis(ax, report)
        axes[-1].set_xlabel("round")
        fig.suptitle(f"Run {report.run_id}: evaluation over clients per round")
        _figure_legend(fig, axes)
        return _png(fig)
    finally:
        plt.close(fig)


def _plot_clients(report: Report) -> bytes:
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
            ax.text(
                0.5,
                0.5,
                f"no {name} reported",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="gray",
            )
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        _round_axis(ax, report)
        ax.set_title(f"Run {report.run_id}: {name} of each client per round")
        _figure_legend(fig, [ax])
        return _png(fig)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- terminal


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.4f}"
    return f"{value:.3e}"


def _worst(summary: MetricSummary | None) -> str:
    if summary is None:
        return "-"
    return f"{_number(summary.worst)} (#{summary.worst_client})"


_ROUND_HEADERS = (
    "round",
    "status",
    "train",
    "eval",
    "acc\nmean",
    "acc worst\n(client)",
    "acc\np10",
    "acc\np50",
    "acc\np90",
    "loss\nmean",
    "loss worst\n(client)",
)


def print_report(report: Report, console: Console | None = None, max_failures: int = 50) -> None:
    """Print ``report`` as rich tables: rounds, failed rounds, client failures, run status.

    At most ``max_failures`` client failures are listed; the rest are counted (all of
    them are in ``report.json`` and ``clients.csv``).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console if console is not None else Console()
    plain: dict[str, Any] = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False}
    table = Table(
        title=Text(f"Run {report.run_id}: evaluation per round"),
        caption=Text("train/eval: ok/selected clients; worst: value (client id)"),
        collapse_padding=True,
        **plain,
        # One space between columns in a narrow terminal, so 80 columns hold the table.
        padding=(0, 1) if console.width >= 100 else (0, 0),
    )
    for header in _ROUND_HEADERS:
        justify: Literal["left", "right"] = "left" if header == "status" else "right"
        # A "worst (client)" cell may wrap onto two lines; no number is ever cut short.
        table.add_column(header, justify=justify, overflow="fold", min_width=6)
    for r in report.rounds:
        acc, loss = r.metric("accuracy"), r.metric("loss")
        table.add_row(
            str(r.round),
            Text("ok", style="green") if r.ok else Text("FAILED", style="bold red"),
            Text(f"{r.train_ok}/{r.train_selected}", style="red" if r.train_failed else ""),
            Text(f"{r.eval_ok}/{r.eval_selected}", style="red" if r.eval_failed else "")
            if r.eval_selected
            else "-",
            _number(acc.mean if acc else None),
            _worst(acc),
            _number(acc.p10 if acc else None),
            _number(acc.p50 if acc else None),
            _number(acc.p90 if acc else None),
            _number(loss.mean if loss else None),
            _worst(loss),
        )
    if report.rounds:
        console.print(table)
    else:
        console.print(Text(f"Run {report.run_id}: no rounds recorded", style="yellow"))

    for r in report.rounds:
        for s in r.metrics.values():
            if s.nonfinite_clients:
                ids = ", ".join(f"#{c}" for c in s.nonfinite_clients)
                console.print(
                    Text(
                        f"round {r.round}: {s.name} is NaN or infinite for "
                        f"client(s) {ids}; left out of the statistics",
                        style="yellow",
                    )
                )

    failed = [r for r in report.rounds if not r.ok]
    if failed:
        rounds_table = Table(title=Text("Failed rounds"), **plain)
        rounds_table.add_column("round", justify="right")
        rounds_table.add_column("error", overflow="fold")
        for r in failed:
            rounds_table.add_row(str(r.round), Text(r.error or "unknown error"))
        console.print(rounds_table)

    if report.failures:
        failures = Table(title=Text(f"Client failures ({len(report.failures)})"), **plain)
        failures.add_column("round", justify="right")
        failures.add_column("stage")
        failures.add_column("client", justify="right")
        failures.add_column("error", overflow="fold")
        for f in report.failures[: max(max_failures, 0)]:
            failures.add_row(str(f.round), f.stage.value, str(f.client_id), Text(f.error))
        console.print(failures)
        hidden = len(report.failures) - max(max_failures, 0)
        if hidden > 0:
            console.print(Text(f"... and {hidden} more client failures (see report.json)"))

    console.print(_status_line(report))


def _status_line(report: Report) -> Text:
    from rich.text import Text

    failed = report.failed_rounds
    parts = [f"{len(report.rounds)} rounds"]
    if failed:
        shown = ", ".join(str(r) for r in failed[:10]) + (", ..." if len(failed) > 10 else "")
        parts.append(f"{len(failed)} failed ({shown})")
    parts.append(f"{len(report.failures)} client failures")
    style = (
        "bold green"
        if report.ok
        else "bold red"
        if failed or report.status == "failed"
        else "bold yellow"
    )
    return Text(f"Run {report.run_id}: {report.status} - " + ", ".join(parts), style=style)
