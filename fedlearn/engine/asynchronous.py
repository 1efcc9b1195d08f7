"""Asynchronous rounds: buffered aggregation (FedBuff) on the coordinator's stages.

A strategy whose :meth:`~fedlearn.strategy.base.Strategy.asynchrony` is not None runs
here instead of in synchronous rounds. The coordinator keeps ``concurrency`` clients
training; each *round* of the run is one aggregation of the next ``buffer_size`` replies,
so the run store, resume, round tables, reports and per-client evaluation work as for
any run. Who trains when is decided by :class:`~fedlearn.engine.clock.AsyncSchedule` on
the virtual clock, never by the order the backend happens to finish in, so a seed gives
the same run, bit for bit, on every backend.

A round ``r`` (the server holds model version ``r - 1``):

1. the schedule plays the next ``buffer_size`` arrivals and the dispatches they trigger;
2. every dispatched job whose model exists and that has not trained yet trains now, in
   one ordinary training stage per model version (in a run that was not interrupted: one
   stage, the jobs that start from version ``r - 1``, as many as a synchronous round of
   ``buffer_size`` clients). Replies are validated then and wait until they arrive;
3. the arrivals fold in arrival order, each a :class:`~fedlearn.strategy.base.ClientUpdate`
   with its ``staleness`` (``r - 1`` minus its version) and ``origin`` (the model it
   trained from); the strategy's :meth:`server_update` gives version ``r``;
4. the evaluation stage runs as in a synchronous round, and the round is recorded with
   the virtual time of its last arrival.

**Checkpoints.** The models (and strategy states) that in-flight jobs started from are
kept in the checkpoint's state under ``coordinator/model/<v>/`` and
``coordinator/state/<v>/``; the schedule is replayed from the seed. A resumed run trains
its in-flight jobs again from those models, with their own task seeds, so it ends
bit-identical to one that was never interrupted.

With live clients (a coordinator daemon over gRPC) replies come at the sites' own pace
instead: :mod:`fedlearn.engine.asynchronous_live` runs those rounds, with the same
:func:`aggregate`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedlearn.engine.clock import AsyncSchedule, Job, Latency, job_seed
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, Metrics, Scalar
from fedlearn.engine.results import ClientRecord, RoundRecord, RunResult
from fedlearn.engine.validation import aggregation, check_model, check_update
from fedlearn.errors import RoundFailed, UpdateRejected
from fedlearn.strategy.base import Asynchrony, ClientUpdate, RoundContext, Strategy

RoundStep = Callable[[int, Arrays, Arrays], tuple[Arrays, Arrays, RoundRecord, list[ClientRecord]]]
"""One round: ``(round, arrays, state) -> (arrays, state, its record, its client rows)``."""


class Host(Protocol):
    """What the asynchronous rounds use of their coordinator
    (:class:`~fedlearn.engine.coordinator.Coordinator`): its settings and stage helpers."""

    @property
    def strategy(self) -> Strategy: ...
    @property
    def client_ids(self) -> Sequence[int]: ...
    @property
    def rounds(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def before_round(self) -> Callable[[int], None] | None: ...
    @property
    def latency(self) -> Latency | None: ...

    def drive(
        self,
        start_round: int,
        arrays: Arrays,
        state: Arrays,
        step: RoundStep,
        stored: Callable[[Arrays], Arrays] = ...,
    ) -> RunResult: ...

    def round_context(self, rnd: int, state: Arrays) -> RoundContext: ...
    def evaluation_due(self, rnd: int) -> bool: ...
    def _stage(self, arrays: Arrays, tasks: list[Task]) -> Iterator[Reply]: ...

    def _note(self, records: list[ClientRecord], record: ClientRecord) -> None: ...

    def _check_quorum(self, ctx: RoundContext, accepted: int, selected: int) -> None: ...

    def _clients(self) -> list[int]: ...

    def _evaluate(
        self, ctx: RoundContext, arrays: Arrays, records: list[ClientRecord], clients: list[int]
    ) -> tuple[int, int, Metrics]: ...


OWN_PREFIX = "coordinator/"
"""State entries the coordinator keeps for itself in a checkpoint (never shown to the
strategy)."""
_MODEL = OWN_PREFIX + "model/"
_STATE = OWN_PREFIX + "state/"

Version = tuple[Arrays, Arrays]
"""A model version and the strategy state that came with it."""


def split_own(state: Arrays) -> tuple[Arrays, Arrays]:
    """``(strategy state, the coordinator's own entries)`` of a checkpointed state."""
    strategy = {k: v for k, v in state.items() if not k.startswith(OWN_PREFIX)}
    own = {k: v for k, v in state.items() if k.startswith(OWN_PREFIX)}
    return strategy, own


def pack_versions(versions: dict[int, Version]) -> Arrays:
    """``versions`` as checkpoint state entries."""
    out: Arrays = {}
    for v, (arrays, state) in sorted(versions.items()):
        out.update({f"{_MODEL}{v}/{k}": a for k, a in arrays.items()})
        out.update({f"{_STATE}{v}/{k}": a for k, a in state.items()})
    return out


def unpack_versions(own: Arrays) -> dict[int, Version]:
    """The versions :func:`pack_versions` wrote."""
    out: dict[int, Version] = {}
    for key, a in own.items():
        for prefix, slot in ((_MODEL, 0), (_STATE, 1)):
            if key.startswith(prefix):
                v, _, name = key[len(prefix) :].partition("/")
                out.setdefault(int(v), ({}, {}))[slot][name] = a
    return out


class _Trained:
    """A job's validated reply (or why it failed), waiting for its virtual arrival."""

    def __init__(
        self, update: ClientUpdate | None, metrics: Metrics, examples: int, error: str | None
    ) -> None:
        self.update, self.metrics, self.examples, self.error = update, metrics, examples, error


class AsyncRounds:
    """Runs an asynchronous strategy's rounds for ``coordinator`` (see the module)."""

    def __init__(self, coordinator: Host, asynchrony: Asynchrony) -> None:
        self.c = coordinator
        self.asynchrony = asynchrony

    def run(self, arrays: Arrays, state: Arrays, own: Arrays, start_round: int) -> RunResult:
        """Rounds ``start_round..rounds`` from model version ``start_round - 1``."""
        c = self.c
        schedule = AsyncSchedule(
            c.client_ids,
            self.asynchrony.concurrency,
            self.asynchrony.buffer_size,
            c.latency or Latency(),
            c.seed,
        )
        for _ in range(1, start_round):  # replay the clock up to the checkpoint
            schedule.next_round()
        self.schedule = schedule
        self.versions = unpack_versions(own)
        self.untrained: dict[int, Job] = dict(schedule.in_flight)
        self.pending: dict[int, _Trained] = {}
        return c.drive(start_round, arrays, state, self._round, self._stored)

    def _round(
        self, rnd: int, arrays: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays, RoundRecord, list[ClientRecord]]:
        c, schedule, untrained, pending = self.c, self.schedule, self.untrained, self.pending
        versions = self.versions
        t0 = time.perf_counter()
        plan = schedule.next_round()
        untrained.update((j.id, j) for j in plan.dispatched)
        current = rnd - 1
        versions[current] = (arrays, state)
        ready = sorted(
            (j for j in untrained.values() if j.version <= current),
            key=lambda j: (j.version, j.id),
        )
        for v in sorted({j.version for j in ready}):
            batch = [j for j in ready if j.version == v]
            pending.update(self._train(v, versions[v], batch))
            for j in batch:
                del untrained[j.id]
        records: list[ClientRecord] = []
        ctx = c.round_context(rnd, state)
        error: str | None = None
        train_metrics: Metrics = {}
        try:
            arrivals = [
                Arrival(
                    j.client_id,
                    current - j.version,
                    versions[j.version][0],
                    pending.pop(j.id),
                )
                for j in plan.arrivals
            ]
            arrays, state, train_metrics = aggregate(c, ctx, arrays, state, arrivals, records)
        except RoundFailed as exc:
            error = str(exc)
        live = {j.version for j in schedule.in_flight.values()}
        self.versions = {v: m for v, m in versions.items() if v in live and v < rnd}
        eval_selected, eval_ok, eval_metrics = 0, 0, dict[str, Scalar]()
        if c.evaluation_due(rnd):
            eval_selected, eval_ok, eval_metrics = c._evaluate(ctx, arrays, records, c._clients())
        record = RoundRecord(
            round=rnd,
            ok=error is None,
            train_selected=len(plan.arrivals),
            train_ok=sum(r.ok for r in records if r.stage is Stage.TRAIN),
            eval_selected=eval_selected,
            eval_ok=eval_ok,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            duration_s=time.perf_counter() - t0,
            error=error,
            virtual_time=plan.time,
        )
        return arrays, state, record, records

    def _stored(self, state: Arrays) -> Arrays:
        """The strategy's state with the model versions still in flight."""
        return self._state(state, self.versions)

    @staticmethod
    def _state(state: Arrays, versions: dict[int, Version]) -> Arrays:
        return {**state, **pack_versions(versions)}

    def _train(
        self, version: int, model: Version, jobs: list[Job]
    ) -> Iterable[tuple[int, _Trained]]:
        """Train ``jobs`` (all from ``version``) in one stage; their replies, validated."""
        c = self.c
        arrays, state = model
        strategy = c.strategy
        ctx = c.round_context(version + 1, state)
        config = strategy.train_config(ctx)
        tasks = [
            Task(
                Stage.TRAIN,
                version + 1,
                j.client_id,
                job_seed(c.seed, j.id, j.client_id),
                dict(strategy.client_train_config(ctx, j.client_id, config)),
            )
            for j in jobs
        ]
        by_client = {j.client_id: j.id for j in jobs}
        broadcast = strategy.train_arrays(ctx, arrays)
        out: list[tuple[int, _Trained]] = []
        for reply in c._stage(broadcast, tasks):
            job = by_client[reply.client_id]
            try:
                if not reply.ok:
                    raise UpdateRejected(str(reply.error), client_id=reply.client_id)
                update = check_update(reply, broadcast)
            except UpdateRejected as exc:
                out.append((job, _Trained(None, reply.metrics, reply.num_examples, exc.reason)))
                continue
            out.append((job, _Trained(update, reply.metrics, reply.num_examples, None)))
        return out


@dataclass(frozen=True)
class Arrival:
    """A reply as it joins the buffer: who, how stale, the model it trained from."""

    client_id: int
    staleness: int
    origin: Arrays
    trained: _Trained


def aggregate(
    c: Host,
    ctx: RoundContext,
    arrays: Arrays,
    state: Arrays,
    arrivals: list[Arrival],
    records: list[ClientRecord],
) -> tuple[Arrays, Arrays, Metrics]:
    """Fold a round's arrivals in arrival order and apply the server update (the global
    model is unchanged and RoundFailed raised if that fails or the quorum is not met)."""
    strategy = c.strategy
    accepted: list[ClientUpdate] = []
    with aggregation(ctx.round):
        fold = strategy.start_fold(ctx, arrays)
        for arrival in arrivals:
            trained, staleness = arrival.trained, arrival.staleness
            metrics = {**trained.metrics, "staleness": staleness}
            try:
                if trained.update is None:
                    raise UpdateRejected(str(trained.error), client_id=arrival.client_id)
                u = trained.update
                fold.add(
                    ClientUpdate(
                        u.client_id,
                        u.arrays,
                        u.num_examples,
                        u.metrics,
                        staleness=staleness,
                        origin=arrival.origin,
                    )
                )
            except UpdateRejected as exc:
                failed = ClientRecord(
                    ctx.round,
                    Stage.TRAIN,
                    arrival.client_id,
                    False,
                    trained.examples,
                    None,
                    metrics,
                    exc.reason,
                )
                c._note(records, failed)
                continue
            accepted.append(
                ClientUpdate(u.client_id, {}, u.num_examples, u.metrics, staleness=staleness)
            )
            c._note(
                records,
                ClientRecord(
                    ctx.round, Stage.TRAIN, arrival.client_id, True, u.num_examples, None, metrics
                ),
            )
        c._check_quorum(ctx, len(accepted), len(arrivals))
        new_arrays, new_state = strategy.server_update(ctx, arrays, fold.result(), state)
        new_arrays = check_model(new_arrays, arrays)
    return new_arrays, new_state, strategy.summarize_train(ctx, accepted)
