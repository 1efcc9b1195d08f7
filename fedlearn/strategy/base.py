"""The Strategy API: a few pure hooks, no sockets, sleeps or threads.

A strategy decides which clients take part and with what config, how client updates
fold into an aggregate, and how the aggregate becomes the next global model (the server
optimizer). The coordinator owns the loop and calls these hooks.

Aggregation comes in two kinds:

* **linear** folds (``Strategy.linear = True``) stream: each update is added to a running
  sum as it arrives and then dropped, so memory does not grow with the number of clients;
* **holistic** folds (Krum, Median, ...) need every update at once and collect them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from fedlearn.engine.records import Arrays, Config, Metrics, Scalar
from fedlearn.engine.threads import single_thread
from fedlearn.errors import ConfigError, RoundFailed


@dataclass(frozen=True)
class RoundContext:
    """What a hook may know about the round it runs in."""

    round: int
    num_rounds: int
    rng: np.random.Generator = field(compare=False, repr=False)
    state: Arrays = field(default_factory=dict, compare=False, repr=False)
    """The strategy state at the start of the round (as :meth:`Strategy.init_state` or the
    last :meth:`Strategy.server_update` left it): read it, never change it."""
    num_clients: int = 0
    """How many clients the run has (SCAFFOLD scales its control variate by it)."""
    seed: int = 0
    """The run's seed: per-client draws derive from it (:meth:`Strategy.client_train_config`)."""


@dataclass(frozen=True)
class ClientUpdate:
    """A validated training reply from one client."""

    client_id: int
    arrays: Arrays
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    staleness: int = 0
    """Asynchronous strategies: how many aggregations the server made while this client
    trained (server version at arrival minus the version it started from); 0 in
    synchronous rounds."""
    origin: Arrays | None = None
    """Asynchronous strategies: the global model this client started from (its ``arrays``
    were trained from it); None in synchronous rounds, where it is the round's model."""


@dataclass(frozen=True)
class Asynchrony:
    """How an asynchronous strategy runs (:meth:`Strategy.asynchrony`): the coordinator
    keeps ``concurrency`` clients training and aggregates every ``buffer_size`` replies."""

    concurrency: int
    buffer_size: int


@dataclass(frozen=True)
class ClientEvaluation:
    """A validated evaluation reply from one client."""

    client_id: int
    num_examples: int
    loss: float
    metrics: Metrics = field(default_factory=dict)


class Fold(Protocol):
    """Consumes updates one at a time and produces the aggregate."""

    def add(self, update: ClientUpdate) -> None:
        """Fold one update in."""
        ...

    def result(self) -> Arrays:
        """The aggregate of everything added; raises RoundFailed if there is none."""
        ...


class WeightedMeanFold:
    """Streaming weighted mean ``sum(w_i x_i) / sum(w_i)`` with ``w_i = num_examples``.

    Floating arrays accumulate in their own dtype in arrival order and are divided once
    at the end, like the textbook formula. Small arrays multiply then add (bit for bit
    the list-based reference); large float32/float64 arrays use a fused ``axpy``, one pass
    with no temporary (within an ulp of the reference, and the same bits in every
    transport, install and thread count). Integer arrays accumulate in float64 and are
    rounded back.
    """

    BLOCK = 1 << 16
    """Elements per block: the product ``w * x`` of one block stays in L1/L2 cache."""
    AXPY_MIN = 1 << 14
    """Arrays at least this large (float32/float64) fold through a fused ``axpy``."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        self._scratch: dict[np.dtype[Any], np.ndarray] = {}
        self._total = 0.0
        self.count = 0
        self._result: Arrays | None = None

    def weight(self, update: ClientUpdate) -> float:
        """The weight of ``update``; override for other linear rules."""
        return float(update.num_examples)

    def add(self, update: ClientUpdate) -> None:
        """Add ``weight * update`` to the running sums, block by block."""
        if self._result is not None:
            raise ValueError("this fold already gave its result")
        w = self.weight(update)
        if self.count == 0:
            for name, x in update.arrays.items():
                acc_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
                acc = np.empty(x.shape, acc_dtype)
                np.multiply(x, np.asarray(w, acc_dtype), out=acc, casting="unsafe")
                self._sums[name] = acc
                self._dtypes[name] = x.dtype
        else:
            for name, x in update.arrays.items():
                self._fold(self._sums[name].reshape(-1), np.ravel(x), w)
        self._total += w
        self.count += 1

    def _fold(self, acc: np.ndarray, x: np.ndarray, w: float) -> None:
        if acc.size >= self.AXPY_MIN and acc.dtype == x.dtype and acc.dtype in _AXPY:
            # axpy: one pass over x, accumulator updated in place (no temporary)
            _axpy(np.ascontiguousarray(x), acc, a=w)
            return
        weight = np.asarray(w, acc.dtype)
        scratch = self._scratch.get(acc.dtype)
        if scratch is None:
            scratch = self._scratch[acc.dtype] = np.empty(self.BLOCK, acc.dtype)
        for start in range(0, acc.size, self.BLOCK):
            stop = min(acc.size, start + self.BLOCK)
            tmp, part = scratch[: stop - start], acc[start:stop]
            np.multiply(x[start:stop], weight, out=tmp, casting="unsafe")
            np.add(part, tmp, out=part)

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far."""
        return self._total

    def result(self) -> Arrays:
        """The weighted mean, in each array's original dtype."""
        if self.count == 0 or self._total <= 0:
            raise RoundFailed("no updates with positive weight to aggregate")
        if self._result is not None:
            return dict(self._result)
        out: Arrays = {}
        for name, acc in self._sums.items():
            # divided in place: the same arithmetic as ``acc / total`` without a second
            # model-sized array
            mean = np.divide(acc, np.asarray(self._total, acc.dtype), out=acc)
            dtype = self._dtypes[name]
            out[name] = mean if mean.dtype == dtype else np.rint(mean).astype(dtype)
        self._scratch.clear()
        self._result = out
        return dict(out)


_AXPY = (np.dtype(np.float32), np.dtype(np.float64))


def _axpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    """``y += a * x`` in place, in one pass with the multiply-add fused for every element:
    torch's kernel (torch is a core dependency, loaded on the first large fold). It gives
    the same bits whatever else is installed and whatever the thread count, so a
    coordinator and a simulation fold alike on any machine.

    It runs on one thread: the fold is memory-bound, one core already reads at memory
    speed, and a kernel split across threads waits for the slowest of them, which on a
    busy machine made the fold 3-10x slower (BENCHMARKS.md section 2)."""
    import warnings

    import torch

    with single_thread(), warnings.catch_warnings():
        # x may be a read-only view of a received payload
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.from_numpy(y).add_(torch.from_numpy(x), alpha=a)


class CollectFold:
    """Keeps every update for a holistic rule, then calls it once."""

    def __init__(self, strategy: Strategy, ctx: RoundContext, global_arrays: Arrays) -> None:
        self.updates: list[ClientUpdate] = []
        self._strategy = strategy
        self._ctx = ctx
        self._global = global_arrays

    def add(self, update: ClientUpdate) -> None:
        """Keep ``update``."""
        self.updates.append(update)

    def result(self) -> Arrays:
        """Apply the strategy's holistic rule to all kept updates."""
        if not self.updates:
            raise RoundFailed("no updates to aggregate")
        return self._strategy.combine(self._ctx, self._global, self.updates)


def sample_clients(
    clients: Sequence[int], fraction: float, minimum: int, rng: np.random.Generator
) -> list[int]:
    """Sample ``max(floor(fraction * n), minimum)`` clients without replacement, sorted."""
    n = len(clients)
    k = min(n, max(int(fraction * n), minimum))
    if k >= n:
        return sorted(clients)
    chosen = rng.choice(n, size=k, replace=False)
    return sorted(clients[i] for i in chosen)


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """Base of every strategy: client selection, configs, aggregation, server update.

    Subclasses override the hooks they need. Settings are frozen dataclass fields;
    state that changes between rounds (server optimizer moments) is explicit: it is
    created by :meth:`init_state` and threaded through :meth:`server_update`.
    """

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 1
    min_evaluate_clients: int = 1

    linear: ClassVar[bool] = True

    def validate(self, num_clients: int) -> None:
        """Raise ConfigError if these settings cannot run with ``num_clients``."""
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name} must be in (0, 1], got {value}")
        for name in ("min_train_clients", "min_evaluate_clients"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
            if value > num_clients:
                raise ConfigError(f"{name}={value} exceeds the {num_clients} available clients")

    def asynchrony(self, num_clients: int) -> Asynchrony | None:
        """None (the default): synchronous rounds. An asynchronous strategy (FedBuff)
        returns its concurrency and buffer size; the coordinator then keeps that many
        clients training and makes each round one aggregation of the next ``buffer_size``
        replies (see :mod:`fedlearn.engine.asynchronous`): :meth:`start_fold` receives them
        in arrival order, each :class:`ClientUpdate` with its ``staleness`` and ``origin``,
        and :meth:`server_update` gives the next model. :meth:`select_train` is not
        called: every dispatch takes an idle client at random."""
        return None

    def train_clients_per_round(self, num_clients: int) -> int:
        """How many clients :meth:`select_train` picks out of ``num_clients``."""
        return min(num_clients, max(int(self.fraction_train * num_clients), self.min_train_clients))

    def select_train(self, ctx: RoundContext, clients: Sequence[int]) -> list[int]:
        """Clients that train this round."""
        return sample_clients(clients, self.fraction_train, self.min_train_clients, ctx.rng)

    def select_evaluate(self, ctx: RoundContext, clients: Sequence[int]) -> list[int]:
        """Clients that evaluate this round."""
        return sample_clients(clients, self.fraction_evaluate, self.min_evaluate_clients, ctx.rng)

    def train_config(self, ctx: RoundContext) -> Config:
        """Config sent with every training task this round."""
        return {}

    def evaluate_config(self, ctx: RoundContext) -> Config:
        """Config sent with every evaluation task this round."""
        return {}

    def client_train_config(self, ctx: RoundContext, client_id: int, config: Config) -> Config:
        """The config of one client's training task: ``config`` (this round's
        :meth:`train_config`) plus anything for this client alone, such as its own number
        of local epochs (FedNova's heterogeneous clients). Default: ``config`` unchanged.
        Called once per selected client, in client order; a draw must come from a
        generator seeded by ``(ctx.seed, ctx.round, client_id)``, never ``ctx.rng``."""
        return config

    def train_arrays(self, ctx: RoundContext, global_arrays: Arrays) -> Arrays:
        """What the training stage broadcasts: the global model (default), plus any server
        state every client needs (SCAFFOLD's control variate). A training reply must carry
        arrays of exactly these names, shapes and dtypes; the evaluation stage broadcasts
        the global model alone."""
        return global_arrays

    def init_state(self, global_arrays: Arrays) -> Arrays:
        """Server-side state carried between rounds (empty unless the strategy has some)."""
        return {}

    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> Fold:
        """A fresh fold for this round's updates."""
        if self.linear:
            return WeightedMeanFold()
        return CollectFold(self, ctx, global_arrays)

    def combine(
        self, ctx: RoundContext, global_arrays: Arrays, updates: Sequence[ClientUpdate]
    ) -> Arrays:
        """Holistic rule over all updates (only for ``linear = False`` strategies)."""
        raise NotImplementedError(f"{type(self).__name__} has no holistic rule")

    def server_update(
        self, ctx: RoundContext, global_arrays: Arrays, aggregate: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """Next global model and state from the aggregate (default: take the aggregate)."""
        return aggregate, state

    def summarize_train(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> Metrics:
        """Round-level training metrics: num_examples-weighted means of client metrics."""
        return weighted_means([(u.num_examples, u.metrics) for u in updates])

    def summarize_evaluate(
        self, ctx: RoundContext, evaluations: Sequence[ClientEvaluation]
    ) -> Metrics:
        """Round-level evaluation metrics: weighted means of loss and client metrics."""
        rows = [(e.num_examples, {"loss": e.loss, **e.metrics}) for e in evaluations]
        return weighted_means(rows)


def weighted_means(rows: Sequence[tuple[int, Metrics]]) -> Metrics:
    """Weighted mean of each numeric metric over the rows that report it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in rows:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            sums[key] = sums.get(key, 0.0) + n * float(value)
            weights[key] = weights.get(key, 0.0) + n
    out: dict[str, Scalar] = {}
    for key, total in sums.items():
        if weights[key] > 0 and math.isfinite(total):
            out[key] = total / weights[key]
    return out
