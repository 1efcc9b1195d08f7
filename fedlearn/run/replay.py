"""Replay a run from its store: the same rounds again, in this process, with the same clients.

Every task's seed comes from (run seed, round, stage, client) and replies are folded in
task order, so a round's outcome depends only on the clients the strategy selected from,
and on which of the selected clients' replies were accepted. The run store records both
(``RoundRecord.candidates`` and each client's result per stage), and a replay feeds them
back: each round selects from the recorded candidates, the clients recorded as having
answered run their task in-process, and every other selected client fails with its
recorded error. A faithful run is reproduced exactly: every round's record and every
client's result (all but durations), and the final model and strategy state bit for bit.

That audits a run: a coordinator killed and restarted, sites that crashed mid-round, a
run that resumed after changes to its operational settings (``run.rounds`` and
``run.evaluate_every`` take the values each round ran with). A difference means the
store does not describe the model it holds, or the ClientApp and data given to the
replay are not what the clients ran. A simulation's store names its ClientApp and data;
a coordinator's does not, so its replay needs the sites' ClientApp (for instance from a
site config whose data every client id can be read from: simulated partitions).
Secure-aggregation runs are not replayed: their outcome depends on the stage at which
each client dropped out, which the store does not keep; nor are runs with secure
differential-privacy noise, which nobody can reproduce (seeded-noise runs replay).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
from fedlearn.config.simulation import SimulationConfig
from fedlearn.engine.client_app import ClientApp, ProvidesInitialArrays, build_app
from fedlearn.engine.coordinator import Coordinator, Transport
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays
from fedlearn.engine.references import resolve
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import ConfigChange, RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.errors import ConfigError, FedlearnError
from fedlearn.run.builders import make_privacy, make_strategy
from fedlearn.run.lifecycle import MODEL_FILE, Status
from fedlearn.simulation.inprocess import InProcessTransport

NOT_RECORDED = "no result recorded for this client in this stage"
"""The error a selected client fails with when the store holds no result for it."""


@dataclass(frozen=True)
class Recorded:
    """What a run store says about one run."""

    run_id: str
    seed: int
    status: str
    config: SimulationConfig | CoordinatorConfig
    """The run's current config (its operational fields as of its last start)."""
    changes: list[ConfigChange]
    rounds: list[RoundRecord]
    clients: list[ClientRecord]
    checkpoint: tuple[int, Arrays, Arrays] | None
    """The last committed round's (round, model, strategy state), digest checked."""
    model: Arrays | None
    """The final model file of a finished run."""

    def setting(self, name: str, rnd: int) -> Any:
        """The value ``run.<name>`` had when round ``rnd`` ran."""
        value = getattr(self.config.run, name)
        for change in reversed(self.changes):
            if change.field == f"run.{name}" and change.round > rnd:
                value = change.old
        return value


@dataclass(frozen=True)
class Replay:
    """A replayed run next to its record."""

    recorded: Recorded
    arrays: Arrays
    """The replay's final model."""
    state: Arrays
    rounds: list[RoundRecord]
    clients: list[ClientRecord]
    differences: list[str] = field(default_factory=list)
    """Each way the replay differs from the record (empty: it reproduces the run)."""

    @property
    def matches(self) -> bool:
        """Whether the replay reproduces every record and the final model bit for bit."""
        return not self.differences


def read_recorded(directory: str | Path, run_id: str | None = None) -> Recorded:
    """Read a run directory's run (``run_id``, or its only or latest run) for a replay."""
    directory = Path(directory)
    db = directory / "run.db"
    if not db.is_file():
        raise FedlearnError(f"{db} does not exist")
    store = RunStore(db, read_only=True)
    try:
        ids = store.run_ids()
        if run_id is None and ids:
            run_id = ids[-1]
        if run_id not in ids:
            raise FedlearnError(f"{db} holds runs {ids}, not {run_id!r}")
        store.run_id = run_id
        info = store.run_info()
        status = info["status"]
        model_file = directory / MODEL_FILE
        return Recorded(
            run_id=run_id,
            seed=int(info["seed"]),
            status=status,
            config=_config(info["config"]),
            changes=store.config_changes(),
            rounds=store.rounds(),
            clients=store.clients(),
            checkpoint=store.last_checkpoint(),
            model=(
                load_weights(model_file)
                if status == Status.FINISHED and model_file.is_file()
                else None
            ),
        )
    finally:
        store.close()


def _config(stored: Mapping[str, Any]) -> SimulationConfig | CoordinatorConfig:
    kind: type[SimulationConfig] | type[CoordinatorConfig]
    kind = CoordinatorConfig if "server" in stored else SimulationConfig
    try:
        return kind.model_validate(dict(stored))
    except ValidationError as exc:
        raise ConfigError(f"the run's stored config no longer validates: {exc}") from exc


def site_app_factory(site_config: SiteConfig) -> Callable[[], ClientApp]:
    """The ClientApp a site config builds, over the data it names (to replay a
    coordinator's run, every client id's data must be readable from it: simulated
    partitions)."""
    from fedlearn.deploy.launch import site_app, site_data

    if site_config.client.app is None or site_config.data is None:
        app = site_app(site_config)  # a Flower app: one object, its state kept by client id
        return lambda: app
    factory = resolve(site_config.client.app, "client.app")
    data = site_data(site_config.data)
    return functools.partial(build_app, factory, data, dict(site_config.client.params))


def replay_run(
    directory: str | Path,
    app_factory: Callable[[], ClientApp] | None = None,
    *,
    run_id: str | None = None,
    initial_arrays: Arrays | None = None,
) -> Replay:
    """Replay the run stored in ``directory`` round by round and compare it with its record.

    ``app_factory`` builds the ClientApp the clients ran: needed for a coordinator's run
    (its store does not name the sites' app); a simulation's run builds its own from its
    config when it is None. ``initial_arrays`` replaces the run's initial model (a
    coordinator's ``[model] weights`` file that has moved). Raises ConfigError for runs
    that cannot be replayed (secure aggregation, no ClientApp).
    """
    recorded = read_recorded(directory, run_id)
    config = recorded.config
    if config.secagg.enabled:
        raise ConfigError(
            "a secure-aggregation run cannot be replayed: its outcome depends on the stage "
            "at which each client dropped out, which the run store does not keep"
        )
    if config.privacy.mode != "off" and config.privacy.noise == "secure":
        raise ConfigError(
            "a run with secure differential-privacy noise cannot be replayed: nobody can "
            "reproduce its noise (privacy.noise = 'seeded' runs replay, and protect nobody)"
        )
    strategy = make_strategy(config.strategy)
    if isinstance(config, SimulationConfig):
        client_ids = list(range(config.run.clients))
        client_run_id = recorded.run_id  # what a simulation's clients see as ctx.run_id
        factory = app_factory
        if factory is None:
            from fedlearn.run.job import client_app_factory

            factory = client_app_factory(config)
        if initial_arrays is None:
            probe = factory()
            if not isinstance(probe, ProvidesInitialArrays):
                raise ConfigError(f"client.app: {config.client.app} has no initial_arrays()")
            initial_arrays = probe.initial_arrays(recorded.seed)
    else:
        if app_factory is None:
            raise ConfigError(
                "a coordinator's run store does not name the sites' ClientApp: pass the "
                "app the sites ran (fedlearn replay DIR --site-config site.toml)"
            )
        factory = app_factory
        client_ids = _enrolled(recorded)
        client_run_id = ""  # a site's runtime knows no run id
        if initial_arrays is None:
            from fedlearn.deploy.server import initial_arrays as model_of

            initial_arrays = model_of(config)
    if strategy.asynchrony(len(client_ids)) is not None:
        raise ConfigError(
            f"{type(strategy).__name__} runs asynchronously (its rounds are aggregations of "
            "replies that trained from earlier models): replaying such a run is not supported"
        )
    strategy, _ = make_privacy(
        config.privacy,
        strategy,
        num_clients=len(client_ids),
        seed=recorded.seed,
        secure=None,
    )
    outcomes = {(c.round, c.stage, c.client_id): c for c in recorded.clients}
    transport = RecordedOutcomes(InProcessTransport(factory, client_run_id), outcomes)
    candidates: list[Sequence[int]] = [client_ids]
    coordinators: dict[tuple[int, int], Coordinator] = {}
    arrays = {k: np.array(v) for k, v in initial_arrays.items()}
    state = strategy.init_state(arrays)
    rounds: list[RoundRecord] = []
    clients: list[ClientRecord] = []
    try:
        for record in recorded.rounds:
            # the operational settings this round ran with
            num_rounds = int(recorded.setting("rounds", record.round))
            evaluate_every = int(recorded.setting("evaluate_every", record.round))
            coordinator = coordinators.get((num_rounds, evaluate_every))
            if coordinator is None:
                coordinator = coordinators[num_rounds, evaluate_every] = Coordinator(
                    strategy,
                    transport,
                    client_ids,
                    num_rounds,
                    seed=recorded.seed,
                    evaluate_every=evaluate_every,
                    available=lambda: candidates[0],
                )
            candidates[0] = client_ids if record.candidates is None else record.candidates
            arrays, state, replayed, records = coordinator.run_round(record.round, arrays, state)
            rounds.append(replayed)
            clients.extend(records)
    finally:
        transport.close()
    differences = compare(recorded, rounds, clients, arrays, state, client_ids)
    return Replay(recorded, arrays, state, rounds, clients, differences)


def _enrolled(recorded: Recorded) -> list[int]:
    """The client ids a coordinator's run knew: every one it selected from or tasked."""
    ids = {c.client_id for c in recorded.clients}
    for r in recorded.rounds:
        ids.update(r.candidates or ())
    return sorted(ids)


class RecordedOutcomes:
    """A Transport in which only the clients recorded as answering a task answer it.

    Tasks of clients whose result in that round and stage was recorded as ok run on
    ``inner``; every other task fails at once with the recorded error (and the recorded
    ``num_examples``, as a rejected reply carries), or :data:`NOT_RECORDED`.
    """

    def __init__(
        self, inner: Transport, outcomes: Mapping[tuple[int, Stage, int], ClientRecord]
    ) -> None:
        self.inner = inner
        self.outcomes = outcomes

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Failures first, then the inner transport's replies to the tasks that ran."""
        run: list[Task] = []
        for task in tasks:
            outcome = self.outcomes.get((task.round, task.stage, task.client_id))
            if outcome is not None and outcome.ok:
                run.append(task)
                continue
            yield Reply(
                task.stage,
                task.round,
                task.client_id,
                num_examples=0 if outcome is None else outcome.num_examples,
                error=NOT_RECORDED if outcome is None else outcome.error or NOT_RECORDED,
            )
        if run:
            yield from self.inner.execute(broadcast, run)

    def close(self) -> None:
        """Close the inner transport."""
        self.inner.close()


# ------------------------------------------------------------------ comparing

ROUND_FIELDS = (
    "ok",
    "train_selected",
    "train_ok",
    "eval_selected",
    "eval_ok",
    "train_metrics",
    "eval_metrics",
    "error",
)
CLIENT_FIELDS = ("ok", "num_examples", "loss", "metrics", "error")


def compare(
    recorded: Recorded,
    rounds: Sequence[RoundRecord],
    clients: Sequence[ClientRecord],
    arrays: Arrays,
    state: Arrays,
    client_ids: Sequence[int],
) -> list[str]:
    """Every way a replay (``rounds``, ``clients``, final ``arrays`` and ``state``)
    differs from ``recorded``; durations are not compared."""
    out: list[str] = []
    for old, new in zip(recorded.rounds, rounds, strict=True):
        for name in ROUND_FIELDS:
            a, b = _plain(getattr(old, name)), _plain(getattr(new, name))
            if a != b:
                out.append(f"round {old.round}: {name} recorded {a!r}, replayed {b!r}")
        a_c = list(client_ids if old.candidates is None else old.candidates)
        b_c = list(client_ids if new.candidates is None else new.candidates)
        if a_c != b_c:
            out.append(f"round {old.round}: candidates recorded {a_c}, replayed {b_c}")
    before = {(c.round, c.stage.value, c.client_id): c for c in recorded.clients}
    after = {(c.round, c.stage.value, c.client_id): c for c in clients}
    for key in sorted(before.keys() | after.keys()):
        where = f"round {key[0]}, {key[1]}, client {key[2]}"
        old_c, new_c = before.get(key), after.get(key)
        if old_c is None or new_c is None:
            side = "replayed only" if old_c is None else "recorded only"
            out.append(f"{where}: {side}")
            continue
        for name in CLIENT_FIELDS:
            a, b = _plain(getattr(old_c, name)), _plain(getattr(new_c, name))
            if a != b:
                out.append(f"{where}: {name} recorded {a!r}, replayed {b!r}")
    if recorded.checkpoint is not None:
        rnd, model, server_state = recorded.checkpoint
        out += _array_differences(f"round {rnd} checkpoint model", model, arrays)
        out += _array_differences(f"round {rnd} checkpoint strategy state", server_state, state)
    if recorded.model is not None:
        out += _array_differences(MODEL_FILE, recorded.model, arrays)
    return out


def _plain(value: Any) -> Any:
    """A record value as the store keeps it (metrics through JSON)."""
    if isinstance(value, dict):
        return json.loads(json.dumps(value))
    return value


def _array_differences(what: str, recorded: Arrays, replayed: Arrays) -> list[str]:
    if list(recorded) != list(replayed):
        return [f"{what}: arrays {list(recorded)} recorded, {list(replayed)} replayed"]
    out = []
    for name, a in recorded.items():
        b = np.asarray(replayed[name])
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            out.append(f"{what}: array {name!r} differs from the replay")
    return out


def same_arrays(a: Arrays, b: Arrays) -> bool:
    """Whether two models have the same names, dtypes, shapes and bytes."""
    return not _array_differences("", a, b)


__all__ = [
    "NOT_RECORDED",
    "RecordedOutcomes",
    "Recorded",
    "Replay",
    "compare",
    "read_recorded",
    "replay_run",
    "same_arrays",
    "site_app_factory",
]
