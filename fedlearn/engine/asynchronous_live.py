"""Asynchronous rounds with real clients (FedBuff over gRPC): replies at the sites' pace.

The simulation's asynchronous rounds (:mod:`fedlearn.engine.asynchronous`) order replies
on a virtual clock. With real sites the clock is the wall clock: the coordinator sends
each training task on its own (:meth:`LiveTransport.submit`) from the model it holds at
that moment, keeps ``concurrency`` sites training, and takes replies in the order they
arrive (:meth:`LiveTransport.next_reply`). Each round is still one aggregation:

1. the first ``buffer_size`` replies to arrive make up the round; each arrival frees its
   site's place, and an idle connected site is sent a task at once, from the current model
   (a site whose reply waits in the buffer is not sent another before the aggregation);
2. the arrivals fold in arrival order with their staleness (the number of aggregations
   since the model they trained from) and ``server_update`` gives the next model; the
   next sites start from it right away;
3. the evaluation stage runs on the connected sites that are not training at that moment
   (a site trains one task at a time), while the others keep training.

A task without a reply within the stage timeout, or whose site disconnects, arrives as a
failure (it counts towards the buffer; the quorum ``min_train_clients`` applies to the
accepted ones). The checkpoint holds the model and the strategy state; the tasks in
flight when a coordinator dies are lost with it, and a resumed run sends new ones from
the checkpointed model (real sites' timing cannot be replayed, so unlike the simulation
the resumed run is not bit-identical to an uninterrupted one).
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

import numpy as np

from fedlearn.engine.asynchronous import Arrival, Host, _Trained, aggregate
from fedlearn.engine.clock import job_seed
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, Metrics, Scalar
from fedlearn.engine.results import ClientRecord, RoundRecord, RunResult
from fedlearn.engine.validation import check_update
from fedlearn.errors import RoundFailed, UpdateRejected
from fedlearn.strategy.base import Asynchrony

_LIVE = 0x4C697665  # "Live": the stream of a live run's dispatch choices
POLL_S = 0.5
"""How long to wait for a reply before looking for newly connected sites again."""


@runtime_checkable
class LiveTransport(Protocol):
    """A transport that also sends tasks one at a time (the gRPC transport)."""

    def encode(self, arrays: Arrays) -> object:
        """``arrays`` ready to send with any number of tasks."""
        ...

    def submit(self, broadcast: object, task: Task) -> None:
        """Send ``task`` with ``broadcast`` (from :meth:`encode`)."""
        ...

    def next_reply(self, timeout: float) -> Reply | None:
        """The next reply to a submitted task (or its failure), or None after ``timeout``."""
        ...

    def cancel_submitted(self, reason: str) -> None:
        """Cancel every submitted task still awaited."""
        ...


class _Origin:
    """A model version that tasks in flight started from, encoded once for the wire."""

    def __init__(self, model: Arrays, broadcast: Arrays, encoded: object) -> None:
        self.model, self.broadcast, self.encoded = model, broadcast, encoded


class LiveRounds:
    """Runs an asynchronous strategy's rounds over ``transport`` (see the module)."""

    def __init__(self, coordinator: Host, transport: LiveTransport, asynchrony: Asynchrony):
        self.c = coordinator
        self.transport = transport
        self.asynchrony = asynchrony
        self.version = 0
        self.in_flight: dict[int, int] = {}
        """Client id -> the model version its task started from."""
        self.origins: dict[int, _Origin] = {}
        self._dispatched = 0

    def run(self, arrays: Arrays, state: Arrays, start_round: int) -> RunResult:
        """Rounds ``start_round..rounds`` from ``arrays``; cancels what is left in flight."""
        c = self.c
        self.version = start_round - 1
        self._rng = np.random.default_rng([c.seed, _LIVE, start_round])
        try:
            return c.drive(start_round, arrays, state, self._round)
        finally:
            self.transport.cancel_submitted("the run ended")

    def _round(
        self, rnd: int, arrays: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays, RoundRecord, list[ClientRecord]]:
        c = self.c
        t0 = time.perf_counter()
        ctx = c.round_context(rnd, state)
        records: list[ClientRecord] = []
        buffered: set[int] = set()
        arrivals: list[Arrival] = []
        self._fill(arrays, state, buffered)
        while len(arrivals) < self.asynchrony.buffer_size:
            reply = self.transport.next_reply(POLL_S)
            if reply is None:
                if not self.in_flight and c.before_round is not None:
                    c.before_round(rnd)  # no site to train: wait for sites (or give up)
                self._fill(arrays, state, buffered)  # sites may have connected
                continue
            version = self.in_flight.pop(reply.client_id, None)
            if version is None:  # not a task of this run's (cannot happen): ignore it
                continue
            buffered.add(reply.client_id)
            arrivals.append(self._arrival(reply, version))
            if len(arrivals) < self.asynchrony.buffer_size:
                self._fill(arrays, state, buffered)
        error: str | None = None
        train_metrics: Metrics = {}
        try:
            arrays, state, train_metrics = aggregate(c, ctx, arrays, state, arrivals, records)
        except RoundFailed as exc:
            error = str(exc)
        self.version += 1
        live = set(self.in_flight.values())
        self.origins = {v: o for v, o in self.origins.items() if v in live}
        self._fill(arrays, state, set())  # the last arrival's place, from the new model
        eval_selected, eval_ok, eval_metrics = 0, 0, dict[str, Scalar]()
        if c.evaluation_due(rnd):
            idle = [cid for cid in c._clients() if cid not in self.in_flight]
            eval_selected, eval_ok, eval_metrics = c._evaluate(ctx, arrays, records, idle)
        record = RoundRecord(
            round=rnd,
            ok=error is None,
            train_selected=len(arrivals),
            train_ok=sum(r.ok for r in records if r.stage is Stage.TRAIN),
            eval_selected=eval_selected,
            eval_ok=eval_ok,
            train_metrics=train_metrics,
            eval_metrics=eval_metrics,
            duration_s=time.perf_counter() - t0,
            error=error,
        )
        return arrays, state, record, records

    def _arrival(self, reply: Reply, version: int) -> Arrival:
        """``reply`` validated against the broadcast its task was sent with."""
        origin = self.origins[version]
        try:
            if not reply.ok:
                raise UpdateRejected(str(reply.error), client_id=reply.client_id)
            trained = _Trained(
                check_update(reply, origin.broadcast), reply.metrics, reply.num_examples, None
            )
        except UpdateRejected as exc:
            trained = _Trained(None, reply.metrics, reply.num_examples, exc.reason)
        return Arrival(reply.client_id, self.version - version, origin.model, trained)

    def _fill(self, arrays: Arrays, state: Arrays, buffered: set[int]) -> None:
        """Send tasks from the current model until ``concurrency`` sites are training or
        no connected site is idle; each new site drawn at random among the idle ones."""
        c = self.c
        strategy = c.strategy
        while len(self.in_flight) < self.asynchrony.concurrency:
            idle = [
                cid for cid in c._clients() if cid not in self.in_flight and cid not in buffered
            ]
            if not idle:
                return
            client = idle[int(self._rng.integers(len(idle)))]
            ctx = c.round_context(self.version + 1, state)
            origin = self.origins.get(self.version)
            if origin is None:
                broadcast = strategy.train_arrays(ctx, arrays)
                origin = _Origin(arrays, broadcast, self.transport.encode(broadcast))
                self.origins[self.version] = origin
            config = strategy.client_train_config(ctx, client, strategy.train_config(ctx))
            seed = job_seed(c.seed, (self.version << 20) + self._dispatched, client)
            self._dispatched += 1
            task = Task(Stage.TRAIN, self.version + 1, client, seed, dict(config))
            self.in_flight[client] = self.version
            self.transport.submit(origin.encoded, task)
