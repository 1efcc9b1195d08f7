"""``fedlearn models``: list, show, promote and roll back published model versions, and
route their traffic (A/B split, shadow, canary)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedlearn.errors import FedlearnError

if TYPE_CHECKING:
    from fedlearn.registry.model_registry import ModelRegistry, ModelVersion
    from fedlearn.registry.site_results import SiteResult

PRODUCTION = "production"  # fedlearn.registry.model_registry.PRODUCTION, without importing it here

models_app = typer.Typer(
    help="Published model versions: list, show, promote, roll back, route traffic.",
    no_args_is_help=True,
)
console = Console()

RegistryOption = Annotated[
    Path, typer.Option("--registry", help="registry directory (registry.db + weights)")
]
DEFAULT_REGISTRY = Path("runs/registry")


def _fail(message: str) -> NoReturn:
    console.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _open(root: Path) -> ModelRegistry:
    from fedlearn.registry.model_registry import ModelRegistry

    if not (root / "registry.db").is_file():
        _fail(f"no model registry at {root} (publish a run first, or pass --registry)")
    return ModelRegistry(root)


def _require(reg: ModelRegistry, name: str) -> None:
    """Fail with the registry's model names when ``name`` has no version in it."""
    names = reg.names()
    if name not in names:
        known = ", ".join(names) or "none published yet"
        _fail(f"model {name!r} does not exist in {reg.root} (models: {known})")


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _metrics(values: dict[str, float] | None) -> str:
    if not values:
        return "-"
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))


def _labels(version: ModelVersion, aliases: dict[str, int]) -> str:
    """The aliases naming ``version``, comma-separated."""
    return ", ".join(sorted(a for a, v in aliases.items() if v == version.version))


@models_app.command("list")
def list_(
    name: Annotated[str | None, typer.Argument(help="one model (default: all)")] = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Every version with its run, round, metrics and aliases."""
    from fedlearn.report.console import first_fitting

    with _open(registry) as reg:
        if name is not None:
            _require(reg, name)
        rows = [
            _version_row(v, aliases)
            for model in (reg.names() if name is None else [name])
            for aliases in [reg.aliases(model)]
            for v in reg.versions(model)
        ]
    candidates = (_versions_table(rows, _LIST_DROP_ORDER[:n]) for n in range(4))
    console.print(first_fitting(console, candidates))


_LIST_COLUMNS = ("model", "version", "aliases", "run", "round", "metrics", "published")
# Left out in this order, one at a time, when the table cannot fit the terminal otherwise.
_LIST_DROP_ORDER = ("published", "round", "run")
_WHOLE = frozenset({"model", "version", "run", "round"})  # never wrapped


def _version_row(v: ModelVersion, aliases: dict[str, int]) -> dict[str, str]:
    return {
        "model": v.name,
        "version": str(v.version),
        "aliases": _labels(v, aliases),
        "run": v.run,
        "round": str(v.round),
        "metrics": _metrics(v.metrics),
        "published": _when(v.created),
    }


def _versions_table(rows: list[dict[str, str]], hidden: tuple[str, ...]) -> Table:
    """Versions, one a row; ``hidden`` columns left out (the caption names them)."""
    columns = [c for c in _LIST_COLUMNS if c not in hidden]
    caption = f"not shown at this width: {', '.join(hidden)} (see models show)" if hidden else None
    table = Table(
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, caption=caption, collapse_padding=True
    )
    for column in columns:
        table.add_column(column, no_wrap=column in _WHOLE)
    for row in rows:
        table.add_row(*(Text(row[c]) for c in columns))
    return table


@models_app.command()
def show(
    name: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[str, typer.Argument(help="version number or alias")] = PRODUCTION,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """One version in full, and the model's promotion decisions."""
    with _open(registry) as reg:
        _require(reg, name)
        try:
            v = reg.resolve(name, version)
        except FedlearnError as exc:
            _fail(str(exc))
        aliases = reg.aliases(name)
        decisions = reg.decisions(name)
        sites = reg.site_results(name, v.version)
        metadata = reg.metadata(name, v.version)
    rows = [
        ("version", f"{v.version} ({_labels(v, aliases) or 'no alias'})"),
        ("run / round", f"{v.run} / {v.round}"),
        ("published", _when(v.created)),
        ("metrics", _metrics(v.metrics)),
        ("client summary", _metrics(v.client_summary)),
        ("factory", f"{v.factory}({_metrics(v.factory_params) if v.factory_params else ''})"),
        (
            "inputs",
            ", ".join(f"{t['name']} {t['datatype']}{t['shape']}" for t in v.signature["inputs"]),
        ),
        (
            "outputs",
            ", ".join(f"{t['name']} {t['datatype']}{t['shape']}" for t in v.signature["outputs"]),
        ),
        ("sha256", v.sha256),
        ("parent", "-" if v.parent is None else str(v.parent)),
        ("file", str(v.path)),
    ]
    if sites:
        rows.append(("cross-site", _cross_site(sites)))
    rows += [(f"metadata {key}", value) for key, value in metadata.items()]
    table = Table(title=f"{name} v{v.version}", show_header=False)
    for key, value in rows:
        table.add_row(key, escape(value))
    console.print(table)
    if decisions:
        log = Table("time", "action", "version", "outcome", "reason", title="decisions")
        for d in decisions:
            if d.action in ("promote", "rollback", "canary-promote"):
                outcome = "[green]yes[/]" if d.promoted else "[yellow]no[/]"
            else:  # a traffic policy's change: nothing was promoted or refused
                outcome = "-"
            log.add_row(_when(d.time), d.action, str(d.version), outcome, escape(d.reason))
        console.print(log)


def _cross_site(sites: dict[str, list[SiteResult]]) -> str:
    """The newest cross-site evaluation of a version, in one line per metric."""
    from fedlearn.report.summary import lower_is_better

    evaluation, results = list(sites.items())[-1]
    lines = [f"{len(sites)} evaluation(s); newest {evaluation}, {len(results)} sites"]
    for metric in sorted({m for r in results for m in r.metrics}):
        values = [(r.metrics[metric], r.site) for r in results if metric in r.metrics]
        worst = max(values) if lower_is_better(metric) else min(values)
        mean = sum(v for v, _ in values) / len(values)
        lines.append(f"{metric}: mean {mean:.4g}, worst site {worst[1]} {worst[0]:.4g}")
    return "\n".join(lines)


@models_app.command()
def promote(
    name: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[int, typer.Argument(help="version to make production")],
    registry: RegistryOption = DEFAULT_REGISTRY,
    metric: Annotated[str, typer.Option(help="gate metric")] = "accuracy",
    tolerance: Annotated[float, typer.Option(help="regression allowed vs production")] = 0.0,
    min_worst_client: Annotated[
        float | None, typer.Option(help="bound on the worst client's value of the metric")
    ] = None,
    max_site_regression: Annotated[
        float | None,
        typer.Option(
            help="no site worse than production by more than this (needs a cross-site "
            "evaluation of both: fedlearn evaluate-sites)"
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="skip the gate (still recorded)")] = False,
) -> None:
    """Make a version production if it passes the gate; the decision is recorded."""
    from fedlearn.registry.model_registry import Gate
    from fedlearn.report.summary import lower_is_better

    with _open(registry) as reg:
        _require(reg, name)
        try:
            gate = (
                None
                if force
                else Gate(
                    metric,
                    not lower_is_better(metric),
                    tolerance,
                    min_worst_client,
                    max_site_regression=max_site_regression,
                )
            )
            decision = reg.promote(name, version, gate)
        except FedlearnError as exc:
            _fail(str(exc))
    if decision.promoted:
        console.print(f"[green]promoted[/]: {escape(decision.reason)}", soft_wrap=True)
    else:
        console.print(f"[yellow]not promoted[/]: {escape(decision.reason)}", soft_wrap=True)
        raise typer.Exit(1)


@models_app.command()
def alias(
    name: Annotated[str, typer.Argument(help="model name")],
    alias: Annotated[str, typer.Argument(help="alias to set, e.g. candidate or staging")],
    version: Annotated[int, typer.Argument(help="version it names")],
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Point an alias other than production (which only promote moves) at a version."""
    with _open(registry) as reg:
        _require(reg, name)
        try:
            reg.set_alias(name, alias, version)
        except FedlearnError as exc:
            _fail(str(exc))
    console.print(f"{name}: {alias} -> v{version}")


@models_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="model name")],
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Restore the previous production version (recorded as a decision)."""
    with _open(registry) as reg:
        _require(reg, name)
        try:
            restored = reg.rollback(name)
        except FedlearnError as exc:
            _fail(str(exc))
    console.print(f"production of {name} is v{restored.version} again")


@models_app.command("export-mlflow")
def export_mlflow(
    name: Annotated[str, typer.Argument(help="model name")],
    tracking_uri: Annotated[
        str,
        typer.Option(
            "--tracking-uri", help="MLflow tracking and registry URI, e.g. sqlite:///mlflow.db"
        ),
    ],
    version: Annotated[str, typer.Argument(help="version number or alias")] = PRODUCTION,
    registered_name: Annotated[
        str | None,
        typer.Option("--registered-name", help="MLflow registered model (default: NAME)"),
    ] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "fedlearn",
    artifact_location: Annotated[
        str | None,
        typer.Option(help="artifact root when the experiment is created (default: MLflow's)"),
    ] = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Log a version as an MLflow run and register it in MLflow (needs the mlflow extra)."""
    from fedlearn.registry.mlflow_export import export_version

    with _open(registry) as reg:
        _require(reg, name)
    try:
        result = export_version(
            registry,
            name,
            version,
            tracking_uri=tracking_uri,
            registered_name=registered_name,
            experiment=experiment,
            artifact_location=artifact_location,
        )
    except FedlearnError as exc:
        _fail(str(exc))
    state = "registered" if result.created else "already registered as"
    console.print(
        f"{escape(name)} v{result.fedlearn_version}: {state} [bold]{escape(result.model_uri)}[/]\n"
        f"  run {result.run_id} (experiment {result.experiment_id or '-'})\n"
        f"  artifacts {escape(result.source)}",
        soft_wrap=True,
    )


@models_app.command()
def route(
    name: Annotated[str, typer.Argument(help="model name")],
    split: Annotated[
        str | None,
        typer.Option(help="A/B split: VERSION=WEIGHT,... e.g. 1=90,2=10 (sticky per route key)"),
    ] = None,
    shadow: Annotated[
        int | None, typer.Option(help="mirror requests to this version; production answers")
    ] = None,
    canary: Annotated[
        int | None,
        typer.Option(
            help="roll this version out in steps; promoted or rolled back on live metrics"
        ),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="end the model's policy")] = False,
    sample: Annotated[
        float | None, typer.Option(help="shadow: fraction of requests mirrored (default 1)")
    ] = None,
    tolerance: Annotated[
        float | None,
        typer.Option(help="shadow/canary: max-abs difference still agreeing (non-class outputs)"),
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="canary: percent of traffic per step (default 5,25,50,100)")
    ] = None,
    step_requests: Annotated[
        int | None, typer.Option(help="canary: candidate requests per step (default 200)")
    ] = None,
    step_seconds: Annotated[
        float | None, typer.Option(help="canary: seconds per step (also)")
    ] = None,
    max_error_rate: Annotated[
        float | None, typer.Option(help="canary: roll back above this error rate (default 0.01)")
    ] = None,
    max_p95_ms: Annotated[
        float | None, typer.Option(help="canary: roll back above this p95 latency")
    ] = None,
    p95_tolerance_ms: Annotated[
        float | None,
        typer.Option(help="canary: roll back when p95 exceeds production's by more than this"),
    ] = None,
    max_disagreement: Annotated[
        float | None,
        typer.Option(help="canary: roll back above this shadow disagreement (mirrors requests)"),
    ] = None,
    min_requests: Annotated[
        int | None, typer.Option(help="canary: requests in a step before any verdict (default 50)")
    ] = None,
    max_drift_psi: Annotated[
        float | None,
        typer.Option(help="canary: roll back above this drift PSI of the candidate's inputs"),
    ] = None,
    reason: Annotated[str | None, typer.Option(help="note recorded with the decision")] = None,
    registry: RegistryOption = DEFAULT_REGISTRY,
) -> None:
    """Show, set or clear the traffic policy of a model (A/B split, shadow, canary).

    With no policy option, shows the current policy. `fedlearn serve` picks a change up
    at its next poll, without failing a request; every change is in the decision log."""
    from fedlearn.registry.traffic import (
        DEFAULT_STEPS,
        DEFAULT_TOLERANCE,
        Canary,
        LiveGate,
        Shadow,
        parse_steps,
        parse_weights,
    )

    chosen = [
        flag
        for flag, given in (
            ("--split", split is not None),
            ("--shadow", shadow is not None),
            ("--canary", canary is not None),
            ("--clear", clear),
        )
        if given
    ]
    if len(chosen) > 1:
        _fail(f"give one of {', '.join(chosen)}, not several")
    kind = chosen[0] if chosen else None
    allowed = {
        None: set(),
        "--clear": set(),
        "--split": set(),
        "--shadow": {"--sample", "--tolerance"},
        "--canary": {
            "--tolerance",
            "--steps",
            "--step-requests",
            "--step-seconds",
            "--max-error-rate",
            "--max-p95-ms",
            "--p95-tolerance-ms",
            "--max-disagreement",
            "--min-requests",
            "--max-drift-psi",
        },
    }[kind]
    extras = {
        "--sample": sample,
        "--tolerance": tolerance,
        "--steps": steps,
        "--step-requests": step_requests,
        "--step-seconds": step_seconds,
        "--max-error-rate": max_error_rate,
        "--max-p95-ms": max_p95_ms,
        "--p95-tolerance-ms": p95_tolerance_ms,
        "--max-disagreement": max_disagreement,
        "--min-requests": min_requests,
        "--max-drift-psi": max_drift_psi,
    }
    stray = sorted(flag for flag, value in extras.items() if value is not None)
    stray = [flag for flag in stray if flag not in allowed]
    if stray:
        what = f"with {kind}" if kind else "without --split, --shadow or --canary"
        _fail(f"{', '.join(stray)} cannot be used {what}")
    with _open(registry) as reg:
        _require(reg, name)
        try:
            if kind is None:
                _show_route(reg, name)
                return
            if kind == "--clear":
                if not reg.clear_traffic(name, reason):
                    _fail(f"model {name!r} has no traffic policy")
                console.print(f"{escape(name)}: traffic policy cleared")
                return
            if split is not None:
                policy: Any = parse_weights(split)
            elif shadow is not None:
                policy = Shadow(
                    shadow,
                    1.0 if sample is None else sample,
                    DEFAULT_TOLERANCE if tolerance is None else tolerance,
                )
            else:
                assert canary is not None
                production = reg.aliases(name).get(PRODUCTION)
                if production is None:
                    _fail(f"model {name!r} has no production version for a canary to start from")
                defaults = LiveGate()
                gate = LiveGate(
                    defaults.max_error_rate if max_error_rate is None else max_error_rate,
                    max_p95_ms,
                    p95_tolerance_ms,
                    max_disagreement,
                    defaults.min_requests if min_requests is None else min_requests,
                    max_drift_psi,
                )
                policy = Canary(
                    canary,
                    production,
                    DEFAULT_STEPS if steps is None else parse_steps(steps),
                    200 if step_requests is None and step_seconds is None else step_requests,
                    step_seconds,
                    gate,
                    DEFAULT_TOLERANCE if tolerance is None else tolerance,
                )
            stored = reg.set_traffic(name, policy, reason)
        except FedlearnError as exc:
            _fail(str(exc))
    console.print(
        f"{escape(name)}: {escape(stored.policy.describe())} (revision {stored.revision})",
        soft_wrap=True,
    )


def _show_route(reg: ModelRegistry, name: str) -> None:
    from fedlearn.registry.traffic import Canary, policy_to_dict

    stored = reg.traffic(name)
    production = reg.aliases(name).get(PRODUCTION)
    serving = "none" if production is None else f"v{production}"
    if stored is None:
        console.print(f"{escape(name)}: no traffic policy; requests go to production ({serving})")
        return
    policy = stored.policy
    table = Table(title=f"{name}: traffic policy (revision {stored.revision})", show_header=False)
    table.add_row("policy", escape(policy.describe()))
    table.add_row("production", serving)
    table.add_row("set", _when(stored.updated))
    for key, value in policy_to_dict(policy).items():
        if key in ("kind", "step_started"):
            continue
        table.add_row(key, escape(json.dumps(value)))
    if isinstance(policy, Canary):
        table.add_row("step started", _when(policy.step_started))
    console.print(table)
