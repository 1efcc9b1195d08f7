"""FedNova (Wang et al., 2020): normalized averaging by each client's amount of local work.

"Tackling the Objective Inconsistency Problem in Heterogeneous Federated Optimization".
Clients that run more local steps move further; plain FedAvg then drifts towards their
objectives. FedNova divides each client's move by its local work before averaging and
scales the average by the mean work. With ``x`` the global model, ``x_i`` client ``i``'s
trained model, ``n_i`` its number of examples and ``p_i = n_i / sum_j n_j`` (over the
round's accepted clients)::

    d_i     = (x - x_i) / a_i                 normalized update
    tau_eff = sum_i p_i a_i                   effective number of steps
    x'      = x - tau_eff * sum_i p_i d_i

``a_i = ||a_i||_1`` is the L1 norm of the client's local step weights: ``tau_i`` (its
number of SGD steps) for plain SGD and, for SGD with heavy-ball momentum ``rho``,
``(tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)`` (:func:`momentum_norm`).

**What a client reports.** A training task carries ``"fednova" = True`` in its config; a
client then reports the train metric ``"fednova.steps"`` (``tau_i``, its number of local
steps) and, when its optimizer is not plain SGD, ``"fednova.a"`` (``a_i``; defaults to
``fednova.steps``). :class:`~fedlearn.apps.torch_app.TorchClientApp` reports both. A reply
without a positive step count is rejected for that client.

**Heterogeneous local work.** Client datasets of different sizes already give different
step counts for the same number of epochs. With ``local_epochs_min``/``local_epochs_max``
set, each selected client also gets its own number of epochs per round, drawn uniformly
from that range (config key ``"epochs"``, seeded by (run seed, round, client): the same in
every transport), as in the paper's experiments.

Integer and bool arrays (counters) take the plain example-weighted mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlearn.engine.records import Arrays, Config, Metrics
from fedlearn.errors import UpdateRejected
from fedlearn.strategy.base import ClientUpdate, RoundContext, WeightedMeanFold
from fedlearn.strategy.fedavg import FedAvg, check_range, is_float_array

REPORT_KEY = "fednova"
"""Training-config key: True asks the client to report its local work."""
STEPS_KEY = "fednova.steps"
"""Train metric: the client's number of local SGD steps ``tau_i``."""
NORM_KEY = "fednova.a"
"""Train metric: ``||a_i||_1`` of the client's optimizer (default: ``fednova.steps``)."""
EPOCHS_KEY = "epochs"
"""Training-config key carrying a client's own number of local epochs."""
_DRAW = 0x4E6F7661  # "Nova": keeps these draws apart from any other per-client stream


def momentum_norm(steps: int, momentum: float) -> float:
    """``||a||_1`` for ``steps`` steps of SGD with heavy-ball momentum ``momentum``
    (``v_k = rho v_{k-1} + g_k``, ``v_0 = 0``; step ``k``'s gradient is weighted
    ``(1 - rho^(tau - k + 1)) / (1 - rho)``); ``steps`` itself without momentum."""
    if momentum == 0.0:
        return float(steps)
    rho = float(momentum)
    return (steps - rho * (1.0 - rho**steps) / (1.0 - rho)) / (1.0 - rho)


def local_work(metrics: Metrics) -> tuple[float, float]:
    """``(tau_i, a_i)`` from a client's train metrics; ValueError if missing or bad."""
    steps = metrics.get(STEPS_KEY)
    norm = metrics.get(NORM_KEY, steps)
    for key, value in ((STEPS_KEY, steps), (NORM_KEY, norm)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"FedNova needs the train metric {key!r} (a number), got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"FedNova needs a positive train metric {key!r}, got {value!r}")
    assert isinstance(steps, int | float) and isinstance(norm, int | float)
    return float(steps), float(norm)


class FedNovaFold(WeightedMeanFold):
    """Streams ``sum_i (n_i / a_i) (x - x_i)`` and the sums of ``n_i`` and ``n_i a_i``;
    :meth:`result` is the new global model ``x'``."""

    def __init__(self, ctx: RoundContext, global_arrays: Arrays) -> None:
        super().__init__()
        self.round = ctx.round
        self.global_arrays = global_arrays
        self.counters = WeightedMeanFold()
        self.examples = 0.0
        self.work = 0.0

    def weight(self, update: ClientUpdate) -> float:
        """``n_i / a_i``."""
        return update.num_examples / local_work(update.metrics)[1]

    def add(self, update: ClientUpdate) -> None:
        """Fold client ``i``'s move ``x - x_i`` in with weight ``n_i / a_i``."""
        try:
            _, norm = local_work(update.metrics)
        except ValueError as exc:
            raise UpdateRejected(str(exc), client_id=update.client_id, round=self.round) from None
        moves: Arrays = {}
        counters: Arrays = {}
        for name, x in self.global_arrays.items():
            if is_float_array(x):
                moves[name] = x - update.arrays[name]
            else:
                counters[name] = update.arrays[name]
        super().add(ClientUpdate(update.client_id, moves, update.num_examples, update.metrics))
        if counters:
            self.counters.add(ClientUpdate(update.client_id, counters, update.num_examples))
        self.examples += update.num_examples
        self.work += update.num_examples * norm

    def result(self) -> Arrays:
        """``x - tau_eff * sum_i p_i d_i``, in each array's dtype."""
        mean = super().result()  # sum_i (n_i/a_i)(x - x_i) / sum_i (n_i/a_i)
        tau_eff = self.work / self.examples
        scale = tau_eff * self.total_weight / self.examples  # makes mean sum_i p_i d_i
        counters = self.counters.result() if self.counters.count else {}
        out: Arrays = {}
        for name, x in self.global_arrays.items():
            if name in counters:
                out[name] = counters[name]
                continue
            step = np.multiply(mean[name], np.asarray(scale, x.dtype))
            out[name] = np.subtract(x, step).astype(x.dtype, copy=False)
        return out


@dataclass(frozen=True, kw_only=True)
class FedNova(FedAvg):
    """FedNova: each client's update normalized by its local work (see the module).

    Fields: ``local_epochs_min``, ``local_epochs_max`` (default 0: each client trains the
    epochs its own settings say; otherwise each selected client draws its epochs for the
    round uniformly from ``[min, max]``).
    """

    local_epochs_min: int = 0
    local_epochs_max: int = 0

    def _check_settings(self) -> None:
        super()._check_settings()
        if self.local_epochs_max or self.local_epochs_min:
            check_range(self, "local_epochs_min", low=1)
            check_range(self, "local_epochs_max", low=self.local_epochs_min)

    def train_config(self, ctx: RoundContext) -> Config:
        """FedAvg's config plus ``"fednova" = True`` (report your local steps)."""
        config = super().train_config(ctx)
        config[REPORT_KEY] = True
        return config

    def client_train_config(self, ctx: RoundContext, client_id: int, config: Config) -> Config:
        """``config`` plus this client's drawn ``epochs`` when a range is set."""
        if not self.local_epochs_max:
            return config
        rng = np.random.default_rng([ctx.seed, ctx.round, client_id, _DRAW])
        epochs = int(rng.integers(self.local_epochs_min, self.local_epochs_max + 1))
        return {**config, EPOCHS_KEY: epochs}

    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> FedNovaFold:
        """A :class:`FedNovaFold` around the current global model."""
        return FedNovaFold(ctx, global_arrays)
