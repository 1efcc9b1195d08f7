"""``fedlearn evaluate-sites``: registry versions on every site's evaluation data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from fedlearn.errors import ConfigError, FedlearnError

if TYPE_CHECKING:
    from fedlearn.crosssite.evaluate import CrossSiteResult

console = Console()


def evaluate_sites(
    config: Annotated[
        Path | None,
        typer.Argument(help="the simulation's TOML config (its clients are the sites)"),
    ] = None,
    version: Annotated[
        list[str] | None,
        typer.Option(
            "--version",
            "-v",
            help="a version, alias or NAME:VERSION to evaluate (repeat; default: every "
            "version of the model)",
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="model name (default: publish.model, else run.name)")
    ] = None,
    registry: Annotated[
        Path | None,
        typer.Option(help="registry directory (default: the config's publish.registry)"),
    ] = None,
    local: Annotated[
        bool,
        typer.Option(
            help="also each site's own model, trained on its data alone from the run's "
            "initial model"
        ),
    ] = False,
    local_rounds: Annotated[
        int | None, typer.Option(help="rounds of local training (default: run.rounds)")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="deltas against this version (default: production, else the first)"),
    ] = None,
    metric: Annotated[str, typer.Option(help="the metric of the table and heatmap")] = "accuracy",
    out: Annotated[
        Path | None,
        typer.Option(help="evaluations' run store and files (default: runs/<run.name>.sites)"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="the evaluation's id (default: new)")] = None,
    attach: Annotated[
        bool, typer.Option(help="attach the results to the registry versions (the gate)")
    ] = True,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="any config field: key.path=value")
    ] = None,
    coordinator: Annotated[
        Path | None,
        typer.Option(
            help="coordinator.toml: evaluate on the deployed sites instead, through the "
            "coordinator (its address, TLS and allowlist; no CONFIG)"
        ),
    ] = None,
    sites: Annotated[
        int | None,
        typer.Option(help="with --coordinator: sites to wait for (default: every enrolled one)"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="with --coordinator: plaintext gRPC (TLS is on by default)")
    ] = False,
) -> None:
    """Evaluate registry versions on every site's evaluation data (an evaluate-only run: the
    simulation's clients evaluate, nothing trains) and write the version x site matrix:
    its run store, CSV, JSON, a heatmap with per-site deltas, and the registry versions'
    cross-site results, which `fedlearn models promote --max-site-regression` checks."""
    from fedlearn.config.loading import parse_assignment
    from fedlearn.config.simulation import load_config
    from fedlearn.crosssite.evaluate import evaluate_sites as run
    from fedlearn.run.job import registry_dir

    try:
        overrides: dict[str, Any] = dict(parse_assignment(text) for text in set_ or [])
        if coordinator is not None:
            if config is not None or local:
                raise ConfigError(
                    "--coordinator evaluates on the deployed sites: give no simulation "
                    "CONFIG, and no --local (a site's local model would need it to train)"
                )
            result = _deployed(
                coordinator,
                overrides | ({"server.insecure": True} if insecure else {}),
                refs=version or [],
                model=model,
                registry=registry,
                out=out,
                sites=sites,
                baseline=baseline,
                evaluation=name,
                attach=attach,
                plot_metric=metric,
            )
            _print(result, metric)
            return
        cfg = load_config(config, overrides)
        root = registry or registry_dir(cfg)
        target = out or Path("runs") / f"{cfg.run.name}.sites"
        console.print(
            f"[bold]fedlearn evaluate-sites[/] {escape(cfg.run.name)}: {cfg.run.clients} sites "
            f"({cfg.data.dataset}/{cfg.data.partitioner}), registry {escape(str(root))}",
            soft_wrap=True,
        )
        result = run(
            cfg,
            registry=root,
            out=target,
            refs=version or [],
            model=model,
            local=local,
            local_rounds=local_rounds,
            baseline=baseline,
            evaluation=name,
            attach=attach,
            plot_metric=metric,
            progress=lambda text: console.print(escape(text)),
        )
    except FedlearnError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None
    _print(result, metric)


def _deployed(
    path: Path,
    overrides: dict[str, Any],
    *,
    registry: Path | None,
    out: Path | None,
    **options: Any,
) -> CrossSiteResult:
    """The evaluate-only run on a coordinator's enrolled sites."""
    import logging

    from fedlearn.config.deployment import CoordinatorConfig
    from fedlearn.config.loading import load_toml
    from fedlearn.crosssite.deployed import evaluate_deployed

    cfg = load_toml(CoordinatorConfig, path, overrides or None)
    root = registry or Path(cfg.publish.registry or Path(cfg.server.state_dir) / "registry")
    target = out or Path("runs") / f"{cfg.run.name}.sites"
    logging.basicConfig(level=logging.INFO)
    console.print(
        f"[bold]fedlearn evaluate-sites[/] on the sites of {escape(str(path))} "
        f"({escape(cfg.server.address)}), registry {escape(str(root))}",
        soft_wrap=True,
    )
    return evaluate_deployed(
        cfg,
        registry=root,
        out=target,
        progress=lambda text: console.print(escape(text)),
        **options,
    )


def _print(result: CrossSiteResult, metric: str) -> None:
    matrix = result.matrix
    deltas = matrix.deltas(result.baseline, metric)
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"{metric} over {len(matrix.sites)} sites (evaluation {matrix.evaluation})",
    )
    for column in ("model", "mean", "worst site", "spread", "vs baseline"):
        table.add_column(column)
    for entry in matrix.entries:
        s = matrix.summary(entry.label, metric)
        label = Text(entry.label)
        if entry.aliases:
            label.append(f" ({', '.join(entry.aliases)})", style="dim")
        if s is None:
            table.add_row(label, "-", "-", "-", "-")
            continue
        row = deltas.get(entry.label)
        if row:
            sign = -1.0 if s.lower_is_better else 1.0
            site, delta = min(row.items(), key=lambda kv: sign * kv[1])
            versus = f"{delta:+.4f} (site {site})"
        else:
            versus = "baseline" if entry.label == result.baseline else "-"
        failed = f", {len(s.failed_sites)} failed" if s.failed_sites else ""
        table.add_row(
            label,
            f"{s.mean:.4f}",
            f"{s.worst:.4f} (site {s.worst_site}{failed})",
            f"{s.spread:.4f}",
            versus,
        )
    console.print(table)
    files = ", ".join(p.name for p in result.files)
    console.print(f"wrote {files} to {escape(str(result.directory))}", soft_wrap=True)
    for note in result.notes:
        console.print(escape(note))
    if result.attached:
        console.print(
            f"attached to {result.attached} registry version(s) as evaluation {matrix.evaluation}",
            soft_wrap=True,
        )
