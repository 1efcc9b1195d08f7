"""A simulation job from a config: data, ClientApp and strategy, run through the lifecycle."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedlearn.config.simulation import SimulationConfig
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.drift.stats import SummarySpec
from fedlearn.engine.client_app import ClientApp, ProvidesInitialArrays, build_app
from fedlearn.engine.clock import Latency
from fedlearn.engine.coordinator import Observer, Observers
from fedlearn.engine.records import Arrays
from fedlearn.engine.references import resolve
from fedlearn.engine.results import RunResult
from fedlearn.errors import ConfigError
from fedlearn.run.builders import (
    make_distributed,
    make_drift,
    make_privacy,
    make_secure,
    make_strategy,
)
from fedlearn.run.lifecycle import RunOutcome, RunSpec, Start, open_run
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import make_transport, run_simulation

if TYPE_CHECKING:  # the registry loads only when a run publishes
    from fedlearn.registry.publish import Published, Publisher
    from fedlearn.ui.events import EventBus


@dataclass(frozen=True)
class JobResult:
    """A simulation command's outcome and one instance of its client app."""

    outcome: RunOutcome
    app: ClientApp

    @property
    def out_dir(self) -> Path:
        """The run directory."""
        return self.outcome.directory

    @property
    def result(self) -> RunResult | None:
        """What this process ran (None when the run was already finished)."""
        return self.outcome.result

    @property
    def published(self) -> list[Published]:
        """The versions this process published."""
        return self.outcome.published


CLIENT_STATE_DIR = "client-state"
"""Where a run keeps its clients' own states (``ctx.state``), inside its directory."""


def run_dir(config: SimulationConfig) -> Path:
    """Where a run writes its outputs: ``run.out_dir``, else ``runs/<run.name>``."""
    return Path(config.run.out_dir or Path("runs") / config.run.name)


def registry_dir(config: SimulationConfig) -> Path:
    """Where a run publishes: ``publish.registry``, else ``registry/`` beside the run dir."""
    if config.publish.registry is not None:
        return Path(config.publish.registry)
    return run_dir(config).parent / "registry"


def resume_command(config: SimulationConfig) -> str:
    """The command that continues this run (its directory keeps its config)."""
    return f"fedlearn simulate --out {run_dir(config)} --resume"


def client_app_factory(config: SimulationConfig) -> Callable[[], ClientApp]:
    """Builds the config's ClientApp over its dataset, partitioned as the config says; or,
    with ``[flower] app``, returns the Flower project's ClientApp (built once here, so the
    pool's forked workers share its per-client state directory)."""
    if config.flower.app is not None:
        from fedlearn.run.flower import flower_client_app

        app = flower_client_app(config)
        return lambda: app
    factory = resolve(config.client.app, "client.app")
    data = partition_dataset(
        load_dataset(config.data.dataset),
        config.data.partitioner,
        config.run.clients,
        config.run.seed,
        alpha=config.data.alpha,
        shards_per_client=config.data.shards_per_client,
        min_size=config.data.min_size,
        test_fraction=config.data.test_fraction,
    )
    return functools.partial(build_app, factory, data, dict(config.client.params))


def run_job(
    config: SimulationConfig,
    observer: Observer | None = None,
    resume: bool = False,
    new_run: bool = False,
    events: EventBus | None = None,
) -> JobResult:
    """Run the simulation ``config`` describes in its run directory.

    Without ``resume`` the directory must not hold a run yet (``new_run`` moves one aside
    first); with it, the run there continues after its last committed round under the
    rules of :mod:`fedlearn.run.lifecycle`. Settings are checked before the directory is
    touched. ``events`` receives the run's events (a live page).
    """
    strategy = make_strategy(config.strategy)
    strategy.validate(config.run.clients)
    if config.backend.kind == "ray":
        from fedlearn.simulation.ray_session import check_ray

        check_ray(config.backend.address)
    app_factory = client_app_factory(config)
    probe = app_factory()
    if not isinstance(probe, ProvidesInitialArrays):
        raise ConfigError(
            f"client.app: {config.client.app} must build an app with initial_arrays()"
        )
    per_round = strategy.train_clients_per_round(config.run.clients)
    secure, distributed_event = make_distributed(
        config.privacy,
        config.secagg,
        make_secure(config.secagg),
        clients_per_round=per_round,
        num_params=lambda: _num_params(probe.initial_arrays(config.run.seed)),
        seed=config.run.seed,
    )
    if secure is not None:
        secure.check(strategy, per_round)
    strategy, privacy = make_privacy(
        config.privacy,
        strategy,
        num_clients=config.run.clients,
        seed=config.run.seed,
        secure=secure,
        distributed_event=distributed_event,
    )
    data_stats = drift_spec(config, secure)
    publisher, note = _publisher(config, probe)
    if publisher is not None:
        publisher.drift_spec = data_stats
    directory = run_dir(config)
    spec = RunSpec(
        directory=directory,
        name=config.run.name,
        seed=config.run.seed,
        rounds=config.run.rounds,
        config=config,
        resume_command=resume_command(config),
        keep=(registry_dir(config),),
    )
    lifecycle = open_run(spec, Start.RESUME if resume else Start.NEW, new_run)
    if note is not None:
        lifecycle.note(note)
    lifecycle.publisher, lifecycle.publish_every = publisher, config.publish.every
    if privacy is not None:
        lifecycle.account_privacy(privacy)
    lifecycle.events = events

    def run(arrays: Arrays, state: Arrays | None, start_round: int) -> RunResult:
        backend = config.backend
        return run_simulation(
            app_factory,
            strategy,
            num_clients=config.run.clients,
            rounds=config.run.rounds,
            initial_arrays=arrays,
            initial_state=state,
            start_round=start_round,
            seed=config.run.seed,
            backend=make_transport(
                backend.kind,
                app_factory,
                backend.workers,
                config.run.name,
                address=backend.address,
                num_cpus=backend.num_cpus,
                num_gpus=backend.num_gpus,
                state_dir=directory / CLIENT_STATE_DIR,
                start_method=backend.start_method,
            ),
            evaluate_every=config.run.evaluate_every,
            sink=lifecycle,
            observer=observer if events is None else Observers(observer, events),
            run_id=config.run.name,
            secure=secure,
            stop_before=lifecycle.stop_before,
            latency=make_latency(config),
            data_stats=data_stats,
        )

    outcome = lifecycle.drive(lambda: probe.initial_arrays(config.run.seed), run)
    return JobResult(outcome, probe)


def make_latency(config: SimulationConfig) -> Latency | None:
    """The ``[latency]`` section as a :class:`Latency`, or None without one."""
    if config.latency is None:
        return None
    return Latency(**config.latency.model_dump())


def drift_spec(config: SimulationConfig, secure: SecureAggregation | None) -> SummarySpec | None:
    """The bins of ``[drift]`` (None when it is off), sized to the dataset's features and
    classes unless the section sets them (a Flower app's own data: unsized)."""
    features = classes = 0
    if config.drift.enabled and config.flower.app is None:
        dataset = load_dataset(config.data.dataset)
        features = int(math.prod(dataset.x.shape[1:]))
        classes = int(dataset.num_classes)
    return make_drift(config.drift, secure, features=features, classes=classes)


def _publisher(config: SimulationConfig, app: ClientApp) -> tuple[Publisher | None, str | None]:
    """The run's publisher, or why publishing is skipped; or the publisher and why its
    versions will not be servable (an unregistered model builder).

    With the default settings a client app that cannot describe a servable model skips
    publishing (the run still runs); with ``publish.enabled = true`` set explicitly, or a
    factory named, that is a configuration error before any round runs.
    """
    section = config.publish
    if not section.enabled:
        return None, None
    from fedlearn.registry.publish import Publisher, serving_spec

    try:
        spec = serving_spec(section, app)
    except ConfigError:
        if section.model_fields_set & {"enabled", "factory", "inputs", "outputs"}:
            raise
        named = config.flower.app or config.client.app
        return None, (
            f"publishing skipped: the client app ({named}) cannot describe its "
            "model for serving (it has no serving_spec()). To publish, set publish.factory, "
            "publish.inputs and publish.outputs in the config."
        )
    publisher = Publisher(section, config.run.name, spec, registry_dir(config))
    return publisher, publisher.warning  # a builder serving would refuse: said up front


def _num_params(arrays: Arrays) -> int:
    return sum(int(a.size) for a in arrays.values())
