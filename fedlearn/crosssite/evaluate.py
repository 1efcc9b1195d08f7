"""Cross-site evaluation of registry versions on a simulation's clients.

:func:`evaluate_sites` is an evaluate-only run: the simulation config's clients are built
exactly as ``fedlearn simulate`` builds them (:func:`fedlearn.run.job.client_app_factory`,
the config's backend), and each chosen model goes through the coordinator's evaluation
stage alone (:meth:`Coordinator.evaluate_only`): every client evaluates it on its own
held-out data, nothing trains, no global model changes. Each model's row of cells commits
to the evaluation's run store as it is done; the exports (CSV, JSON, heatmap PNG) are
written at the end, and the registry versions get their results attached, where the
publish gate's ``max_site_regression`` reads them.

Optionally each site's own **local model** joins the matrix: every client trains alone,
in this process, from the run's initial model (``initial_arrays(run.seed)``, the model
round 1 starts from) for ``local_rounds`` rounds (default ``run.rounds``) of its
ClientApp's ``train`` with the config's ``client.params`` (epochs, learning rate, batch
size), each round starting from its own previous result, with the task seeds a training
round of the run would use; no strategy, no other site. Its row says what a site gets
without federating, at home and elsewhere.
"""

from __future__ import annotations

import dataclasses
import datetime
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.config.simulation import SimulationConfig
from fedlearn.crosssite.matrix import LOCAL_PREFIX, Entry, SiteMatrix, dumps, entries_json
from fedlearn.engine.client_app import ClientApp, ClientContext, ProvidesInitialArrays
from fedlearn.engine.coordinator import Coordinator, Observer, Transport
from fedlearn.engine.messages import Stage, seed_for
from fedlearn.engine.records import Arrays
from fedlearn.engine.results import ClientRecord
from fedlearn.engine.store import RunStore, SiteEvaluation
from fedlearn.errors import ConfigError
from fedlearn.report.atomic import write_atomic
from fedlearn.run.builders import make_strategy
from fedlearn.run.identity import as_stored
from fedlearn.strategy.base import Strategy

MATRIX_CSV = "matrix.csv"
MATRIX_JSON = "matrix.json"
SUMMARY_CSV = "summary.csv"
HEATMAP_PNG = "matrix.png"


@dataclass(frozen=True)
class CrossSiteResult:
    """An evaluation's matrix and where it went."""

    matrix: SiteMatrix
    baseline: str
    directory: Path
    """Where its files are (``<out>/<evaluation>``)."""
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    attached: int = 0
    """How many registry versions got their results attached."""


def new_evaluation_id() -> str:
    """``sites-<UTC time>-<4 hex>``: unique across stores and registries."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    return f"sites-{now}-{secrets.token_hex(2)}"


def parse_ref(ref: str, model: str) -> tuple[str, str]:
    """``"3"``, ``"production"`` (of ``model``) or ``"other:2"`` as (name, version or
    alias)."""
    name, sep, version = ref.rpartition(":")
    if not sep:
        return model, ref
    if not name or not version:
        raise ConfigError(f"version {ref!r}: expected VERSION, ALIAS or NAME:VERSION")
    return name, version


def resolve_entries(
    registry_root: Path, refs: Sequence[str], model: str
) -> tuple[list[Entry], dict[str, Arrays]]:
    """The registry versions ``refs`` name (all of ``model``'s when empty), each once, with
    their aliases and verified weights."""
    from fedlearn.registry.model_registry import ModelRegistry

    if not (registry_root / "registry.db").is_file():
        raise ConfigError(f"no model registry at {registry_root} (publish a run first)")
    entries: list[Entry] = []
    arrays: dict[str, Arrays] = {}
    with ModelRegistry(registry_root) as registry:
        wanted = [parse_ref(r, model) for r in refs] or [
            (model, str(v.version)) for v in registry.versions(model)
        ]
        if not wanted:
            known = ", ".join(registry.names()) or "none"
            raise ConfigError(
                f"model {model!r} has no versions in {registry_root} (models: {known})"
            )
        for name, ref in wanted:
            version = registry.resolve(name, ref)
            label = f"{name} v{version.version}"
            if label in arrays:
                continue
            aliases = tuple(
                sorted(a for a, v in registry.aliases(name).items() if v == version.version)
            )
            entries.append(Entry(label, name, version.version, aliases))
            arrays[label] = registry.load(name, version.version)
    return entries, arrays


def evaluate_sites(
    config: SimulationConfig,
    *,
    registry: Path,
    out: Path,
    refs: Sequence[str] = (),
    model: str | None = None,
    local: bool = False,
    local_rounds: int | None = None,
    baseline: str | None = None,
    evaluation: str | None = None,
    attach: bool = True,
    plot_metric: str | None = None,
    observer: Observer | None = None,
    progress: Callable[[str], None] | None = None,
) -> CrossSiteResult:
    """Evaluate registry versions (and, with ``local``, each site's local model) on every
    client of ``config``'s simulation; store, export, plot and attach the matrix.

    ``out`` holds the evaluations' run store (``run.db``, one run per evaluation) and a
    directory of files per evaluation. ``refs`` name versions (``3``, ``production``,
    ``name:2``) of ``model`` (default: ``publish.model``, else ``run.name``); empty: all
    of its versions. ``baseline`` (a ref or a row label) is what per-site deltas are
    taken against (default: the production version among them, else the first).
    """
    say = progress or (lambda text: None)
    name = model or config.publish.model or config.run.name
    entries, weights = resolve_entries(registry, refs, name)
    base_label = baseline_label(entries, baseline, name)
    app_factory = _app_factory(config)
    probe = app_factory()
    initial = _initial(config, probe)
    for entry in entries:
        check_fits(entry.label, weights[entry.label], initial)
    clients = list(range(config.run.clients))
    sites = {cid: str(cid) for cid in clients}
    local_rounds = config.run.rounds if local_rounds is None else local_rounds
    if local:
        if local_rounds < 1:
            raise ConfigError(f"local rounds must be >= 1, got {local_rounds}")
        entries += [Entry(f"{LOCAL_PREFIX}{cid}", local_site=cid) for cid in clients]
    evaluation = evaluation or new_evaluation_id()
    coordinator = Coordinator(
        every_client(make_strategy(config.strategy)),
        _transport(config, app_factory, evaluation),
        clients,
        rounds=len(entries),
        seed=config.run.seed,
        observer=observer,
    )

    def models(entry: Entry) -> Arrays:
        if entry.local_site is None:
            return weights[entry.label]
        say(f"training {entry.label} alone for {local_rounds} rounds")
        return train_locally(
            probe, initial, entry.local_site, local_rounds, config.run.seed, evaluation
        )

    settings = {
        "registry": str(registry),
        "local_rounds": local_rounds if local else None,
        "simulation": as_stored(config),
    }
    try:
        return run_evaluation(
            coordinator,
            models,
            Evaluation(evaluation, entries, sites, base_label, config.run.seed, settings),
            registry=registry,
            out=out,
            attach=attach,
            plot_metric=plot_metric,
            say=say,
        )
    finally:
        coordinator.transport.close()


@dataclass(frozen=True)
class Evaluation:
    """What an evaluate-only run evaluates, where, and how it is described in its store."""

    name: str
    entries: list[Entry]
    sites: dict[int, str]
    baseline: str
    seed: int
    settings: dict[str, Any]
    """The source of the models and sites (a simulation config, a coordinator config)."""


def run_evaluation(
    coordinator: Coordinator,
    models: Callable[[Entry], Arrays],
    evaluation: Evaluation,
    *,
    registry: Path,
    out: Path,
    attach: bool,
    plot_metric: str | None,
    say: Callable[[str], None],
) -> CrossSiteResult:
    """The evaluate-only run: each entry's model (``models(entry)``) through
    ``coordinator``'s evaluation stage alone, its row of cells committed to the run store
    as it is done; then the files and the registry attachment."""
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out / "run.db", run_id=evaluation.name)
    entries, sites = evaluation.entries, evaluation.sites
    try:
        store.start_run(
            evaluation.seed,
            {
                "kind": "cross-site evaluation",
                "entries": entries_json(entries),
                "sites": [{"client_id": c, "site": s} for c, s in sites.items()],
                **evaluation.settings,
            },
        )
        matrix = SiteMatrix(evaluation.name, entries, sites)
        for number, entry in enumerate(entries, start=1):
            arrays = models(entry)
            say(f"evaluating {entry.label} on {len(sites)} sites")
            _, records = coordinator.evaluate_only(number, arrays)
            cells = [_cell(entry, r, sites) for r in records]
            store.record_site_evaluations(cells)
            store.add_event("evaluated", number, entry.label)
            matrix.add(cells)
        store.set_status("finished")
        store.add_event("finished", len(entries))
    except BaseException as exc:
        if not store.closed:
            store.set_status("failed")
            store.add_event("failed", 0, str(exc) or type(exc).__name__)
        raise
    finally:
        store.close()
    directory = out / evaluation.name
    files, notes = write_files(matrix, directory, evaluation.baseline, plot_metric)
    attached = attach_to_registry(registry, matrix) if attach else 0
    return CrossSiteResult(matrix, evaluation.baseline, directory, files, notes, attached)


def train_locally(
    app: ClientApp, initial: Arrays, client_id: int, rounds: int, seed: int, run_id: str = ""
) -> Arrays:
    """Client ``client_id``'s own model: ``rounds`` rounds of ``app.train`` on its data
    alone from ``initial``, with the seeds a run's training tasks would get."""
    arrays = {k: np.array(v) for k, v in initial.items()}
    for rnd in range(1, rounds + 1):
        ctx = ClientContext(client_id, rnd, seed_for(seed, rnd, Stage.TRAIN, client_id), run_id)
        result = app.train(arrays, {}, ctx)
        arrays = {k: np.array(v) for k, v in result.arrays.items()}
    return arrays


def write_files(
    matrix: SiteMatrix, directory: Path, baseline: str, plot_metric: str | None = None
) -> tuple[list[Path], list[str]]:
    """``matrix.csv``, ``summary.csv``, ``matrix.json`` and (with the report extra)
    ``matrix.png`` in ``directory``; returns the files and notes (a skipped plot)."""
    from fedlearn.crosssite.plot import HEATMAP_SKIPPED, can_plot, plot_matrix

    directory.mkdir(parents=True, exist_ok=True)
    files = {
        MATRIX_CSV: matrix.matrix_csv(),
        SUMMARY_CSV: matrix.summary_csv(),
        MATRIX_JSON: dumps(matrix.to_json(baseline)),
    }
    written = []
    for file_name, text in files.items():
        path = directory / file_name
        write_atomic(path, text.encode())
        written.append(path)
    notes = []
    if can_plot():
        path = directory / HEATMAP_PNG
        write_atomic(path, plot_matrix(matrix, baseline, plot_metric))
        written.append(path)
    else:
        notes.append(HEATMAP_SKIPPED)
    return written, notes


def attach_to_registry(registry_root: Path, matrix: SiteMatrix) -> int:
    """Attach each registry version's successful cells to it; returns how many versions."""
    from fedlearn.crosssite.matrix import cell_values
    from fedlearn.registry.model_registry import ModelRegistry
    from fedlearn.registry.site_results import SiteResult

    results = []
    versions = set()
    for entry in matrix.entries:
        if entry.model is None or entry.version is None:
            continue
        for cid, site in matrix.sites.items():
            cell = matrix.cell(entry.label, cid)
            if cell is None or not cell.ok:
                continue
            values = {k: v for k, v in cell_values(cell).items() if np.isfinite(v)}
            results.append(
                SiteResult(
                    entry.model,
                    entry.version,
                    matrix.evaluation,
                    cid,
                    site,
                    cell.num_examples,
                    values,
                )
            )
            versions.add((entry.model, entry.version))
    if results:
        with ModelRegistry(registry_root) as registry:
            registry.record_site_results(matrix.evaluation, results)
    return len(versions)


# -- internals -----------------------------------------------------------------------------


def _app_factory(config: SimulationConfig) -> Callable[[], ClientApp]:
    from fedlearn.run.job import client_app_factory

    return client_app_factory(config)


def _transport(
    config: SimulationConfig, app_factory: Callable[[], ClientApp], run_id: str
) -> Transport:
    from fedlearn.simulation import make_transport

    backend = config.backend
    return make_transport(
        backend.kind,
        app_factory,
        backend.workers,
        run_id,
        address=backend.address,
        num_cpus=backend.num_cpus,
        num_gpus=backend.num_gpus,
    )


def _initial(config: SimulationConfig, app: ClientApp) -> Arrays:
    if not isinstance(app, ProvidesInitialArrays):
        raise ConfigError(
            f"client.app: {config.client.app} must build an app with initial_arrays()"
        )
    return app.initial_arrays(config.run.seed)


def every_client(strategy: Strategy) -> Strategy:
    """The run's strategy (its evaluation config), asking every client to evaluate."""
    if dataclasses.is_dataclass(strategy) and hasattr(strategy, "fraction_evaluate"):
        return dataclasses.replace(strategy, fraction_evaluate=1.0, min_evaluate_clients=1)
    return strategy


def check_fits(label: str, arrays: Arrays, initial: Arrays) -> None:
    """ConfigError when a version's arrays are not the client app's model."""
    if list(arrays) != list(initial):
        raise ConfigError(
            f"{label} does not fit the client app's model: arrays {sorted(arrays)} vs "
            f"{sorted(initial)}"
        )
    for key, value in arrays.items():
        if value.shape != initial[key].shape:
            raise ConfigError(
                f"{label} does not fit the client app's model: {key} has shape "
                f"{value.shape}, the app's {initial[key].shape}"
            )


def baseline_label(entries: list[Entry], baseline: str | None, model: str) -> str:
    if baseline is None:
        for entry in entries:
            if "production" in entry.aliases:
                return entry.label
        return entries[0].label
    labels = {e.label for e in entries}
    if baseline in labels:
        return baseline
    name, ref = parse_ref(baseline, model)
    for entry in entries:
        if entry.model == name and (ref == str(entry.version) or ref in entry.aliases):
            return entry.label
    raise ConfigError(
        f"baseline {baseline!r} is not among the evaluated versions "
        f"({', '.join(e.label for e in entries)})"
    )


def _cell(entry: Entry, record: ClientRecord, sites: dict[int, str]) -> SiteEvaluation:
    return SiteEvaluation(
        entry=entry.label,
        model=entry.model,
        version=entry.version,
        client_id=record.client_id,
        site=sites.get(record.client_id, str(record.client_id)),
        ok=record.ok,
        num_examples=record.num_examples,
        loss=record.loss,
        metrics=dict(record.metrics),
        error=record.error,
    )
