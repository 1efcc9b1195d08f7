"""FedAvg and FedProx, plus the setting checks every built-in strategy shares.

Settings are checked twice: when a strategy is constructed (``__post_init__``: value
types and every range that does not depend on the number of clients) and again in
:meth:`FedAvg.validate`, which the coordinator calls before the first round and which
adds the checks that need the number of clients. Either way a bad setting raises
:class:`~fedlearn.errors.ConfigError` before any round runs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.engine.records import Config
from fedlearn.errors import ConfigError
from fedlearn.strategy.base import RoundContext, Strategy

_SCALAR_TYPES = (bool, int, float, str)
_SCALAR_NAMES = {t.__name__: t for t in _SCALAR_TYPES}


def field_types(cls: type) -> dict[str, type]:
    """The scalar type (bool, int, float or str) of each init field of dataclass ``cls``.

    Annotations may be types or strings (``from __future__ import annotations``); they
    are not evaluated, so a subclass may annotate fields with names that exist only for
    type checkers. Fields of any other type are left out (they are not checked).
    """
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = f.type
        if isinstance(hint, str):
            hint = _SCALAR_NAMES.get(hint.strip())
        if hint in _SCALAR_TYPES:
            out[f.name] = hint
    return out


def type_problem(expected: type, value: object) -> str | None:
    """Why ``value`` does not fit a field annotated ``expected``, or None if it does.

    ``float`` fields take any real number except bools; ``int`` fields take integers
    except bools; ``bool`` and ``str`` fields take exactly that type.
    """
    is_bool = isinstance(value, bool | np.bool_)
    if expected is bool:
        ok = is_bool
    elif expected is int:
        ok = isinstance(value, numbers.Integral) and not is_bool
    elif expected is float:
        ok = isinstance(value, numbers.Real) and not is_bool
    else:
        ok = isinstance(value, expected)
    if ok:
        return None
    return f"must be {expected.__name__}, got {type(value).__name__} {value!r}"


def check_field_types(strategy: object) -> None:
    """Raise ConfigError naming the first field of ``strategy`` whose value has a bad type."""
    for name, expected in field_types(type(strategy)).items():
        problem = type_problem(expected, getattr(strategy, name))
        if problem is not None:
            raise ConfigError(f"{type(strategy).__name__}: {name} {problem}")


def check_range(
    owner: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ConfigError unless field ``name`` of ``owner`` is finite and within the bounds.

    ``low_open``/``high_open`` exclude the bound itself.
    """
    value = float(getattr(owner, name))
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return
    if low is not None and high is not None:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        want = f"in {left}{low:g}, {high:g}{right}"
    elif low is not None:
        want = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        want = f"{'<' if high_open else '<='} {high:g}"
    else:
        want = "finite"
    raise ConfigError(f"{type(owner).__name__}: {name} must be {want}, got {value!r}")


def is_float_array(array: np.ndarray) -> bool:
    """Whether ``array`` holds floating-point values (server optimizers act only on those)."""
    return bool(np.issubdtype(array.dtype, np.floating))


def restore_dtype(values: Any, dtype: np.dtype[Any]) -> np.ndarray:
    """``values`` as an array of ``dtype``; integer and bool targets are rounded first."""
    out = np.asarray(values)
    if out.dtype == dtype:
        return out
    if not np.issubdtype(dtype, np.floating):
        out = np.rint(out)
    return out.astype(dtype)


@dataclass(frozen=True, kw_only=True)
class FedAvg(Strategy):
    """Federated Averaging (McMahan et al., 2017): the example-weighted mean of the updates.

    The new global model is ``sum_k n_k x_k / sum_k n_k`` where ``n_k`` is the number of
    training examples client ``k`` reported. Aggregation streams
    (:class:`~fedlearn.strategy.base.WeightedMeanFold`): memory stays at one running sum
    per array, whatever the number of clients. It matches Flower's
    ``flwr.server.strategy.aggregate.aggregate`` operation for operation and
    ``flwr.serverapp.strategy.FedAvg`` up to rounding (Flower scales each update by
    ``n_k / sum n`` before adding; the sum here is divided once at the end).
    """

    def __post_init__(self) -> None:
        check_field_types(self)
        self._check_settings()

    def _check_settings(self) -> None:
        """Checks that do not depend on the number of clients (run at construction too)."""
        check_range(self, "fraction_train", low=0.0, high=1.0, low_open=True)
        check_range(self, "fraction_evaluate", low=0.0, high=1.0, low_open=True)
        check_range(self, "min_train_clients", low=1)
        check_range(self, "min_evaluate_clients", low=1)

    def validate(self, num_clients: int) -> None:
        """Raise ConfigError if these settings cannot run with ``num_clients`` clients."""
        super().validate(num_clients)
        self._check_settings()


@dataclass(frozen=True, kw_only=True)
class FedProx(FedAvg):
    """FedProx (Li et al., 2020): FedAvg on the server, a proximal term on the clients.

    The server side is exactly FedAvg. Each training task carries ``"proximal_mu"`` in
    its config; the client is expected to add ``mu / 2 * ||w - w_global||^2`` to its local
    loss. The key follows Flower's legacy ``flwr.server.strategy.FedProx``; the
    Message-API ``flwr.serverapp.strategy.FedProx`` sends the same value as
    ``"proximal-mu"``. ``proximal_mu = 0`` makes it FedAvg (the Message-API default).
    """

    proximal_mu: float = 0.0

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "proximal_mu", low=0.0)

    def train_config(self, ctx: RoundContext) -> Config:
        """FedAvg's config plus ``proximal_mu``."""
        config = super().train_config(ctx)
        config["proximal_mu"] = float(self.proximal_mu)
        return config
