"""A simulation job from a config: data, ClientApp, strategy, run store, weights, report."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from fedlearn.config.simulation import SimulationConfig
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.engine.client_app import ClientApp, ProvidesInitialArrays, build_app
from fedlearn.engine.coordinator import Observer, RoundSink
from fedlearn.engine.references import resolve
from fedlearn.engine.results import RunResult
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import save_weights
from fedlearn.errors import ConfigError
from fedlearn.registry.publish import Published, Publisher, PublishingSink, serving_spec
from fedlearn.report.files import write_report
from fedlearn.run.builders import make_secure, make_strategy
from fedlearn.simulation import run_simulation


@dataclass(frozen=True)
class JobResult:
    """A finished simulation job: the run, its directory, what it published, one app."""

    result: RunResult
    out_dir: Path
    published: list[Published]
    app: ClientApp


def run_dir(config: SimulationConfig) -> Path:
    """Where a run writes its outputs."""
    return Path(config.run.out_dir or Path("runs") / config.run.name)


def registry_dir(config: SimulationConfig) -> Path:
    """Where a run publishes: ``publish.registry``, else ``registry/`` beside the run dir."""
    if config.publish.registry is not None:
        return Path(config.publish.registry)
    return run_dir(config).parent / "registry"


def run_job(
    config: SimulationConfig, observer: Observer | None = None, resume: bool = False
) -> JobResult:
    """Run the simulation ``config`` describes and write its run directory.

    With ``resume``, a run directory holding the same config continues after its last
    committed round (each round commits the model and strategy state atomically).
    """
    strategy = make_strategy(config.strategy)
    strategy.validate(config.run.clients)
    secure = make_secure(config.secagg)
    if secure is not None:
        secure.check(strategy, strategy.train_clients_per_round(config.run.clients))
    factory = resolve(config.client.app, "client.app")
    dataset = load_dataset(config.data.dataset)
    data = partition_dataset(
        dataset,
        config.data.partitioner,
        config.run.clients,
        config.run.seed,
        alpha=config.data.alpha,
        shards_per_client=config.data.shards_per_client,
        test_fraction=config.data.test_fraction,
    )
    app_factory = functools.partial(build_app, factory, data, dict(config.client.params))
    probe = app_factory()
    if not isinstance(probe, ProvidesInitialArrays):
        raise ConfigError(
            f"client.app: {config.client.app} must build an app with initial_arrays()"
        )
    out = run_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.model_dump_json(indent=2))
    store = RunStore(out / "run.db", run_id=config.run.name, checkpoint=True)
    publisher = (
        Publisher(
            config.publish,
            config.run.name,
            serving_spec(config.publish, probe),
            registry_dir(config),
        )
        if config.publish.enabled
        else None
    )
    sink: RoundSink = (
        store if publisher is None else PublishingSink(store, publisher, config.publish.every)
    )
    try:
        checkpoint = store.resume_run(config.run.seed, config.model_dump()) if resume else None
        if not resume:
            store.start_run(config.run.seed, config.model_dump())
        start_round, arrays, state = (
            (1, probe.initial_arrays(config.run.seed), None)
            if checkpoint is None
            else (checkpoint[0] + 1, checkpoint[1], checkpoint[2])
        )
        result = run_simulation(
            app_factory,
            strategy,
            num_clients=config.run.clients,
            rounds=config.run.rounds,
            initial_arrays=arrays,
            initial_state=state,
            start_round=start_round,
            seed=config.run.seed,
            backend=config.backend.kind,
            workers=config.backend.workers,
            evaluate_every=config.run.evaluate_every,
            sink=sink,
            observer=observer,
            run_id=config.run.name,
            secure=secure,
        )
        save_weights(
            result.arrays,
            out / "model.safetensors",
            {"run": config.run.name, "rounds": str(config.run.rounds)},
        )
        if publisher is not None:
            publisher.publish_final(result.arrays, result.rounds, result.clients)
        store.finish_run("finished" if any(r.ok for r in result.rounds) else "failed")
        write_report(store, out)
    finally:
        store.close()
    return JobResult(result, out, [] if publisher is None else publisher.published, probe)
