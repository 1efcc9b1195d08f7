"""SCAFFOLD (Karimireddy et al., 2020): control variates against client drift.

"SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", Algorithm 1 with
option II. The server keeps a control variate ``c`` (one array per floating model array,
zeros at first), each client ``i`` its own ``c_i`` (zeros until it first trains). In a
round with sampled clients ``S`` out of ``N``:

* the server sends ``(x, c)``: the training broadcast holds the model and ``c`` under
  ``"scaffold.c/<name>"`` (:meth:`Scaffold.train_arrays`);
* client ``i`` starts from ``y_i = x`` and takes ``K`` local steps
  ``y_i <- y_i - eta_l (g_i(y_i) + c - c_i)``, then (option II)
  ``c_i+ = c_i - c + (x - y_i) / (K eta_l)``; it keeps ``c_i+`` in its own state
  (``ctx.state``, which the runtime keeps wherever the client trains) and replies with
  ``y_i`` under the model's names and ``delta c_i = c_i+ - c_i`` under the control names;
* the server takes ``delta x = (1/|S|) sum (y_i - x)``, ``delta c = (1/|S|) sum delta c_i``
  and sets ``x <- x + eta_g delta x``, ``c <- c + (|S| / N) delta c``.

Means over ``S`` are unweighted, as in the paper. ``c`` lives in the strategy state
(``"c/<name>"``), which the run store checkpoints with every round, so a resumed run
continues with the same ``c``. The client part is :func:`client_controls` and
:func:`client_reply`; :class:`~fedlearn.apps.torch_app.TorchClientApp` applies them when a
training broadcast carries control variates. Integer and bool arrays take the plain mean
of the clients' values and have no control variate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlearn.engine.client_state import ClientState
from fedlearn.engine.records import Arrays
from fedlearn.errors import RoundFailed
from fedlearn.strategy.base import ClientUpdate, RoundContext, WeightedMeanFold
from fedlearn.strategy.fedavg import FedAvg, check_range, is_float_array

CONTROL_PREFIX = "scaffold.c/"
"""Broadcast and reply names of the control arrays: ``"scaffold.c/<model array>"``."""
STATE_PREFIX = "c/"
"""Strategy-state names of the server's control variate ``c``."""
CLIENT_PREFIX = "scaffold.c_i/"
"""``ctx.state.arrays`` names of a client's own control variate ``c_i``."""


def split_controls(arrays: Arrays) -> tuple[Arrays, Arrays]:
    """``(model arrays, control arrays by model name)`` of a broadcast or a reply."""
    model: Arrays = {}
    controls: Arrays = {}
    for name, a in arrays.items():
        if name.startswith(CONTROL_PREFIX):
            controls[name[len(CONTROL_PREFIX) :]] = a
        else:
            model[name] = a
    return model, controls


def client_controls(state: ClientState, c: Arrays) -> Arrays:
    """The client's ``c_i`` from its state (zeros shaped like ``c`` the first time)."""
    out: Arrays = {}
    for name, server in c.items():
        own = state.arrays.get(CLIENT_PREFIX + name)
        out[name] = np.zeros(server.shape, server.dtype) if own is None else own
    return out


def client_reply(
    state: ClientState,
    c: Arrays,
    c_i: Arrays,
    x: Arrays,
    y: Arrays,
    steps: int,
    lr: float,
) -> Arrays:
    """Option II after ``steps`` local steps at learning rate ``lr`` from ``x`` to ``y``:
    stores ``c_i+ = c_i - c + (x - y) / (steps * lr)`` in ``state`` and returns the reply
    arrays, ``y`` under the model's names then ``c_i+ - c_i`` under the control names."""
    if steps < 1 or not lr > 0:
        raise ValueError(f"SCAFFOLD needs steps >= 1 and lr > 0, got {steps} and {lr}")
    deltas: Arrays = {}
    for name, server in c.items():
        dtype = server.dtype
        scale = np.asarray(1.0 / (steps * lr), dtype)
        new = (c_i[name] - server + (x[name] - y[name]) * scale).astype(dtype, copy=False)
        deltas[CONTROL_PREFIX + name] = (new - c_i[name]).astype(dtype, copy=False)
        state.arrays[CLIENT_PREFIX + name] = new
    return {**y, **deltas}


class _Unweighted(WeightedMeanFold):
    """The plain mean: every client weighs 1."""

    def weight(self, update: ClientUpdate) -> float:
        return 1.0


class ScaffoldFold:
    """Streams the mean of the clients' models and of their ``delta c_i``; the result
    is ``{model: mean y_i, "scaffold.c/<name>": the new c}``."""

    def __init__(self, ctx: RoundContext, global_arrays: Arrays) -> None:
        if ctx.num_clients < 1:
            raise RoundFailed("SCAFFOLD needs the run's number of clients (RoundContext)")
        self.ctx = ctx
        self.global_arrays = global_arrays
        self.models = _Unweighted()
        self.controls = _Unweighted()

    def add(self, update: ClientUpdate) -> None:
        """Fold one client's ``y_i`` and ``delta c_i`` in."""
        model, deltas = split_controls(update.arrays)
        self.models.add(ClientUpdate(update.client_id, model, update.num_examples))
        if deltas:
            self.controls.add(ClientUpdate(update.client_id, deltas, update.num_examples))

    def result(self) -> Arrays:
        """Mean model, and ``c + (|S| / N) delta c = c + (1/N) sum delta c_i``."""
        out = self.models.result()
        if self.controls.count:
            share = self.controls.count / self.ctx.num_clients
            for name, mean in self.controls.result().items():
                c = self.ctx.state[STATE_PREFIX + name]
                step = np.multiply(mean, np.asarray(share, c.dtype))
                out[CONTROL_PREFIX + name] = np.add(c, step).astype(c.dtype, copy=False)
        return out


@dataclass(frozen=True, kw_only=True)
class Scaffold(FedAvg):
    """SCAFFOLD with option II control variates (see the module).

    Fields: ``server_learning_rate`` (``eta_g``, default 1.0, > 0).
    """

    server_learning_rate: float = 1.0

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "server_learning_rate", low=0.0, low_open=True)

    def init_state(self, global_arrays: Arrays) -> Arrays:
        """``c = 0`` for every floating array."""
        return {
            STATE_PREFIX + name: np.zeros(x.shape, x.dtype)
            for name, x in global_arrays.items()
            if is_float_array(x)
        }

    def train_arrays(self, ctx: RoundContext, global_arrays: Arrays) -> Arrays:
        """The model and ``c`` (under ``"scaffold.c/<name>"``)."""
        controls = {
            CONTROL_PREFIX + name: ctx.state[STATE_PREFIX + name]
            for name, x in global_arrays.items()
            if is_float_array(x)
        }
        return {**global_arrays, **controls}

    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> ScaffoldFold:
        """A :class:`ScaffoldFold` for this round."""
        return ScaffoldFold(ctx, global_arrays)

    def server_update(
        self, ctx: RoundContext, global_arrays: Arrays, aggregate: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """``x + eta_g (mean y_i - x)`` and the new ``c``."""
        mean, controls = split_controls(aggregate)
        eta = self.server_learning_rate
        new_arrays: Arrays = {}
        for name, x in global_arrays.items():
            if eta == 1.0 or not is_float_array(x):
                new_arrays[name] = mean[name]
            else:
                step = np.multiply(mean[name] - x, np.asarray(eta, x.dtype))
                new_arrays[name] = np.add(x, step).astype(x.dtype, copy=False)
        new_state = dict(state)
        for name, c in controls.items():
            new_state[STATE_PREFIX + name] = c
        return new_arrays, new_state
