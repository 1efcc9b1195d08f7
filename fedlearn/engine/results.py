"""What a run produces: each client's outcome, each round's, and the run's.

These record types sit below both the coordinator and secure aggregation's stages, which
record client outcomes the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedlearn.drift.stats import DataSummary
from fedlearn.engine.messages import Reply, Stage
from fedlearn.engine.records import Arrays, Metrics
from fedlearn.strategy.base import ClientUpdate


@dataclass(frozen=True)
class ClientRecord:
    """The outcome of one task: a client's metrics, or why it failed."""

    round: int
    stage: Stage
    client_id: int
    ok: bool
    num_examples: int = 0
    loss: float | None = None
    metrics: Metrics = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round."""

    round: int
    ok: bool
    train_selected: int
    train_ok: int
    eval_selected: int = 0
    eval_ok: int = 0
    train_metrics: Metrics = field(default_factory=dict)
    eval_metrics: Metrics = field(default_factory=dict)
    duration_s: float = 0.0
    error: str | None = None
    candidates: tuple[int, ...] | None = None
    """The clients the strategy selected from this round (the connected sites of a
    deployment), in the order it saw them; None when it saw every enrolled client. With
    the clients whose replies were accepted, this is all a replay of the round needs."""
    virtual_time: float | None = None
    """Simulated time at the end of the round's training (virtual seconds since the run
    began, :mod:`fedlearn.engine.clock`): an asynchronous round's last arrival, a
    synchronous round's slowest client added up; None without a latency model."""
    data_stats: Mapping[int, DataSummary] = field(default_factory=dict, compare=False, repr=False)
    """The round's data summaries (drift monitoring): by client id, or under secure
    aggregation only the population's sum (key ``fedlearn.drift.POPULATION``)."""


@dataclass(frozen=True)
class RunResult:
    """The outcome of a run: the final model and what every round and client did."""

    arrays: Arrays
    state: Arrays
    rounds: list[RoundRecord]
    clients: list[ClientRecord]
    stopped: str | None = None
    """Why the run stopped before its last round (a privacy budget), or None."""


def accepted_train(rnd: int, reply: Reply) -> tuple[ClientUpdate, ClientRecord]:
    """An accepted training reply as the strategy sees it (no arrays) and as it is recorded."""
    meta = ClientUpdate(reply.client_id, {}, reply.num_examples, reply.metrics)
    record = ClientRecord(
        rnd, Stage.TRAIN, reply.client_id, True, reply.num_examples, None, reply.metrics
    )
    return meta, record
