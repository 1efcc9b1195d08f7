"""q-FedAvg (Li et al., ICLR 2020): fair resource allocation through q-FFL.

Clients with a higher loss get a larger say. With ``w`` the global model, ``w_k`` client
``k``'s trained model, ``F_k`` its training loss, ``L = 1 / client_learning_rate`` and
``e = 1e-10``::

    g_k     = L (w - w_k)
    delta_k = (F_k + e)^q g_k
    h_k     = q (F_k + e)^(q-1) ||g_k||^2 + L (F_k + e)^q
    w'      = w - sum_k delta_k / sum_k h_k

Both sums are linear in the clients, so :class:`QFedAvgFold` streams: it keeps one running
sum per array and a scalar, never the updates.

Flower reference: the Message-API ``flwr.serverapp.strategy.QFedAvg`` reads each client's
own loss from its train metrics (key ``train_loss``), which is what we follow. The legacy
``flwr.server.strategy.QFedAvg`` instead uses one loss for all clients, from the server's
centralized ``evaluate_fn`` on the pre-round model; it is the special case where every
client reports the same loss. Defaults follow the Message-API (``q=0.1``, no default for
the client learning rate; legacy used ``q_param=0.2``, ``qffl_learning_rate=0.1``).
Flower sums ``||g_k||^2`` in the array dtype; we sum it in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedlearn.engine.records import Arrays
from fedlearn.errors import ConfigError, RoundFailed, UpdateRejected
from fedlearn.strategy.base import ClientUpdate, Fold, RoundContext
from fedlearn.strategy.fedavg import FedAvg, check_range, is_float_array, restore_dtype

LOSS_OFFSET = 1e-10
"""Added to every loss before taking powers, as in the paper's reference code and Flower."""


class QFedAvgFold:
    """Streaming q-FFL aggregate: running ``sum_k delta_k`` per array and ``sum_k h_k``.

    :meth:`result` returns the new global model. :meth:`add` checks the client's loss
    metric before it changes anything, so a rejected update leaves the sums as they were.
    """

    def __init__(
        self,
        global_arrays: Arrays,
        *,
        q: float,
        lipschitz: float,
        loss_key: str,
        round: int | None = None,
    ) -> None:
        self._global = global_arrays
        self._q = float(q)
        self._lipschitz = float(lipschitz)
        self._loss_key = loss_key
        self._round = round
        self._sums: dict[str, np.ndarray] = {}
        self._h_total = 0.0
        self.count = 0

    def _loss(self, update: ClientUpdate) -> float:
        value = update.metrics.get(self._loss_key)
        if value is None:
            reported = ", ".join(sorted(update.metrics)) or "none"
            raise UpdateRejected(
                f"QFedAvg needs each client's training loss in the train metric "
                f"{self._loss_key!r} (set train_loss_key to use another name); "
                f"this client reported: {reported}",
                client_id=update.client_id,
                round=self._round,
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UpdateRejected(
                f"QFedAvg: train metric {self._loss_key!r} must be a number, "
                f"got {type(value).__name__} {value!r}",
                client_id=update.client_id,
                round=self._round,
            )
        loss = float(value)
        if not (math.isfinite(loss) and loss >= 0.0):
            raise UpdateRejected(
                f"QFedAvg: train metric {self._loss_key!r} must be a finite loss >= 0, "
                f"got {loss!r}",
                client_id=update.client_id,
                round=self._round,
            )
        return loss

    def add(self, update: ClientUpdate) -> None:
        """Fold in one client's ``delta_k`` and ``h_k``."""
        shifted = self._loss(update) + LOSS_OFFSET
        q, lip = self._q, self._lipschitz
        scale = shifted**q
        sq_norm = 0.0
        deltas: dict[str, np.ndarray] = {}
        for name, w in self._global.items():
            acc_dtype = w.dtype if is_float_array(w) else np.dtype(np.float64)
            grad = np.array(w, dtype=acc_dtype, copy=True)
            np.subtract(grad, update.arrays[name], out=grad, casting="unsafe")
            grad *= lip
            sq_norm += float(np.square(grad, dtype=np.float64).sum())
            grad *= scale
            deltas[name] = grad
        h = q * shifted ** (q - 1.0) * sq_norm + lip * scale
        if self.count == 0:
            self._sums = deltas
        else:
            for name, delta in deltas.items():
                np.add(self._sums[name], delta, out=self._sums[name])
        self._h_total += h
        self.count += 1

    def result(self) -> Arrays:
        """The new global model ``w - sum delta / sum h``, in the model's dtypes."""
        if self.count == 0:
            raise RoundFailed("no updates to aggregate")
        out: Arrays = {}
        for name, w in self._global.items():
            new = w - self._sums[name] / self._h_total
            out[name] = restore_dtype(new, w.dtype)
        return out


@dataclass(frozen=True, kw_only=True)
class QFedAvg(FedAvg):
    """q-FedAvg: aggregation that favours clients with higher training loss.

    Fields: ``client_learning_rate`` (required, > 0; the server uses ``L = 1 / lr`` as
    the Lipschitz estimate, so it must match the clients' local learning rate), ``q``
    (default 0.1, >= 0; ``q = 0`` gives the unweighted mean of the client models),
    ``train_loss_key`` (default ``"train_loss"``: the train metric holding each client's
    loss; an update without it is rejected with :class:`~fedlearn.errors.UpdateRejected`).
    """

    client_learning_rate: float
    q: float = 0.1
    train_loss_key: str = "train_loss"

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "client_learning_rate", low=0.0, low_open=True)
        check_range(self, "q", low=0.0)
        if not self.train_loss_key:
            raise ConfigError("QFedAvg: train_loss_key must be a non-empty metric name")

    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> Fold:
        """A streaming q-FFL fold around this round's global model."""
        return QFedAvgFold(
            global_arrays,
            q=self.q,
            lipschitz=1.0 / self.client_learning_rate,
            loss_key=self.train_loss_key,
            round=ctx.round,
        )
