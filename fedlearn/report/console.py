"""A report printed as rich tables (rich is imported when printing, not with this module)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fedlearn.report.summary import MetricSummary, Report

if TYPE_CHECKING:
    from rich.console import Console
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
