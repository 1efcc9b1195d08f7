"""The ``fedlearn`` command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedlearn.config import load_config, parse_assignment
from fedlearn.coordinator import ClientRecord, RoundRecord
from fedlearn.errors import FedlearnError
from fedlearn.messages import Stage
from fedlearn.models_cli import models_app
from fedlearn.security.cli import certs_app, keys_app

if TYPE_CHECKING:
    from fedlearn.publish import Published

app = typer.Typer(
    help="fedlearn: federated learning simulations and deployments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(certs_app, name="certs")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
console = Console()


class ProgressObserver:
    """One progress bar per round stage, and a line per finished round."""

    def __init__(self, progress: Progress, rounds: int) -> None:
        self.progress = progress
        self.rounds = rounds
        self.task: Any = None

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(
            f"round {round}/{self.rounds} {stage.value}", total=num_tasks
        )

    def reply_received(self, record: ClientRecord) -> None:
        self.progress.advance(self.task)

    def round_finished(self, record: RoundRecord) -> None:
        self.describe(record, self.progress.console)

    @staticmethod
    def describe(record: RoundRecord, out: Console) -> None:
        """Print one line summarizing a finished round."""
        acc = record.eval_metrics.get("accuracy")
        loss = record.eval_metrics.get("loss")
        status = "[green]ok[/]" if record.ok else f"[red]failed[/]: {record.error}"
        parts = [
            f"round {record.round}: {status}",
            f"train {record.train_ok}/{record.train_selected}",
        ]
        if record.eval_selected:
            parts.append(f"eval {record.eval_ok}/{record.eval_selected}")
        if isinstance(acc, float):
            parts.append(f"accuracy {acc:.4f}")
        if isinstance(loss, float):
            parts.append(f"loss {loss:.4f}")
        parts.append(f"{record.duration_s:.2f}s")
        out.print("  ".join(parts))


def _print_published(published: Published) -> None:
    v = published.version
    mark = "[green]production[/]" if published.decision.promoted else "[yellow]not promoted[/]"
    console.print(
        f"published {v.name} v{v.version} (round {v.round}) to {v.path.parent.parent}: "
        f"{mark} - {escape(published.decision.reason)}",
        soft_wrap=True,
    )


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def simulate(
    config: Annotated[
        Path | None, typer.Argument(help="TOML config; embedded defaults if omitted")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="override run.rounds")] = None,
    clients: Annotated[int | None, typer.Option(help="override run.clients")] = None,
    seed: Annotated[int | None, typer.Option(help="override run.seed")] = None,
    out: Annotated[
        Path | None, typer.Option(help="run directory (default runs/<run.name>)")
    ] = None,
    backend: Annotated[str | None, typer.Option(help="inprocess | pool")] = None,
    workers: Annotated[int | None, typer.Option(help="pool worker processes")] = None,
    strategy: Annotated[str | None, typer.Option(help="override strategy.name")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any field: key.path=value")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the run directory's last committed round")
    ] = False,
) -> None:
    """Run a federated simulation and write its run directory (model, run store, report)."""
    from fedlearn.job import run_job
    from fedlearn.report import print_report, summarize
    from fedlearn.store import RunStore

    overrides: dict[str, Any] = {}
    for key, value in [
        ("run.rounds", rounds),
        ("run.clients", clients),
        ("run.seed", seed),
        ("run.out_dir", None if out is None else str(out)),
        ("backend.kind", backend),
        ("backend.workers", workers),
        ("strategy.name", strategy),
    ]:
        if value is not None:
            overrides[key] = value
    try:
        overrides.update(parse_assignment(text) for text in set_ or [])
        cfg = load_config(config, overrides)
        console.print(
            f"[bold]fedlearn simulate[/] {cfg.run.name}: {cfg.run.clients} clients, "
            f"{cfg.run.rounds} rounds, {cfg.strategy.name}, {cfg.data.dataset}/"
            f"{cfg.data.partitioner}, backend {cfg.backend.kind}"
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            job = run_job(cfg, ProgressObserver(progress, cfg.run.rounds), resume)
    except FedlearnError as exc:
        _fail(str(exc))
    store = RunStore(job.out_dir / "run.db", run_id=cfg.run.name)
    try:
        print_report(summarize(store), console)
    finally:
        store.close()
    console.print(
        f"run directory: {job.out_dir} (model.safetensors, run.db, report.json, "
        "clients.csv, rounds.csv, *.png)"
    )
    for published in job.published:
        _print_published(published)
    if job.result.rounds and not any(r.ok for r in job.result.rounds):
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run or coordinator state directory")],
    write: Annotated[bool, typer.Option(help="also (re)write JSON, CSV and PNG files")] = True,
    run: Annotated[str | None, typer.Option(help="run id, if the store holds several")] = None,
) -> None:
    """Print per-round and per-client summaries of a run; write JSON, CSV and plots."""
    from fedlearn.report import print_report, summarize, write_report
    from fedlearn.store import RunStore

    db = run_dir / "run.db"
    if not db.is_file():
        _fail(f"{db} does not exist")
    store = RunStore(db)
    runs = store.run_ids()
    if run is None and len(runs) == 1:
        run = runs[0]
    if run not in runs:
        store.close()
        _fail(f"{db} holds runs {runs}; pick one with --run")
    store.run_id = run
    try:
        if write:
            print_report(write_report(store, run_dir).report, console)
            console.print(f"wrote report.json, clients.csv, rounds.csv and plots to {run_dir}")
        else:
            print_report(summarize(store), console)
    finally:
        store.close()


def _logging(verbose: bool) -> None:
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


@app.command()
def server(
    config: Annotated[Path, typer.Option("--config", help="coordinator.toml")],
    insecure: Annotated[bool, typer.Option(help="plaintext gRPC (TLS is on by default)")] = False,
    verbose: Annotated[bool, typer.Option(help="log joins and rounds")] = True,
) -> None:
    """Run the coordinator daemon: admit enrolled sites, run rounds, keep durable state."""
    from fedlearn.deploy.config import CoordinatorConfig, load_toml
    from fedlearn.deploy.server import run_coordinator

    _logging(verbose)

    class RoundLines:
        def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
            pass

        def reply_received(self, record: ClientRecord) -> None:
            pass

        def round_finished(self, record: RoundRecord) -> None:
            ProgressObserver.describe(record, console)

    try:
        cfg = load_toml(CoordinatorConfig, config, {"server.insecure": True} if insecure else None)
        result = run_coordinator(cfg, observer=RoundLines())
    except FedlearnError as exc:
        _fail(str(exc))
    console.print(f"run finished: {len(result.rounds)} rounds; model in {cfg.server.state_dir}")


@app.command()
def client(
    config: Annotated[Path, typer.Option("--config", help="site.toml")],
    insecure: Annotated[bool, typer.Option(help="plaintext gRPC (TLS is on by default)")] = False,
    verbose: Annotated[bool, typer.Option(help="log connections")] = True,
) -> None:
    """Run a site daemon: dial out to the coordinator and answer its tasks."""
    from fedlearn.deploy.config import SiteConfig, load_toml
    from fedlearn.deploy.launch import build_site

    _logging(verbose)
    try:
        cfg = load_toml(SiteConfig, config, {"coordinator.insecure": True} if insecure else None)
        site = build_site(cfg)
        site.run()
    except FedlearnError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.print(f"site {cfg.site.name}: {site.tasks_done} tasks answered")


@app.command()
def strategies() -> None:
    """List the built-in strategies and their settings."""
    import dataclasses

    from fedlearn.strategy import STRATEGIES

    for name, cls in STRATEGIES.items():
        fields = ", ".join(
            f"{f.name}={f.default!r}"
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING
        )
        kind = "linear" if cls.linear else "holistic"
        console.print(f"[bold]{name}[/] ({kind}): {fields}")


if __name__ == "__main__":
    app()
