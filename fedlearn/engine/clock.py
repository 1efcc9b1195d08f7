"""The virtual clock of a simulation: client latencies and the schedule of asynchronous runs.

A simulated client answers as fast as the machine computes, so in simulation the time a
client takes is *drawn* instead: :class:`Latency` is a distribution (constant, uniform or
log-normal), and each draw is seeded by (run seed, client, task), so the same seed gives
the same latencies on every backend and in every process.

:class:`AsyncSchedule` plays an asynchronous (buffered) run on that clock: it keeps
``concurrency`` clients training, lets the ``buffer_size`` earliest replies (by virtual
arrival time, ties by dispatch order) make up each aggregation, and dispatches a new
client the moment a reply arrives. Which client trains, from which model version and when
its reply arrives depend only on the seed and the settings, never on what the clients
compute or how fast the backend runs them: the schedule of a run can be replayed from
scratch (a resumed run does that) and is the same in every transport.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from fedlearn.errors import ConfigError

LatencyKind = Literal["constant", "uniform", "lognormal"]

_LATENCY = 0x4C6174  # "Lat": keeps latency draws apart from every other seeded stream
_PICK = 0x5069636B  # "Pick": which idle client an asynchronous dispatch takes
_TASK = 0x4A6F62  # "Job": the task seed of an asynchronous dispatch
SYNC, ASYNC = 0, 1
"""Draw keys: a synchronous round's task is keyed by its round, an asynchronous one by
its dispatch number."""


@dataclass(frozen=True)
class Latency:
    """How long a simulated client takes for a training task, in virtual seconds.

    * ``constant``: always ``value``;
    * ``uniform``: uniform on ``[low, high]``;
    * ``lognormal``: ``median * exp(sigma * z)``, ``z`` standard normal (heavy-tailed:
      ``sigma = 1`` makes one client in twenty about 5x slower than the median).

    ``per = "task"`` draws afresh for every task; ``per = "client"`` draws once per client
    (a persistently fast or slow device).
    """

    kind: LatencyKind = "constant"
    value: float = 1.0
    low: float = 0.5
    high: float = 1.5
    median: float = 1.0
    sigma: float = 1.0
    per: Literal["task", "client"] = "task"

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "uniform", "lognormal"):
            raise ConfigError(
                f"latency kind must be 'constant', 'uniform' or 'lognormal', got {self.kind!r}"
            )
        if self.per not in ("task", "client"):
            raise ConfigError(f"latency per must be 'task' or 'client', got {self.per!r}")
        if self.kind == "constant" and not self.value > 0:
            raise ConfigError(f"constant latency needs value > 0, got {self.value}")
        if self.kind == "uniform" and not 0 <= self.low < self.high:
            raise ConfigError(
                f"uniform latency needs 0 <= low < high, got low={self.low}, high={self.high}"
            )
        if self.kind == "lognormal" and not (self.median > 0 and self.sigma > 0):
            raise ConfigError(
                "log-normal latency needs median > 0 and sigma > 0, got "
                f"median={self.median}, sigma={self.sigma}"
            )
        for name in ("value", "low", "high", "median", "sigma"):
            if not np.isfinite(getattr(self, name)):
                raise ConfigError(f"latency {name} must be finite, got {getattr(self, name)}")

    def draw(self, seed: int, client_id: int, kind: int, key: int) -> float:
        """Client ``client_id``'s latency for the task ``(kind, key)``: ``(SYNC, round)`` or
        ``(ASYNC, dispatch number)`` (ignored with ``per = "client"``)."""
        if self.kind == "constant":
            return float(self.value)
        words = [seed, _LATENCY, client_id] + ([kind, key] if self.per == "task" else [])
        rng = np.random.default_rng(words)
        if self.kind == "uniform":
            return float(self.low + (self.high - self.low) * rng.random())
        return float(self.median * np.exp(self.sigma * rng.standard_normal()))


def job_seed(seed: int, job: int, client_id: int) -> int:
    """The 63-bit task seed of asynchronous dispatch ``job`` (to client ``client_id``)."""
    high, low = (
        np.random.SeedSequence([seed, _TASK, job, client_id])
        .generate_state(2, dtype=np.uint32)
        .tolist()
    )
    return int((high << 32) | low) & ((1 << 63) - 1)


@dataclass(frozen=True)
class Job:
    """One client's training in an asynchronous run."""

    id: int
    """Dispatch number, from 0 in dispatch order."""
    client_id: int
    version: int
    """The model version it trains from: how many aggregations were done when it started."""
    start: float
    """Virtual time it was dispatched."""
    arrival: float
    """Virtual time its reply arrives."""


@dataclass(frozen=True)
class RoundPlan:
    """One aggregation of an asynchronous run: the replies that make it up, in arrival
    order, and the virtual time of the last one (when the server aggregates)."""

    round: int
    arrivals: list[Job]
    time: float
    dispatched: list[Job] = field(default_factory=list)
    """The jobs dispatched while this buffer filled and right after it was aggregated."""


class AsyncSchedule:
    """Who trains when in an asynchronous run, on the virtual clock (see the module).

    At time 0 ``concurrency`` distinct clients start from model version 0. Each arrival
    is buffered; until the buffer holds ``buffer_size`` replies, each arrival dispatches a
    new client at once, from the current version; the ``buffer_size``-th arrival closes
    the aggregation (the version goes up by one) and then dispatches its replacement from
    the new version. A client in flight, or whose reply waits in the buffer, is not
    dispatched again; each new client is drawn uniformly from the others (seeded by the
    dispatch number). This needs ``buffer_size <= concurrency`` and
    ``concurrency + buffer_size - 1 <= clients``.
    """

    def __init__(
        self,
        client_ids: Sequence[int],
        concurrency: int,
        buffer_size: int,
        latency: Latency,
        seed: int,
    ) -> None:
        check_asynchrony(concurrency, buffer_size, len(client_ids))
        self.client_ids = sorted(client_ids)
        self.concurrency = concurrency
        self.buffer_size = buffer_size
        self.latency = latency
        self.seed = seed
        self.version = 0
        self.time = 0.0
        self.in_flight: dict[int, Job] = {}
        self._heap: list[tuple[float, int]] = []
        self._busy: set[int] = set()
        self._next = 0
        for _ in range(concurrency):
            self._dispatch()

    def _dispatch(self) -> Job:
        number = self._next
        self._next += 1
        idle = [c for c in self.client_ids if c not in self._busy]
        rng = np.random.default_rng([self.seed, _PICK, number])
        client = idle[int(rng.integers(len(idle)))]
        latency = self.latency.draw(self.seed, client, ASYNC, number)
        job = Job(number, client, self.version, self.time, self.time + latency)
        heapq.heappush(self._heap, (job.arrival, number))
        self.in_flight[number] = job
        self._busy.add(client)
        return job

    def next_round(self) -> RoundPlan:
        """Advance the clock over the next ``buffer_size`` arrivals (one aggregation)."""
        arrivals: list[Job] = []
        dispatched: list[Job] = []
        while len(arrivals) < self.buffer_size:
            when, number = heapq.heappop(self._heap)
            self.time = when
            arrivals.append(self.in_flight.pop(number))
            if len(arrivals) < self.buffer_size:
                dispatched.append(self._dispatch())
        self.version += 1
        for job in arrivals:
            self._busy.discard(job.client_id)
        dispatched.append(self._dispatch())
        return RoundPlan(self.version, arrivals, self.time, dispatched)


def check_asynchrony(concurrency: int, buffer_size: int, num_clients: int) -> None:
    """ConfigError unless ``1 <= buffer_size <= concurrency`` and there are enough clients
    to keep ``concurrency`` training while a buffer fills."""
    if buffer_size < 1:
        raise ConfigError(f"buffer_size (K) must be >= 1, got {buffer_size}")
    if concurrency < buffer_size:
        raise ConfigError(
            f"concurrency (M) = {concurrency} must be >= buffer_size (K) = {buffer_size}: "
            "a buffer of K replies needs at least K clients training"
        )
    if concurrency + buffer_size - 1 > num_clients:
        raise ConfigError(
            f"concurrency (M) = {concurrency} and buffer_size (K) = {buffer_size} need "
            f"M + K - 1 = {concurrency + buffer_size - 1} clients (a client whose reply "
            f"waits in the buffer does not train again before it is aggregated), but the "
            f"run has {num_clients}"
        )


__all__ = [
    "AsyncSchedule",
    "Job",
    "Latency",
    "LatencyKind",
    "RoundPlan",
    "check_asynchrony",
    "job_seed",
]
