"""Server-side optimizers: FedAvgM (Hsu et al., 2019) and the FedOpt family (Reddi et al., 2021).

All of them aggregate like FedAvg (a streaming example-weighted mean) and then treat the
move from the current global model ``x`` to that mean as a pseudo-gradient for an
optimizer that runs on the server. The optimizer's memory (momentum, first and second
moments, a step counter) is not kept on the strategy, which is frozen: it lives in the
``state`` arrays that :meth:`init_state` creates and :meth:`server_update` returns, so the
coordinator can checkpoint it with the model and a failed round leaves it untouched.

State names: ``"momentum/<array>"`` (FedAvgM), ``"m/<array>"`` and ``"v/<array>"`` (first
and second moment), ``"step"`` (0-d int64, FedAdam only). Optimizers act on floating
arrays only; integer and bool arrays (counters such as BatchNorm's
``num_batches_tracked``) take the plain weighted mean and have no state. Moments keep the
dtype of their array, and so does the new model.

Flower reference and where its versions differ
----------------------------------------------
The update rules are those of Flower 1.42's Message-API strategies
(``flwr.serverapp.strategy.FedAvgM/FedAdam/FedYogi/FedAdagrad``); the legacy
``flwr.server.strategy`` classes apply the same formulas, with these differences:

* **tau default**: Message-API uses ``tau = 1e-3`` for FedAdam and FedAdagrad, legacy
  ``1e-9`` (FedYogi: ``1e-3`` in both). We use ``1e-3``.
* **Bias correction**: only FedAdam has one, identical in both APIs:
  ``eta_t = eta * sqrt(1 - beta_2**(t + 1)) / (1 - beta_1**(t + 1))`` with Flower's ``t =
  server_round`` (so round 1 already uses exponent 2, one step ahead of Kingma & Ba).
  We use the same expression with ``t`` = the number of server updates applied so far
  including this one (``state["step"]``). In a run where every round succeeds and rounds
  start at 1 that is exactly Flower's round number; when a round fails (nothing applied)
  our ``t`` does not advance while Flower's round number would. FedYogi and FedAdagrad
  have no bias correction in either API.
* **Reference model**: legacy keeps its own copy of the weights (from
  ``initial_parameters``); Message-API FedOpt takes the arrays passed to
  ``configure_train`` each round, Message-API FedAvgM takes them once and then its own
  outputs. Here it is always the ``global_arrays`` the coordinator passes, which is the
  previous output: all three agree in a normal run.
* **FedAvgM momentum start**: legacy creates the momentum buffer in round 1 (and asserts
  it exists later); Message-API creates it at the first aggregation, whatever its round.
  We follow Message-API: a zero buffer, so the first update's momentum equals its
  pseudo-gradient, bit for bit. Flower skips the momentum term unless
  ``server_momentum > 0`` and silently accepts a negative value; we reject negatives.
* **dtype**: Flower's FedAdam multiplies by a NumPy float64 scalar, so a float32 model
  comes back float64 (NumPy 2 promotion) and stays so. Here every model array keeps its
  dtype; results agree with Flower to float32 rounding.
* ``eta_l`` (client learning rate) is recorded but, as in Flower, not used by the server
  and not sent to clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedlearn.engine.records import Arrays
from fedlearn.errors import RoundFailed
from fedlearn.strategy.base import RoundContext
from fedlearn.strategy.fedavg import FedAvg, check_range, is_float_array


def _check_same_names(global_arrays: Arrays, aggregate: Arrays) -> None:
    if list(aggregate) != list(global_arrays):
        raise RoundFailed(
            f"aggregate arrays {list(aggregate)} do not match the global model's "
            f"{list(global_arrays)}"
        )


def _buffer(state: Arrays, key: str, like: np.ndarray) -> np.ndarray:
    """``state[key]``, or zeros shaped like ``like`` if the state has no such entry yet."""
    value = state.get(key)
    if value is None:
        return np.zeros(like.shape, like.dtype)
    if value.shape != like.shape:
        raise RoundFailed(
            f"optimizer state {key!r} has shape {value.shape}, the model array has {like.shape}"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al., 2019).

    With ``x`` the global model and ``a`` the weighted mean of the updates:
    ``g = x - a`` (pseudo-gradient), ``m = server_momentum * m + g`` (``m`` starts at zero,
    only kept when ``server_momentum > 0``), ``x' = x - server_learning_rate * m``. With
    the defaults (learning rate 1, momentum 0) the result is the plain mean ``a``, as in
    Flower, where server optimization is switched off in that case.

    Fields: ``server_learning_rate`` (default 1.0, > 0) and ``server_momentum`` (default
    0.0, in [0, 1)).
    """

    server_learning_rate: float = 1.0
    server_momentum: float = 0.0

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "server_learning_rate", low=0.0, low_open=True)
        check_range(self, "server_momentum", low=0.0, high=1.0, high_open=True)

    @property
    def server_opt(self) -> bool:
        """Whether the server step differs from taking the mean as the new model."""
        return self.server_momentum != 0.0 or self.server_learning_rate != 1.0

    def init_state(self, global_arrays: Arrays) -> Arrays:
        """A zero momentum buffer per floating array (none without momentum)."""
        if self.server_momentum == 0.0:
            return {}
        return {
            f"momentum/{name}": np.zeros(x.shape, x.dtype)
            for name, x in global_arrays.items()
            if is_float_array(x)
        }

    def server_update(
        self, ctx: RoundContext, global_arrays: Arrays, aggregate: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """One momentum step from ``global_arrays`` along the pseudo-gradient."""
        if not self.server_opt:
            return aggregate, state
        _check_same_names(global_arrays, aggregate)
        lr, mu = self.server_learning_rate, self.server_momentum
        new_arrays: Arrays = {}
        new_state: Arrays = {}
        for name, x in global_arrays.items():
            mean = aggregate[name]
            if not is_float_array(x):
                new_arrays[name] = mean
                continue
            direction = x - mean
            if mu > 0.0:
                key = f"momentum/{name}"
                direction = np.asarray(mu * _buffer(state, key, x) + direction)
                new_state[key] = direction
            new_arrays[name] = np.asarray(x - lr * direction)
        return new_arrays, new_state


@dataclass(frozen=True, kw_only=True)
class FedOpt(FedAvg):
    """Common base of FedAdam, FedYogi and FedAdagrad (adaptive server optimizers).

    Per floating array, with ``x`` the global model, ``a`` the weighted mean of the updates
    and ``d = a - x``: the subclass updates its first moment ``m`` and second moment ``v``
    from ``d`` and the new model is ``x' = x + eta_t * m / (sqrt(v) + tau)``, where
    ``eta_t`` is ``eta`` unless the subclass corrects it (FedAdam). Both moments start at
    zero.

    Fields: ``eta`` (server learning rate, > 0), ``eta_l`` (client learning rate, > 0,
    informational only), ``tau`` (degree of adaptivity, also keeps the division finite,
    > 0).
    """

    eta: float = 1e-1
    eta_l: float = 1e-1
    tau: float = 1e-3

    # Whether "m/<array>" is kept (FedAdagrad uses m = d directly) and whether "step" is.
    keeps_first_moment: ClassVar[bool] = True
    counts_steps: ClassVar[bool] = False

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "eta", low=0.0, low_open=True)
        check_range(self, "eta_l", low=0.0, low_open=True)
        check_range(self, "tau", low=0.0, low_open=True)

    def first_moment(self, delta: np.ndarray, m: np.ndarray) -> np.ndarray:
        """The new first moment from the old one and the pseudo-gradient ``delta``."""
        return delta

    def second_moment(self, delta: np.ndarray, v: np.ndarray) -> np.ndarray:
        """The new second moment from the old one and the pseudo-gradient ``delta``."""
        raise NotImplementedError(f"{type(self).__name__} has no second-moment rule")

    def step_size(self, step: int) -> float:
        """The server learning rate used by update number ``step`` (1-based)."""
        return float(self.eta)

    def init_state(self, global_arrays: Arrays) -> Arrays:
        """Zero moments for every floating array, and a zero step counter if used."""
        prefixes = ("m", "v") if self.keeps_first_moment else ("v",)
        state: Arrays = {
            f"{prefix}/{name}": np.zeros(x.shape, x.dtype)
            for prefix in prefixes
            for name, x in global_arrays.items()
            if is_float_array(x)
        }
        if self.counts_steps:
            state["step"] = np.zeros((), np.int64)
        return state

    def server_update(
        self, ctx: RoundContext, global_arrays: Arrays, aggregate: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """One adaptive step; returns the new model and new state (``state`` is not changed)."""
        _check_same_names(global_arrays, aggregate)
        new_state: Arrays = {}
        step = 1
        if self.counts_steps:
            step = int(state["step"]) + 1 if "step" in state else 1
            new_state["step"] = np.asarray(step, np.int64)
        rate = self.step_size(step)
        new_arrays: Arrays = {}
        for name, x in global_arrays.items():
            mean = aggregate[name]
            if not is_float_array(x):
                new_arrays[name] = mean
                continue
            delta = mean - x
            if self.keeps_first_moment:
                m = np.asarray(self.first_moment(delta, _buffer(state, f"m/{name}", x)))
                new_state[f"m/{name}"] = m
            else:
                m = delta
            v = np.asarray(self.second_moment(delta, _buffer(state, f"v/{name}", x)))
            new_state[f"v/{name}"] = v
            new_arrays[name] = np.asarray(x + rate * m / (np.sqrt(v) + self.tau))
        return new_arrays, new_state


@dataclass(frozen=True, kw_only=True)
class _MomentOpt(FedOpt):
    """FedOpt with ``beta_1`` / ``beta_2``: an exponential moving average as first moment."""

    beta_1: float = 0.9
    beta_2: float = 0.99

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "beta_1", low=0.0, high=1.0, high_open=True)
        check_range(self, "beta_2", low=0.0, high=1.0, high_open=True)

    def first_moment(self, delta: np.ndarray, m: np.ndarray) -> np.ndarray:
        """Exponential moving average of ``delta``."""
        return self.beta_1 * m + (1.0 - self.beta_1) * delta


@dataclass(frozen=True, kw_only=True)
class FedAdam(_MomentOpt):
    """FedAdam: Adam on the server (Reddi et al., 2021), with Flower's bias correction.

    ``m = beta_1 m + (1 - beta_1) d``, ``v = beta_2 v + (1 - beta_2) d^2``,
    ``eta_t = eta * sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1))`` with ``t`` the 1-based
    number of this server update (``state["step"]``).

    Fields and defaults (Flower Message-API): ``eta=0.1``, ``eta_l=0.1``, ``beta_1=0.9``,
    ``beta_2=0.99``, ``tau=1e-3``; betas in [0, 1).
    """

    counts_steps: ClassVar[bool] = True

    def second_moment(self, delta: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Exponential moving average of ``delta**2``."""
        new_v: np.ndarray = self.beta_2 * v + (1.0 - self.beta_2) * np.square(delta)
        return new_v

    def step_size(self, step: int) -> float:
        """``eta`` with Flower's bias correction (exponent ``step + 1``)."""
        power = step + 1
        return self.eta * math.sqrt(1.0 - self.beta_2**power) / (1.0 - self.beta_1**power)


@dataclass(frozen=True, kw_only=True)
class FedYogi(_MomentOpt):
    """FedYogi: Yogi on the server (Reddi et al., 2021); no bias correction.

    ``m = beta_1 m + (1 - beta_1) d``, ``v = v - (1 - beta_2) d^2 sign(v - d^2)``.

    Fields and defaults (Flower): ``eta=0.01``, ``eta_l=0.0316``, ``beta_1=0.9``,
    ``beta_2=0.99``, ``tau=1e-3``; betas in [0, 1).
    """

    eta: float = 1e-2
    eta_l: float = 0.0316

    def second_moment(self, delta: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Yogi's additive, sign-controlled update of the second moment."""
        squared = np.square(delta)
        new_v: np.ndarray = v - (1.0 - self.beta_2) * squared * np.sign(v - squared)
        return new_v


@dataclass(frozen=True, kw_only=True)
class FedAdagrad(FedOpt):
    """FedAdagrad: Adagrad on the server (Reddi et al., 2021).

    ``m = d`` (Flower fixes ``beta_1 = 0``, so no first-moment state), ``v = v + d^2``.

    Fields and defaults (Flower Message-API): ``eta=0.1``, ``eta_l=0.1``, ``tau=1e-3``.
    """

    keeps_first_moment: ClassVar[bool] = False

    def second_moment(self, delta: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Running sum of ``delta**2``."""
        new_v: np.ndarray = v + np.square(delta)
        return new_v
