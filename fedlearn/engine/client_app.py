"""What a user writes: a ClientApp that trains and evaluates on its own data.

The same ClientApp object runs in every transport: in-process, in a worker pool and,
later, inside a site daemon. It sees only arrays, a config and a context; it never
touches sockets or the coordinator's state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedlearn.engine.client_state import ClientState
from fedlearn.engine.records import Arrays, Config, Metrics
from fedlearn.errors import ConfigError


@dataclass(frozen=True)
class ClientContext:
    """Where a task runs: which client, which round, the task's seed, and the client's
    own state."""

    client_id: int
    round: int
    seed: int
    run_id: str = ""
    load_state: Callable[[], ClientState] | None = field(default=None, repr=False, compare=False)
    """How :attr:`state` is loaded (the runtime sets it; None: a fresh empty state)."""

    @cached_property
    def rng(self) -> np.random.Generator:
        """A numpy generator seeded for this (run, round, client, stage)."""
        return np.random.default_rng(self.seed)

    @cached_property
    def state(self) -> ClientState:
        """This client's own state, as its last successful task left it (loaded on first
        use; see :mod:`fedlearn.engine.client_state`). Change it in place in ``train`` or
        ``evaluate``: the runtime saves it when the task succeeds (a failed task's
        changes are dropped)."""
        return ClientState() if self.load_state is None else self.load_state()

    @property
    def state_used(self) -> bool:
        """Whether the app has read or changed :attr:`state` in this task."""
        return "state" in self.__dict__


@dataclass(frozen=True)
class TrainResult:
    """A client's reply to a training task."""

    arrays: Arrays
    num_examples: int
    metrics: Metrics = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluateResult:
    """A client's reply to an evaluation task (``accuracy`` goes in ``metrics``)."""

    num_examples: int
    loss: float
    metrics: Metrics = field(default_factory=dict)


@runtime_checkable
class ClientApp(Protocol):
    """User code run at a client: train and evaluate on local data."""

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        """Train from ``arrays`` on this client's data and return new arrays."""
        ...

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        """Evaluate ``arrays`` on this client's held-out data."""
        ...


@runtime_checkable
class ProvidesInitialArrays(Protocol):
    """A ClientApp that can build the initial global model."""

    def initial_arrays(self, seed: int) -> Arrays:
        """Fresh model weights, deterministic in ``seed``."""
        ...


def build_app(factory: Any, data: Any, params: dict[str, Any]) -> ClientApp:
    """``factory(data, **params)`` as a ClientApp; ConfigError names what is wrong."""
    try:
        app = factory(data, **params)
    except TypeError as exc:
        raise ConfigError(f"client.params: {exc}") from exc
    if not isinstance(app, ClientApp):
        raise ConfigError("client.app must build an object with train() and evaluate()")
    return app
