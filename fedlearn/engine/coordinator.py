"""The coordinator: owns the round loop and drives any transport.

Per round it runs a training stage (select, send tasks, validate replies, fold them into
the aggregate as they arrive, apply the server update) and an evaluation stage (every
selected client evaluates the new global model; each result is recorded). Replies are
folded in task order, whatever order the transport delivers them in, so a seeded run
gives the same model bit for bit in every transport.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedlearn.drift.codec import split_reply
from fedlearn.drift.rule import POPULATION
from fedlearn.drift.stats import DataSummary, SummarySpec
from fedlearn.engine.asynchronous import OWN_PREFIX, AsyncRounds, RoundStep, split_own
from fedlearn.engine.asynchronous_live import LiveRounds, LiveTransport
from fedlearn.engine.clock import SYNC, Latency, check_asynchrony
from fedlearn.engine.messages import Reply, Stage, Task, seed_for
from fedlearn.engine.records import Arrays, Config, Metrics, Scalar
from fedlearn.engine.results import ClientRecord, RoundRecord, RunResult, accepted_train
from fedlearn.engine.validation import aggregation, check_evaluation, check_model, check_update
from fedlearn.engine.weights import load_weights, save_weights
from fedlearn.errors import (
    ConfigError,
    DataError,
    FedlearnError,
    RoundFailed,
    UpdateRejected,
)
from fedlearn.strategy.base import ClientEvaluation, ClientUpdate, Fold, RoundContext, Strategy

if TYPE_CHECKING:
    from fedlearn.secagg.stages import SecureAggregation


_CLOCK = OWN_PREFIX + "clock"
"""Checkpoint state entry: a synchronous run's virtual time (with a latency model)."""


class Transport(Protocol):
    """Moves one stage's tasks to clients and their replies back, in any order."""

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Run ``tasks`` with the shared ``broadcast`` arrays; yield one Reply per task."""
        ...

    def close(self) -> None:
        """Release workers and connections."""
        ...


class Observer(Protocol):
    """Receives progress events (a CLI progress bar, a metrics exporter)."""

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        """A stage of ``num_tasks`` tasks begins."""
        ...

    def reply_received(self, record: ClientRecord) -> None:
        """One client's reply was processed."""
        ...

    def round_finished(self, record: RoundRecord) -> None:
        """A round ended (applied or failed)."""
        ...


class Observers:
    """Fans every event out to several observers."""

    def __init__(self, *observers: Observer | None) -> None:
        self.observers = [o for o in observers if o is not None]

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        """Forward to each observer."""
        for o in self.observers:
            o.stage_started(round, stage, num_tasks)

    def reply_received(self, record: ClientRecord) -> None:
        """Forward to each observer."""
        for o in self.observers:
            o.reply_received(record)

    def round_finished(self, record: RoundRecord) -> None:
        """Forward to each observer."""
        for o in self.observers:
            o.round_finished(record)


class RoundSink(Protocol):
    """Stores each finished round atomically (see :class:`fedlearn.engine.store.RunStore`)."""

    def record_round(
        self, round: RoundRecord, clients: Sequence[ClientRecord], arrays: Arrays, state: Arrays
    ) -> None:
        """Persist one round."""
        ...


@dataclass
class Coordinator:
    """Runs ``rounds`` rounds of ``strategy`` over ``transport`` for ``client_ids``."""

    strategy: Strategy
    transport: Transport
    client_ids: Sequence[int]
    rounds: int
    seed: int = 0
    evaluate_every: int = 1
    sink: RoundSink | None = None
    observer: Observer | None = None
    available: Callable[[], Sequence[int]] | None = None
    """Which of ``client_ids`` can take tasks now (deployment); all of them if None."""
    before_round: Callable[[int], None] | None = None
    """Called before each round (deployment: wait until enough sites are connected)."""
    secure: SecureAggregation | None = None
    """Secure aggregation settings; the coordinator then sees only the sum of updates."""
    stop_before: Callable[[int], str | None] | None = None
    """Asked before each round; a reason (a privacy budget that the round would exceed)
    ends the run there, cleanly: :attr:`RunResult.stopped` says why."""
    hold_bytes: int | None = None
    """Memory for replies that arrive before their turn (they are folded in task order);
    beyond it early replies wait in temporary files. None: no limit."""
    latency: Latency | None = None
    """Simulated client latencies (:mod:`fedlearn.engine.clock`): the virtual clock that
    orders an asynchronous strategy's arrivals in simulation (constant if None; with
    ``available`` set, live clients reply at their own pace instead,
    :mod:`fedlearn.engine.asynchronous_live`) and, when set, the
    virtual time recorded with every round (a synchronous round lasts as long as its
    slowest selected client)."""
    data_stats: SummarySpec | None = None
    """Drift monitoring: every training task asks its client for a summary of its data
    over these fixed bins; the round records them (by client, or under secure
    aggregation only their sum) in :attr:`RoundRecord.data_stats`."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.evaluate_every < 0:
            raise ConfigError(f"evaluate_every must be >= 0, got {self.evaluate_every}")
        if len(set(self.client_ids)) != len(self.client_ids):
            raise ConfigError("client ids must be unique")
        self.strategy.validate(len(self.client_ids))
        self._clock = 0.0
        asynchrony = self.strategy.asynchrony(len(self.client_ids))
        if asynchrony is not None:
            check_asynchrony(asynchrony.concurrency, asynchrony.buffer_size, len(self.client_ids))
            if self.secure is not None:
                raise ConfigError(
                    f"{type(self.strategy).__name__} aggregates asynchronously, one client "
                    "at a time: it cannot run under secure aggregation"
                )
            if self.available is not None and not isinstance(self.transport, LiveTransport):
                raise ConfigError(
                    f"{type(self.strategy).__name__} is asynchronous: with live clients its "
                    "transport must send tasks one at a time (the gRPC transport does)"
                )
        if self.secure is not None:
            self.secure.check(
                self.strategy, self.strategy.train_clients_per_round(len(self.client_ids))
            )

    def run(
        self,
        initial_arrays: Arrays,
        state: Arrays | None = None,
        start_round: int = 1,
        *,
        copy: bool = True,
    ) -> RunResult:
        """Run rounds ``start_round..rounds`` from ``initial_arrays``.

        With ``copy=False`` the caller hands the arrays over (it must not use or change
        them again) and no second copy of the model is made.
        """
        arrays = {k: np.array(v) if copy else np.asarray(v) for k, v in initial_arrays.items()}
        own: Arrays = {}
        if state is not None:
            state, own = split_own(state)
        state = self.strategy.init_state(arrays) if state is None else state
        asynchrony = self.strategy.asynchrony(len(self.client_ids))
        if asynchrony is not None and self.data_stats is not None:
            raise ConfigError(
                "drift monitoring asks each round's clients for their data summaries; an "
                "asynchronous strategy has no such rounds: turn [drift] off"
            )
        if asynchrony is not None and self.available is not None:
            assert isinstance(self.transport, LiveTransport)
            return LiveRounds(self, self.transport, asynchrony).run(arrays, state, start_round)
        if asynchrony is not None:
            return AsyncRounds(self, asynchrony).run(arrays, state, own, start_round)
        clock = own.get(_CLOCK)
        self._clock = 0.0 if clock is None else float(clock.reshape(-1)[0])
        return self.drive(start_round, arrays, state, self.run_round, self._own)

    def drive(
        self,
        start_round: int,
        arrays: Arrays,
        state: Arrays,
        step: RoundStep,
        stored: Callable[[Arrays], Arrays] = lambda state: state,
    ) -> RunResult:
        """Rounds ``start_round..rounds``, each made by ``step``, between the run's hooks:
        ``stop_before`` and ``before_round`` ahead of a round, the sink and the observer
        after it. ``stored`` is the state as the sink and the result keep it (the
        strategy's, plus what the engine itself needs to resume)."""
        rounds: list[RoundRecord] = []
        clients: list[ClientRecord] = []
        for rnd in range(start_round, self.rounds + 1):
            stopped = None if self.stop_before is None else self.stop_before(rnd)
            if stopped is not None:
                return RunResult(arrays, stored(state), rounds, clients, stopped=stopped)
            if self.before_round is not None:
                self.before_round(rnd)
            arrays, state, record, records = step(rnd, arrays, state)
            rounds.append(record)
            clients.extend(records)
            if self.sink is not None:
                self.sink.record_round(record, records, arrays, stored(state))
            if self.observer is not None:
                self.observer.round_finished(record)
        return RunResult(arrays, stored(state), rounds, clients)

    def _own(self, state: Arrays) -> Arrays:
        """``state`` plus the coordinator's own entries (the virtual clock, if any)."""
        if self.latency is None:
            return state
        return {**state, _CLOCK: np.array([self._clock], np.float64)}

    def evaluation_due(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with an evaluation stage (every ``evaluate_every``
        rounds, and the last; never with ``evaluate_every = 0``)."""
        return bool(self.evaluate_every) and (rnd % self.evaluate_every == 0 or rnd == self.rounds)

    def round_context(self, rnd: int, state: Arrays) -> RoundContext:
        """What the strategy's hooks see in round ``rnd`` (its sampling generator is
        seeded by the run's seed and the round, so every backend draws alike)."""
        return RoundContext(
            rnd,
            self.rounds,
            np.random.default_rng([self.seed, rnd]),
            state,
            num_clients=len(self.client_ids),
            seed=self.seed,
        )

    def run_round(
        self, rnd: int, arrays: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays, RoundRecord, list[ClientRecord]]:
        """One round: train, apply if quorum holds, then evaluate the resulting model."""
        t0 = time.perf_counter()
        ctx = self.round_context(rnd, state)
        records: list[ClientRecord] = []
        clients = self._clients()
        selected = self.strategy.select_train(ctx, clients)
        virtual_time = None
        if self.latency is not None:
            self._clock += max(
                (self.latency.draw(self.seed, cid, SYNC, rnd) for cid in selected), default=0.0
            )
            virtual_time = self._clock
        error: str | None = None
        train_metrics: Metrics = {}
        stats: dict[int, DataSummary] = {}
        try:
            new_arrays, new_state, train_metrics = self._train(
                ctx, arrays, state, selected, records, stats
            )
            arrays, state = new_arrays, new_state
        except RoundFailed as exc:
            error = str(exc)
        train_ok = sum(r.ok for r in records)
        eval_selected, eval_ok, eval_metrics = 0, 0, dict[str, Scalar]()
        if self.evaluation_due(rnd):
            eval_selected, eval_ok, eval_metrics = self._evaluate(ctx, arrays, records, clients)
        record = RoundRecord(
            round=rnd,
            ok=error is None,
            train_selected=len(selected),
            train_ok=train_ok,
            eval_selected=eval_selected,
            eval_ok=eval_ok,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            duration_s=time.perf_counter() - t0,
            error=error,
            candidates=None if self.available is None else tuple(clients),
            virtual_time=virtual_time,
            data_stats=stats,
        )
        return arrays, state, record, records

    def evaluate_only(self, rnd: int, arrays: Arrays) -> tuple[RoundRecord, list[ClientRecord]]:
        """Round ``rnd``'s evaluation stage alone: the clients the strategy selects for
        evaluation evaluate ``arrays``; nothing trains, nothing is applied or stored. A
        cross-site evaluation (:mod:`fedlearn.crosssite`) runs one per model it evaluates."""
        t0 = time.perf_counter()
        ctx = self.round_context(rnd, {})
        records: list[ClientRecord] = []
        clients = self._clients()
        selected, ok, metrics = self._evaluate(ctx, arrays, records, clients)
        record = RoundRecord(
            round=rnd,
            ok=ok > 0,
            train_selected=0,
            train_ok=0,
            eval_selected=selected,
            eval_ok=ok,
            eval_metrics=metrics,
            duration_s=time.perf_counter() - t0,
            error=None if ok else f"round {rnd}: no client evaluated the model",
            candidates=None if self.available is None else tuple(clients),
        )
        if self.observer is not None:
            self.observer.round_finished(record)
        return record, records

    def _train(
        self,
        ctx: RoundContext,
        arrays: Arrays,
        state: Arrays,
        selected: list[int],
        records: list[ClientRecord],
        stats: dict[int, DataSummary],
    ) -> tuple[Arrays, Arrays, Metrics]:
        config = self.strategy.train_config(ctx)
        if self.data_stats is not None:
            config = {**config, **self.data_stats.to_config()}
        with aggregation(ctx.round):
            if self.secure is not None:
                aggregate, accepted = self._secure_mean(
                    ctx, arrays, selected, config, records, stats
                )
            else:
                fold, accepted = self._fold(ctx, arrays, selected, config, records, stats)
                aggregate = fold.result()
            new_arrays, new_state = self.strategy.server_update(ctx, arrays, aggregate, state)
            new_arrays = check_model(new_arrays, arrays)
        return new_arrays, new_state, self.strategy.summarize_train(ctx, accepted)

    def _fold(
        self,
        ctx: RoundContext,
        arrays: Arrays,
        selected: list[int],
        config: Config,
        records: list[ClientRecord],
        stats: dict[int, DataSummary],
    ) -> tuple[Fold, list[ClientUpdate]]:
        """Plain training stage: validate each update and fold it in as it arrives."""
        strategy = self.strategy
        tasks = [
            self._task(Stage.TRAIN, ctx.round, cid, strategy.client_train_config(ctx, cid, config))
            for cid in selected
        ]
        broadcast = strategy.train_arrays(ctx, arrays)
        fold = strategy.start_fold(ctx, arrays)
        accepted: list[ClientUpdate] = []
        for reply in self._stage(broadcast, tasks):
            try:
                if not reply.ok:
                    raise UpdateRejected(
                        str(reply.error), client_id=reply.client_id, round=ctx.round
                    )
                reply, summary = self._take_summary(reply)
                update = check_update(reply, broadcast)
                fold.add(update)
            except UpdateRejected as exc:
                self._note(records, _failed(Stage.TRAIN, reply, exc))
                continue
            if summary is not None:
                stats[reply.client_id] = summary
            meta, record = accepted_train(ctx.round, reply)
            accepted.append(meta)
            self._note(records, record)
        self._check_quorum(ctx, len(accepted), len(selected))
        return fold, accepted

    def _secure_mean(
        self,
        ctx: RoundContext,
        arrays: Arrays,
        selected: list[int],
        config: Config,
        records: list[ClientRecord],
        stats: dict[int, DataSummary],
    ) -> tuple[Arrays, list[ClientUpdate]]:
        """Secure training stages: the coordinator learns only the weighted sum (and,
        with drift monitoring, only the sum of the survivors' data summaries)."""
        from fedlearn.secagg.stages import secure_mean

        assert self.secure is not None
        mean, accepted = secure_mean(
            self.secure,
            rnd=ctx.round,
            seed=self.seed,
            selected=selected,
            global_arrays=arrays,
            config=dict(config),
            exchange=lambda stage, tasks, broadcast: self._stage(broadcast, tasks),
            task_seed=lambda stage, cid: seed_for(self.seed, ctx.round, stage, cid),
            note=lambda record: self._note(records, record),
            data_stats=self.data_stats,
            on_stats=lambda summary: stats.__setitem__(POPULATION, summary),
        )
        self._check_quorum(ctx, len(accepted), len(selected))
        return mean, accepted

    def _take_summary(self, reply: Reply) -> tuple[Reply, DataSummary | None]:
        """The reply without its data summary arrays, and the summary (if any)."""
        if self.data_stats is None or reply.arrays is None:
            return reply, None
        try:
            arrays, summary = split_reply(reply.arrays, self.data_stats)
        except DataError as exc:
            raise UpdateRejected(
                f"bad data summary: {exc}", client_id=reply.client_id, round=reply.round
            ) from exc
        return replace(reply, arrays=arrays), summary

    def _check_quorum(self, ctx: RoundContext, accepted: int, selected: int) -> None:
        if accepted < self.strategy.min_train_clients:
            raise RoundFailed(
                f"round {ctx.round}: {accepted} of {selected} clients returned valid "
                f"updates, below the quorum of {self.strategy.min_train_clients}; "
                "the global model is unchanged"
            )

    def _evaluate(
        self, ctx: RoundContext, arrays: Arrays, records: list[ClientRecord], clients: list[int]
    ) -> tuple[int, int, Metrics]:
        selected = self.strategy.select_evaluate(ctx, clients)
        config = self.strategy.evaluate_config(ctx)
        tasks = [self._task(Stage.EVALUATE, ctx.round, cid, config) for cid in selected]
        evaluations: list[ClientEvaluation] = []
        for reply in self._stage(arrays, tasks):
            try:
                if not reply.ok:
                    raise UpdateRejected(
                        str(reply.error), client_id=reply.client_id, round=ctx.round
                    )
                evaluation = check_evaluation(reply)
            except UpdateRejected as exc:
                self._note(records, _failed(Stage.EVALUATE, reply, exc))
                continue
            evaluations.append(evaluation)
            self._note(
                records,
                ClientRecord(
                    ctx.round,
                    Stage.EVALUATE,
                    reply.client_id,
                    True,
                    reply.num_examples,
                    reply.loss,
                    reply.metrics,
                ),
            )
        metrics = self.strategy.summarize_evaluate(ctx, evaluations) if evaluations else {}
        return len(selected), len(evaluations), metrics

    def _clients(self) -> list[int]:
        if self.available is None:
            return list(self.client_ids)
        enrolled = set(self.client_ids)
        return sorted(c for c in self.available() if c in enrolled)

    def _task(self, stage: Stage, rnd: int, cid: int, config: Config) -> Task:
        return Task(stage, rnd, cid, seed_for(self.seed, rnd, stage, cid), dict(config))

    def _stage(self, arrays: Arrays, tasks: list[Task]) -> Iterator[Reply]:
        if self.observer is not None and tasks:
            self.observer.stage_started(tasks[0].round, tasks[0].stage, len(tasks))
        return in_task_order(self.transport.execute(arrays, tasks), tasks, self.hold_bytes)

    def _note(self, records: list[ClientRecord], record: ClientRecord) -> None:
        records.append(record)
        if self.observer is not None:
            self.observer.reply_received(record)


def in_task_order(
    replies: Iterable[Reply], tasks: Sequence[Task], hold_bytes: int | None = None
) -> Iterator[Reply]:
    """Yield ``replies`` in the order of ``tasks``, holding early arrivals back.

    A reply for a client that was not asked, or a second reply from the same client,
    is dropped. A task without a reply when the transport finishes yields a failure.
    Early replies' arrays are kept in memory up to ``hold_bytes`` in all; past that they
    wait in a temporary safetensors file (read back bit for bit when their turn comes), so
    out-of-order arrivals cannot grow the coordinator's memory without bound.
    """
    position = {t.client_id: i for i, t in enumerate(tasks)}
    held = _HeldReplies(hold_bytes)
    following = 0
    try:
        for reply in replies:
            i = position.get(reply.client_id)
            if i is None or i < following or i in held or reply.stage != tasks[i].stage:
                continue
            if i == following:
                yield reply
                following += 1
            else:
                held.put(i, reply)
            while following in held:
                yield held.pop(following)
                following += 1
        for i in range(following, len(tasks)):
            if i in held:
                yield held.pop(i)
            else:
                t = tasks[i]
                yield Reply(t.stage, t.round, t.client_id, error="no reply from the client")
    finally:
        held.close()


class _HeldReplies:
    """Replies waiting for their turn: in memory up to a byte budget, then on disk."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.memory: dict[int, Reply] = {}
        self.on_disk: dict[int, tuple[Reply, Path]] = {}
        self.in_memory = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __contains__(self, i: int) -> bool:
        return i in self.memory or i in self.on_disk

    def put(self, i: int, reply: Reply) -> None:
        size = _nbytes(reply)
        if self.budget is None or self.in_memory + size <= self.budget or not reply.arrays:
            self.memory[i] = reply
            self.in_memory += size
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="fedlearn-held-")
        path = Path(self._dir.name) / f"{i}.safetensors"
        try:
            save_weights(reply.arrays, path)
        except (FedlearnError, OSError, ValueError, TypeError):
            # arrays safetensors cannot hold (validation rejects them later) or a full
            # disk: keep this one in memory rather than lose it
            path.unlink(missing_ok=True)
            self.memory[i] = reply
            self.in_memory += size
            return
        self.on_disk[i] = (replace(reply, arrays=None), path)

    def pop(self, i: int) -> Reply:
        if i in self.memory:
            reply = self.memory.pop(i)
            self.in_memory -= _nbytes(reply)
            return reply
        reply, path = self.on_disk.pop(i)
        arrays = load_weights(path)
        path.unlink()
        return replace(reply, arrays=arrays)

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _nbytes(reply: Reply) -> int:
    return sum(int(a.nbytes) for a in (reply.arrays or {}).values()) + len(reply.payload)


def _failed(stage: Stage, reply: Reply, exc: UpdateRejected) -> ClientRecord:
    return ClientRecord(
        reply.round, stage, reply.client_id, False, reply.num_examples, error=exc.reason
    )
