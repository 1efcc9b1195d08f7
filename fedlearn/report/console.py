"""A report printed as rich tables (rich is imported when printing, not with this module)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fedlearn.drift.report import DriftReport, site_name
from fedlearn.report.summary import MetricSummary, Report, RoundSummary

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Column, Table
    from rich.text import Text


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


@dataclass(frozen=True)
class _RoundColumn:
    header: str
    cell: Callable[[RoundSummary], tuple[str, str]]  # (text, style)
    wraps: bool = False  # only "value (#client)" cells may wrap, at the space

    @property
    def name(self) -> str:
        return self.header.replace("\n", " ")


def _plain(text: str) -> tuple[str, str]:
    return text, ""


def _status(r: RoundSummary) -> tuple[str, str]:
    return ("ok", "green") if r.ok else ("FAILED", "bold red")


def _train(r: RoundSummary) -> tuple[str, str]:
    return f"{r.train_ok}/{r.train_selected}", "red" if r.train_failed else ""


def _eval(r: RoundSummary) -> tuple[str, str]:
    if not r.eval_selected:
        return _plain("-")
    return f"{r.eval_ok}/{r.eval_selected}", "red" if r.eval_failed else ""


def _stat(metric: str, stat: str) -> Callable[[RoundSummary], tuple[str, str]]:
    def cell(r: RoundSummary) -> tuple[str, str]:
        summary = r.metric(metric)
        return _plain(_number(None if summary is None else getattr(summary, stat)))

    return cell


def _worst_of(metric: str) -> Callable[[RoundSummary], tuple[str, str]]:
    return lambda r: _plain(_worst(r.metric(metric)))


_ROUND_COLUMNS = (
    _RoundColumn("round", lambda r: _plain(str(r.round))),
    _RoundColumn("status", _status),
    _RoundColumn("train", _train),
    _RoundColumn("eval", _eval),
    _RoundColumn("acc\nmean", _stat("accuracy", "mean")),
    _RoundColumn("acc worst\n(client)", _worst_of("accuracy"), wraps=True),
    _RoundColumn("acc\np10", _stat("accuracy", "p10")),
    _RoundColumn("acc\np50", _stat("accuracy", "p50")),
    _RoundColumn("acc\np90", _stat("accuracy", "p90")),
    _RoundColumn("loss\nmean", _stat("loss", "mean")),
    _RoundColumn("loss worst\n(client)", _worst_of("loss"), wraps=True),
)
_EPSILON_COLUMN = _RoundColumn(
    "ε", lambda r: _plain("-" if r.epsilon is None else f"{r.epsilon:.4g}")
)
# Left out in this order, one at a time, when the table cannot fit the terminal otherwise.
_ROUND_DROP_ORDER = ("acc p10", "acc p90", "loss worst (client)", "acc p50", "eval", "loss mean")
_CAPTION = "train/eval: ok/selected clients; worst: value (client id)"


def print_report(report: Report, console: Console | None = None, max_failures: int = 50) -> None:
    """Print ``report`` as rich tables: rounds, failed rounds, client failures, run status.

    The rounds table fits the terminal: columns are one space apart in a narrow one and,
    if it is still too narrow, the least useful columns are left out (the caption names
    them). At most ``max_failures`` client failures are listed; the rest are counted (all
    of them are in ``report.json`` and ``clients.csv``).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console if console is not None else Console()
    plain: dict[str, Any] = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False}
    if report.rounds:
        console.print(first_fitting(console, _round_tables(report)))
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

    if report.drift is not None:
        _print_drift(report.drift, console)

    if report.config_changes:
        console.print(Text("Config changes on resume:", style="bold"))
        for change in report.config_changes:
            console.print(
                Text(
                    f"  from round {change.round}: {change.field} {change.old!r} -> {change.new!r}"
                )
            )
    console.print(_status_line(report))


def _round_tables(report: Report) -> Iterator[Table]:
    """The rounds table, widest layout first: two spaces between columns, then one, then
    "value (#client)" cells on two lines, then fewer and fewer columns."""
    yield _round_table(report, padding=1, wrap=False, hidden=())
    yield _round_table(report, padding=0, wrap=False, hidden=())
    for n in range(len(_ROUND_DROP_ORDER) + 1):
        yield _round_table(report, padding=0, wrap=True, hidden=_ROUND_DROP_ORDER[:n])


def _round_table(report: Report, padding: int, wrap: bool, hidden: tuple[str, ...]) -> Table:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    caption = _CAPTION + (f"; not shown at this width: {', '.join(hidden)}" if hidden else "")
    if report.epsilon is not None:
        caption += f"; ε at δ = {report.delta:g}"
    table = Table(
        title=Text(f"Run {report.run_id}: evaluation per round"),
        caption=Text(caption),
        collapse_padding=True,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, padding),
    )
    columns = [c for c in _ROUND_COLUMNS if c.name not in hidden]
    if report.epsilon is not None:  # differential privacy: ε after each round
        columns.insert(4, _EPSILON_COLUMN)
    if report.drift is not None:  # drift monitoring: the sites flagged in each round
        columns.insert(4, _drift_column(report.drift))
    for c in columns:
        justify: Literal["left", "right"] = "left" if c.name == "status" else "right"
        table.add_column(c.header, justify=justify, no_wrap=not (wrap and c.wraps))
    for r in report.rounds:
        table.add_row(*(Text(*c.cell(r)) for c in columns))
    return table


def first_fitting(console: Console, tables: Iterable[Table]) -> Table:
    """The first of ``tables`` that fits ``console.width`` without cutting a word (see
    :func:`fit_to_width`); the last one when none does."""
    table = None
    for table in tables:
        if fit_to_width(console, table):
            return table
    if table is None:
        raise ValueError("no table to fit")
    return table


def fit_to_width(console: Console, table: Table) -> bool:
    """Narrow ``table``'s wrapping columns so that it fits ``console.width`` and every
    word of every cell and header stays whole; False (table unchanged) when it cannot.

    Rich shrinks the widest columns first, whatever their longest word; this sets each
    wrapping column's width between its longest word and its longest line instead.
    """
    from rich.measure import Measurement

    wide = console.options.update_width(1 << 16)
    ranges = [_column_range(console, table, column) for column in table.columns]
    lows, highs = [low for low, _ in ranges], [high for _, high in ranges]
    room = console.width - (Measurement.get(console, wide, table).maximum - sum(highs))
    if sum(lows) > room:
        return False
    if sum(highs) > room:
        for column, width in zip(table.columns, _share(lows, highs, room), strict=True):
            column.width = width
    return True


def _column_range(console: Console, table: Table, column: Column) -> tuple[int, int]:
    """(longest word, longest line) over a column's header and cells; a column that does
    not wrap has no shorter width than its longest line."""
    from rich.measure import Measurement

    wide = console.options.update_width(1 << 16)
    cells = [column.header, *column.cells] if table.show_header else list(column.cells)
    sizes = [Measurement.get(console, wide, cell) for cell in cells]
    high = max((m.maximum for m in sizes), default=0)
    low = high if column.no_wrap else max((m.minimum for m in sizes), default=0)
    return low, high


def _share(lows: list[int], highs: list[int], room: int) -> list[int]:
    """Widths between ``lows`` and ``highs`` that add up to ``room`` (>= sum of lows): the
    column with the most to give narrows first, so as few columns as possible wrap."""
    widths = list(highs)
    for i in sorted(range(len(widths)), key=lambda i: highs[i] - lows[i], reverse=True):
        excess = sum(widths) - room
        if excess <= 0:
            break
        widths[i] -= min(excess, highs[i] - lows[i])
    return widths


def _drift_column(drift: DriftReport) -> _RoundColumn:
    def cell(r: RoundSummary) -> tuple[str, str]:
        flagged = drift.flagged_in(r.round)
        if not flagged:
            return "-", ""
        return " ".join(site_name(s) for s in flagged), "bold red"

    return _RoundColumn("drift", cell, wraps=True)


def _print_drift(drift: DriftReport, console: Console) -> None:
    from rich.text import Text

    for s in drift.flagged:
        console.print(
            Text(
                f"drift: round {s.round}, {site_name(s.site)}: PSI {s.psi:.3g}, label PSI "
                f"{s.label_psi:.3g}, mean shift {s.mean_shift:.3g} std against round "
                f"{s.previous_round}",
                style="red",
            )
        )
    if drift.note is not None:
        console.print(Text(f"drift: {drift.note}", style="yellow"))


def _status_line(report: Report) -> Text:
    from rich.text import Text

    failed = report.failed_rounds
    parts = [f"{len(report.rounds)} rounds"]
    if failed:
        shown = ", ".join(str(r) for r in failed[:10]) + (", ..." if len(failed) > 10 else "")
        parts.append(f"{len(failed)} failed ({shown})")
    parts.append(f"{len(report.failures)} client failures")
    if report.epsilon is not None:
        parts.append(f"ε = {report.epsilon:.4g} at δ = {report.delta:g}")
    if report.drift is not None:
        flagged = report.drift.flagged
        parts.append(f"drift flagged {len(flagged)} time{'s' * (len(flagged) != 1)}")
    stops = [e.detail for e in report.history if e.kind == "stopped" and e.detail]
    if stops:
        parts.append(stops[-1])
    resumes = sum(e.kind == "resumed" for e in report.history)
    if resumes:
        parts.append(f"resumed {resumes} time{'s' * (resumes > 1)}")
    style = (
        "bold green"
        if report.ok
        else "bold red"
        if failed or report.status == "failed"
        else "bold yellow"
    )
    return Text(f"Run {report.run_id}: {report.status} - " + ", ".join(parts), style=style)
