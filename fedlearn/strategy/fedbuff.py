"""FedBuff (Nguyen et al., 2022): asynchronous federated learning with buffered aggregation.

"Federated Learning with Buffered Asynchronous Aggregation", Algorithm 1. The server
keeps ``M`` clients (``concurrency``) training at all times; each starts from the model
the server holds when it is dispatched and sends back its change ``Delta_i = y_i - x``.
Replies are buffered; every ``K`` (``buffer_size``) replies the server aggregates::

    tau_i  = (server version at arrival) - (version client i started from)
    Delta  = (1/K) sum_i s(tau_i) Delta_i
    x     <- x + eta_g Delta

with the staleness weight ``s(tau) = (1 + tau)^(-a)`` (``staleness = "polynomial"``,
``a = staleness_exponent``, 0.5 by default: the paper's ``1/sqrt(1 + tau)``) or
``s = 1`` (``staleness = "constant"``). Override :meth:`FedBuff.staleness_weight` for
another rule. Means are over the buffer, unweighted by dataset size, as in the paper; a
reply that fails validation takes no part (the mean is over the replies accepted).

The coordinator does the asynchronous part (:mod:`fedlearn.engine.asynchronous`): it
keeps ``M`` clients in flight on the virtual clock and makes each run round one
aggregation of ``K`` arrivals; this strategy only says ``(M, K)``
(:meth:`FedBuff.asynchrony`), folds the arrivals (:class:`FedBuffFold`, which reads each
update's ``staleness`` and ``origin``) and takes the server step. Clients need nothing
special: any ClientApp that trains from the model it receives works. Integer and bool
arrays (counters) step the same way and are rounded back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.engine.records import Arrays, Metrics
from fedlearn.errors import ConfigError, RoundFailed
from fedlearn.strategy.base import Asynchrony, ClientUpdate, RoundContext
from fedlearn.strategy.fedavg import FedAvg, check_range, is_float_array, restore_dtype

STALENESS_RULES = ("polynomial", "constant")


class FedBuffFold:
    """Streams ``sum_i s(tau_i) (y_i - origin_i)``; :meth:`result` is that sum over the
    number of updates folded (the paper's ``Delta``)."""

    def __init__(self, strategy: FedBuff, global_arrays: Arrays) -> None:
        self.strategy = strategy
        self.global_arrays = global_arrays
        self._sums: dict[str, np.ndarray[Any, Any]] = {}
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Fold ``s(tau) * (y - origin)`` into the running sums."""
        origin = self.global_arrays if update.origin is None else update.origin
        weight = self.strategy.staleness_weight(update.staleness)
        for name, x in origin.items():
            dtype = x.dtype if is_float_array(x) else np.dtype(np.float64)
            delta = np.subtract(update.arrays[name], x, dtype=dtype)
            step = np.multiply(delta, np.asarray(weight, dtype), out=delta)
            if name in self._sums:
                np.add(self._sums[name], step, out=self._sums[name])
            else:
                self._sums[name] = step
        self.count += 1

    def result(self) -> Arrays:
        """``Delta = (1/K) sum_i s(tau_i) Delta_i`` (in float64 for integer arrays)."""
        if self.count == 0:
            raise RoundFailed("no updates to aggregate")
        return {
            name: np.divide(total, np.asarray(self.count, total.dtype))
            for name, total in self._sums.items()
        }


@dataclass(frozen=True, kw_only=True)
class FedBuff(FedAvg):
    """FedBuff: asynchronous buffered aggregation with staleness weighting (see the module).

    Fields: ``buffer_size`` (K, default 5, >= 1), ``concurrency`` (M, default 10, >= K;
    the run needs ``M + K - 1`` clients), ``server_learning_rate`` (eta_g, default 1.0,
    > 0), ``staleness`` (``"polynomial"`` or ``"constant"``), ``staleness_exponent``
    (a >= 0, default 0.5). ``min_train_clients`` is the quorum of accepted replies per
    aggregation; ``fraction_train`` is not used (dispatches take an idle client at random).
    """

    buffer_size: int = 5
    concurrency: int = 10
    server_learning_rate: float = 1.0
    staleness: str = "polynomial"
    staleness_exponent: float = 0.5

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "buffer_size", low=1)
        if self.concurrency < self.buffer_size:
            raise ConfigError(
                f"FedBuff: concurrency (M) = {self.concurrency} must be >= buffer_size (K) "
                f"= {self.buffer_size}: a buffer of K replies needs K clients training"
            )
        check_range(self, "server_learning_rate", low=0.0, low_open=True)
        check_range(self, "staleness_exponent", low=0.0)
        if self.staleness not in STALENESS_RULES:
            raise ConfigError(
                f"FedBuff: staleness must be one of {', '.join(STALENESS_RULES)}, "
                f"got {self.staleness!r}"
            )

    def validate(self, num_clients: int) -> None:
        """FedAvg's checks, and ``M + K - 1 <= clients``."""
        super().validate(num_clients)
        from fedlearn.engine.clock import check_asynchrony

        check_asynchrony(self.concurrency, self.buffer_size, num_clients)
        if self.min_train_clients > self.buffer_size:
            raise ConfigError(
                f"FedBuff: min_train_clients = {self.min_train_clients} exceeds the "
                f"buffer_size (K) = {self.buffer_size} replies of an aggregation"
            )

    def asynchrony(self, num_clients: int) -> Asynchrony:
        """``(M, K)``: the coordinator runs this strategy's rounds asynchronously."""
        return Asynchrony(self.concurrency, self.buffer_size)

    def train_clients_per_round(self, num_clients: int) -> int:
        """K: the replies each aggregation takes."""
        return self.buffer_size

    def staleness_weight(self, staleness: int) -> float:
        """``s(tau)``: ``(1 + tau)^(-a)``, or 1 with ``staleness = "constant"``."""
        if self.staleness == "constant":
            return 1.0
        return float((1.0 + staleness) ** -self.staleness_exponent)

    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> FedBuffFold:
        """A :class:`FedBuffFold` (the arrivals' weighted mean change)."""
        return FedBuffFold(self, global_arrays)

    def server_update(
        self, ctx: RoundContext, global_arrays: Arrays, aggregate: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """``x + eta_g Delta``, in each array's dtype."""
        eta = self.server_learning_rate
        out: Arrays = {}
        for name, x in global_arrays.items():
            delta = aggregate[name]
            if is_float_array(x):
                step = delta if eta == 1.0 else np.multiply(delta, np.asarray(eta, x.dtype))
                out[name] = np.add(x, step).astype(x.dtype, copy=False)
            else:
                out[name] = restore_dtype(x + eta * delta, x.dtype)
        return out, state

    def summarize_train(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> Metrics:
        """FedAvg's weighted means, plus the buffer's mean and largest ``staleness``."""
        metrics = super().summarize_train(ctx, updates)
        if updates:
            metrics["staleness_mean"] = float(np.mean([u.staleness for u in updates]))
            metrics["staleness_max"] = max(u.staleness for u in updates)
        return metrics
