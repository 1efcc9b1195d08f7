"""The ``fedlearn`` command."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlearn.cli.collector import StartupCollector, mark_command_process
from fedlearn.cli.keys import certs_app, keys_app
from fedlearn.cli.models import models_app
from fedlearn.cli.progress import ProgressObserver, progress_bars
from fedlearn.cli.sites import evaluate_sites
from fedlearn.cli.strategies import strategies
from fedlearn.cli.ui import UI_HELP, UI_PORT, UI_PORT_HELP, serve_run_page, watching
from fedlearn.config.loading import parse_assignment, set_dotted, validate
from fedlearn.config.simulation import SimulationConfig, load_config
from fedlearn.errors import ConfigError, FedlearnError, RunInterrupted

if TYPE_CHECKING:
    from fedlearn.engine.messages import Stage
    from fedlearn.engine.results import ClientRecord, RoundRecord
    from fedlearn.registry.publish import Published
    from fedlearn.run.job import JobResult
    from fedlearn.run.lifecycle import RunOutcome

app = typer.Typer(
    help="fedlearn: federated learning simulations and deployments.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(certs_app, name="certs")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.command("evaluate-sites")(evaluate_sites)
console = Console()


def main() -> None:
    """The ``fedlearn`` program: its console script and ``python -m fedlearn.cli``."""
    mark_command_process()
    app()


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
    backend: Annotated[str | None, typer.Option(help="inprocess | pool | ray")] = None,
    workers: Annotated[int | None, typer.Option(help="pool worker processes or Ray actors")] = None,
    strategy: Annotated[str | None, typer.Option(help="override strategy.name")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any field: key.path=value")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="continue the run directory's run after its last committed round (without "
            "a config file: with the run's own config.json)"
        ),
    ] = False,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run",
            help="start over: the directory's run moves aside to DIR.N (nothing is deleted)",
        ),
    ] = False,
    check_serving: Annotated[
        bool,
        typer.Option(help="serve the published model and query it over REST and gRPC"),
    ] = True,
    serve: Annotated[
        bool, typer.Option(help="then keep serving it (OIP v2 on :8000 and :8001) until Ctrl-C")
    ] = False,
    flower_app: Annotated[
        Path | None,
        typer.Option(
            help="a Flower app project (pyproject.toml with [tool.flwr.app]): run its "
            "ClientApp with the strategy its ServerApp starts"
        ),
    ] = None,
    run_config: Annotated[
        list[str] | None,
        typer.Option(help="with --flower-app: override its [tool.flwr.app.config], 'k=v k2=v2'"),
    ] = None,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            help="track the run in MLflow (tracking.mlflow_uri), e.g. sqlite:///mlflow.db"
        ),
    ] = None,
    ui: Annotated[bool, typer.Option(help=UI_HELP)] = False,
    ui_port: Annotated[int, typer.Option(help=UI_PORT_HELP)] = UI_PORT,
) -> None:
    """Run a federated simulation, write its run directory (model, run store, report),
    publish the model to the registry and query it through the serving endpoint."""
    collector = StartupCollector()
    from fedlearn.report.plot_process import start_plot_process

    plots = start_plot_process()  # its matplotlib import overlaps this process's start-up
    from fedlearn.engine.coordinator import Observers
    from fedlearn.run.job import run_job

    overrides: dict[str, Any] = {}
    for key, value in [
        ("run.rounds", rounds),
        ("run.clients", clients),
        ("run.seed", seed),
        ("run.out_dir", None if out is None else str(out)),
        ("backend.kind", backend),
        ("backend.workers", workers),
        ("strategy.name", strategy),
        ("tracking.mlflow_uri", mlflow_uri),
    ]:
        if value is not None:
            overrides[key] = value
    try:
        overrides.update(parse_assignment(text) for text in set_ or [])
        if flower_app is not None:
            overrides = _flower_overrides(flower_app, run_config, overrides)
        elif run_config:
            raise ConfigError("--run-config overrides a Flower app's config: add --flower-app DIR")
        cfg = _simulation_config(config, overrides, resume)
        data = (
            f"Flower app {cfg.flower.app}"
            if cfg.flower.app
            else f"{cfg.data.dataset}/{cfg.data.partitioner}"
        )
        console.print(
            f"[bold]fedlearn simulate[/] {cfg.run.name}: {cfg.run.clients} clients, "
            f"{cfg.run.rounds} rounds, {cfg.strategy.name}, {data}, backend {cfg.backend.kind}"
        )
        _show_run_notes()
        with (
            watching(ui, cfg, ui_port, console) as events,
            progress_bars(
                console=console,
                transient=True,
            ) as progress,
        ):
            observer = Observers(ProgressObserver(progress, cfg.run.rounds), collector)
            job = run_job(cfg, observer, resume, new_run, events=events)
    except RunInterrupted as exc:
        console.print(f"[yellow]{escape(str(exc))}[/]", soft_wrap=True)
        raise typer.Exit(143 if exc.signal == signal.SIGTERM else 130) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except FedlearnError as exc:
        _fail(str(exc))
    finally:
        collector.started()
        if plots is not None:
            plots.close()
    outcome = job.outcome
    if outcome.already_finished:
        return
    _print_run(outcome, cfg.run.name)
    if outcome.status != "finished":
        raise typer.Exit(1)
    if job.published and (check_serving or serve):
        from fedlearn.run.job import registry_dir

        try:
            _serve_published(job, registry_dir(cfg), serve)
        except FedlearnError as exc:
            _fail(str(exc))


def _flower_overrides(
    directory: Path, run_config: list[str] | None, given: dict[str, Any]
) -> dict[str, Any]:
    """The overrides that run a Flower app project (``given`` win); prints what did not
    carry over from its ServerApp."""
    from fedlearn.run.flower import flower_settings

    settings = flower_settings(directory, run_config, given)
    for note in settings.notes:
        console.print(f"[yellow]flower:[/] {escape(note)}", soft_wrap=True)
    return settings.overrides


def _simulation_config(
    path: Path | None, overrides: dict[str, Any], resume: bool
) -> SimulationConfig:
    """The config to run: the file, else (resuming) the run directory's own config.json,
    else the embedded defaults; ``overrides`` on top."""
    from fedlearn.run.job import run_dir

    if path is None and resume:
        directory = run_dir(load_config(None, overrides))
        saved = directory / "config.json"
        if saved.is_file():
            raw = json.loads(saved.read_text())
            for key, value in overrides.items():
                set_dotted(raw, key, value, SimulationConfig)
            return validate(SimulationConfig, raw, str(saved))
    return load_config(path, overrides)


def _show_run_notes() -> None:
    """Print what the run lifecycle says (resuming, config changes, moved aside) as it
    happens."""
    import logging

    logger = logging.getLogger("fedlearn.run")
    if any(isinstance(h, _ConsoleNotes) for h in logger.handlers):
        return
    logger.addHandler(_ConsoleNotes())
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _ConsoleNotes(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[cyan]{escape(record.getMessage())}[/]", soft_wrap=True)


def _print_run(outcome: RunOutcome, run_id: str) -> None:
    """The report tables, where the files are, what was published."""
    from fedlearn.engine.store import RunStore
    from fedlearn.report.console import print_report
    from fedlearn.report.summary import summarize

    store = RunStore(outcome.directory / "run.db", run_id=run_id, read_only=True)
    try:
        print_report(summarize(store), console)
    finally:
        store.close()
    console.print(
        f"run directory: {outcome.directory} (model.safetensors, run.db, config.json, "
        "report.json, clients.csv, rounds.csv, *.png)",
        soft_wrap=True,
    )
    for published in outcome.published:
        _print_published(published)


def _serve_published(job: JobResult, registry: Path, keep_serving: bool) -> None:
    """Start the OIP endpoint on the registry, query the new version, optionally stay up."""
    import numpy as np

    from fedlearn.apps.torch_app import TorchClientApp, arrays_to_model, model_inputs
    from fedlearn.serving.check import check_served
    from fedlearn.serving.endpoint import EndpointSettings, start_endpoint

    app = job.app
    assert job.result is not None  # a run that published ran in this process
    if not isinstance(app, TorchClientApp):
        console.print("serving check skipped: the client app is not a TorchClientApp")
        return
    version = job.published[-1].version
    data = app.data.client(0)
    x = model_inputs(np.asarray(data.x_test[:8])).numpy()
    module = app.model_fn()
    arrays_to_model(module, job.result.arrays)
    settings = EndpointSettings(
        registry=registry,
        http_port=8000 if keep_serving else 0,
        grpc_port=8001 if keep_serving else 0,
        models=(version.name,),
    )
    with start_endpoint(settings) as endpoint:
        check = check_served(endpoint, version, module, x, np.asarray(data.y_test[:8]))
        table = Table(
            "", *(str(i) for i in range(len(x))), title=f"{version.name} v{version.version} served"
        )
        table.add_row("label", *(str(int(v)) for v in check.labels))
        for label, out in (
            ("in-process", check.in_process),
            ("REST", check.rest),
            ("gRPC", check.grpc),
        ):
            table.add_row(label, *(str(int(v)) for v in out.argmax(axis=1)))
        console.print(table)
        verdict = "[green]same predictions[/]" if check.same_predictions else "[red]DIFFERENT[/]"
        console.print(
            f"OIP v2 endpoint: REST {endpoint.http_url}, gRPC {endpoint.grpc_address}: "
            f"{verdict} as in-process (max |diff| {check.max_abs_diff:.2g}); production is "
            f"v{check.served_version}",
            soft_wrap=True,
        )
        if not check.same_predictions:
            raise typer.Exit(1)
        if keep_serving:
            console.print(
                f"serving until Ctrl-C: curl {endpoint.http_url}/v2/models/{version.name}"
            )
            _wait_for_signal()


def _wait_for_signal() -> None:
    import signal
    import threading

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run or coordinator state directory")],
    write: Annotated[bool, typer.Option(help="also (re)write JSON, CSV and PNG files")] = True,
    run: Annotated[str | None, typer.Option(help="run id, if the store holds several")] = None,
    ui: Annotated[bool, typer.Option(help="then serve its page on 127.0.0.1 until Ctrl-C")] = False,
    ui_port: Annotated[int, typer.Option(help=UI_PORT_HELP)] = UI_PORT,
) -> None:
    """Print per-round and per-client summaries of a run; write JSON, CSV and plots."""
    from fedlearn.engine.store import RunStore
    from fedlearn.report.console import print_report
    from fedlearn.report.files import write_report
    from fedlearn.report.summary import summarize

    db = run_dir / "run.db"
    if not db.is_file():
        _fail(f"{db} does not exist")
    store = RunStore(db, read_only=True)
    runs = store.run_ids()
    if run is None and len(runs) == 1:
        run = runs[0]
    if run not in runs:
        store.close()
        _fail(f"{db} holds runs {runs}; pick one with --run")
    store.run_id = run
    try:
        if write:
            files = write_report(store, run_dir)
            print_report(files.report, console)
            plots = "" if files.metrics_png is None else " and plots"
            console.print(f"wrote report.json, clients.csv, rounds.csv{plots} to {run_dir}")
            for note in files.notes:
                console.print(escape(note))
        else:
            print_report(summarize(store), console)
    finally:
        store.close()
    try:
        if ui:
            serve_run_page(run_dir, run, ui_port, console, _wait_for_signal)
    except FedlearnError as exc:
        _fail(str(exc))


@app.command()
def replay(
    run_dir: Annotated[Path, typer.Argument(help="a run or coordinator state directory")],
    site_config: Annotated[
        Path | None,
        typer.Option(help="a coordinator's run: the site.toml whose app (and data) the sites ran"),
    ] = None,
    run: Annotated[str | None, typer.Option(help="run id, if the store holds several")] = None,
) -> None:
    """Replay a run from its store and check that it reproduces every record and the model.

    Each round selects from the clients recorded as available; exactly the clients recorded
    as answering answer, in this process; the others fail as recorded. Exit 0 when the
    replay reproduces every round, every client's result and the final model bit for bit,
    1 with each difference listed otherwise."""
    from fedlearn.run.replay import replay_run, site_app_factory

    try:
        factory = None
        if site_config is not None:
            from fedlearn.config.deployment import SiteConfig
            from fedlearn.config.loading import load_toml

            factory = site_app_factory(load_toml(SiteConfig, site_config))
        result = replay_run(run_dir, factory, run_id=run)
    except FedlearnError as exc:
        _fail(str(exc))
    recorded = result.recorded
    what = f"run {recorded.run_id!r} in {run_dir}: {len(result.rounds)} rounds"
    if result.matches:
        checked = [f"the round {recorded.checkpoint[0]} checkpoint"] if recorded.checkpoint else []
        checked += ["model.safetensors"] if recorded.model is not None else []
        console.print(
            f"replay of {what} reproduces every round and all {len(result.clients)} client "
            f"results; the final model is bit-identical to {' and '.join(checked) or 'nothing'}",
            soft_wrap=True,
        )
        return
    shown = result.differences[:20]
    console.print(f"replay of {what} differs from the record in {len(result.differences)} ways:")
    for line in shown:
        console.print(f"  {escape(line)}", soft_wrap=True)
    if len(result.differences) > len(shown):
        console.print(f"  ... and {len(result.differences) - len(shown)} more")
    raise typer.Exit(1)


def _logging(verbose: bool) -> None:
    """Daemon logs: rich in a terminal; one plain, unwrapped line per record otherwise
    (a service manager's journal, a file, a pipe)."""
    handler: logging.Handler
    if console.is_terminal:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])


@app.command()
def server(
    config: Annotated[Path, typer.Option("--config", help="coordinator.toml")],
    insecure: Annotated[bool, typer.Option(help="plaintext gRPC (TLS is on by default)")] = False,
    verbose: Annotated[bool, typer.Option(help="log joins and rounds")] = True,
    new_run: Annotated[
        bool,
        typer.Option(
            "--new-run",
            help="start over: the state directory's run moves aside to DIR.N "
            "(nothing is deleted; a registry inside it stays)",
        ),
    ] = False,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(
            help="track the run in MLflow (tracking.mlflow_uri), e.g. sqlite:///mlflow.db"
        ),
    ] = None,
) -> None:
    """Run the coordinator daemon: admit enrolled sites, run rounds, keep durable state.

    The same command after a crash, a Ctrl-C or a SIGTERM continues the state directory's
    run after its last committed round."""
    from fedlearn.config.deployment import CoordinatorConfig
    from fedlearn.config.loading import load_toml
    from fedlearn.deploy.server import run_coordinator

    _logging(verbose)

    class RoundLines:
        def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
            pass

        def reply_received(self, record: ClientRecord) -> None:
            pass

        def round_finished(self, record: RoundRecord) -> None:
            ProgressObserver.describe(record, console)

    again = f"fedlearn server --config {config}" + (" --insecure" if insecure else "")
    try:
        overrides: dict[str, Any] = {"server.insecure": True} if insecure else {}
        if mlflow_uri is not None:
            overrides["tracking.mlflow_uri"] = mlflow_uri
        cfg = load_toml(CoordinatorConfig, config, overrides or None)
        outcome = run_coordinator(cfg, observer=RoundLines(), new_run=new_run, resume_command=again)
    except RunInterrupted as exc:
        logging.getLogger("fedlearn.server").warning("%s", exc)
        # a service manager's SIGTERM is an orderly stop
        raise typer.Exit(0 if exc.signal == signal.SIGTERM else 130) from None
    except FedlearnError as exc:
        _fail(str(exc))
    if outcome.already_finished:
        console.print(" ".join(outcome.notes), soft_wrap=True)
        return
    ran = len(outcome.result.rounds) if outcome.result is not None else 0
    console.print(
        f"run {outcome.status}: {len(outcome.rounds)} rounds ({ran} in this session); model "
        f"and report in {cfg.server.state_dir}",
        soft_wrap=True,
    )
    if outcome.status != "finished":
        raise typer.Exit(1)


@app.command()
def client(
    config: Annotated[Path, typer.Option("--config", help="site.toml")],
    insecure: Annotated[bool, typer.Option(help="plaintext gRPC (TLS is on by default)")] = False,
    verbose: Annotated[bool, typer.Option(help="log connections")] = True,
) -> None:
    """Run a site daemon: dial out to the coordinator and answer its tasks."""
    from fedlearn.config.deployment import SiteConfig
    from fedlearn.config.loading import load_toml
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


@app.command("serve")
def serve_(
    registry: Annotated[Path, typer.Option(help="registry directory to serve and watch")] = Path(
        "runs/registry"
    ),
    host: Annotated[str, typer.Option(help="listen address (non-loopback needs TLS)")] = (
        "127.0.0.1"
    ),
    http_port: Annotated[int, typer.Option(help="OIP v2 REST port (0: any free)")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="OIP v2 gRPC port (0: any free)")] = 8001,
    model: Annotated[
        list[str] | None, typer.Option("--model", help="serve only these models")
    ] = None,
    alias: Annotated[str, typer.Option(help="the alias unversioned requests get")] = "production",
    allow_factory: Annotated[
        list[str] | None,
        typer.Option(
            help="another module prefix registered model builders may come from (clients. always)"
        ),
    ] = None,
    path: Annotated[
        list[Path] | None,
        typer.Option(
            "--path",
            help="a directory to import model builders from (the working directory is "
            "not searched unless given)",
        ),
    ] = None,
    cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="TLS private key (PEM)")] = None,
    insecure: Annotated[bool, typer.Option(help="plaintext on a non-loopback address")] = False,
    max_request_mb: Annotated[int, typer.Option(help="largest request accepted")] = 64,
    body_timeout: Annotated[
        float, typer.Option(help="seconds a REST request's body may take to arrive")
    ] = 30.0,
    max_inflight: Annotated[
        int,
        typer.Option(
            help="inference requests answered or queued at once, per protocol; more get "
            "503 + Retry-After (REST) / RESOURCE_EXHAUSTED (gRPC)"
        ),
    ] = 256,
    poll: Annotated[float, typer.Option(help="seconds between registry checks")] = 0.5,
    torch_threads: Annotated[
        int, typer.Option(help="torch threads per request (requests already run side by side)")
    ] = 1,
    shadow_queue: Annotated[
        int,
        typer.Option(help="mirrored requests waiting for a shadow candidate; more are dropped"),
    ] = 64,
    shadow_budget: Annotated[
        float,
        typer.Option(
            help="CPU a shadow candidate may use, as a share of the endpoint's own; "
            "mirrors beyond wait or drop"
        ),
    ] = 0.05,
    shadow_nice: Annotated[
        int,
        typer.Option(help="lower CPU priority (nice, 0-19) of the shadow worker (Linux)"),
    ] = 0,
    canary_decisions: Annotated[
        bool,
        typer.Option(help="step up, promote and roll back canaries from this endpoint's metrics"),
    ] = True,
    drift: Annotated[
        bool, typer.Option(help="rolling drift statistics of the inputs, per version")
    ] = True,
    drift_threshold: Annotated[
        float, typer.Option(help="mean PSI above which fedlearn_serving_drift_alert is 1")
    ] = 0.2,
    drift_window: Annotated[
        int, typer.Option(help="input rows the drift scores cover (between 1x and 2x this)")
    ] = 10_000,
    drift_rows: Annotated[
        int, typer.Option(help="rows of one request the drift statistics count at most")
    ] = 8,
    verbose: Annotated[bool, typer.Option(help="log swaps and errors")] = True,
) -> None:
    """Serve the registry's models over the Open Inference Protocol v2 (REST and gRPC),
    hot-swapping each model when its alias moves and applying its traffic policy
    (`fedlearn models route`)."""
    from fedlearn.config.extras import extra_message, has_extra

    if not has_extra("serve"):
        _fail(extra_message("serve", "fedlearn serve"))
    import torch

    from fedlearn.registry.model_registry import DEFAULT_FACTORY_PREFIXES
    from fedlearn.serving.endpoint import EndpointSettings, start_endpoint

    _logging(verbose)
    if torch_threads < 1:
        _fail(f"--torch-threads must be >= 1, got {torch_threads}")
    torch.set_num_threads(torch_threads)
    extra = allow_factory or []
    try:
        settings = EndpointSettings(
            registry=registry,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            alias=alias,
            models=tuple(model) if model else None,
            allowed_factories=tuple(dict.fromkeys([*DEFAULT_FACTORY_PREFIXES, *extra])),
            paths=tuple(path or ()),
            poll_interval_s=poll,
            max_request_mb=max_request_mb,
            body_timeout_s=body_timeout,
            max_inflight=max_inflight,
            cert=cert,
            key=key,
            insecure=insecure,
            shadow_queue=shadow_queue,
            shadow_nice=shadow_nice,
            shadow_budget=shadow_budget,
            canary_decisions=canary_decisions,
            drift=drift,
            drift_threshold=drift_threshold,
            drift_window=drift_window,
            drift_rows=drift_rows,
        )
        endpoint = start_endpoint(settings)
    except FedlearnError as exc:
        _fail(str(exc))
    with endpoint:
        served = ", ".join(f"{n} v{v}" for n, v in endpoint.repository.served().items())
        console.print(
            f"serving {served or 'no model yet'} from {registry}: REST {endpoint.http_url} "
            f"(metrics at /metrics), gRPC {endpoint.grpc_address}",
            soft_wrap=True,
        )
        _wait_for_signal()


app.command("strategies")(strategies)


if __name__ == "__main__":
    app()
