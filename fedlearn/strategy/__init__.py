"""Strategies: the Strategy API and the built-in rules, by class or by name.

``build_strategy("fedadam", {"eta": 0.05})`` builds a built-in strategy from a config;
:data:`STRATEGIES` maps each lowercase name to its class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fedlearn.errors import ConfigError
from fedlearn.strategy.base import (
    Asynchrony,
    ClientEvaluation,
    ClientUpdate,
    CollectFold,
    Fold,
    RoundContext,
    Strategy,
    WeightedMeanFold,
    sample_clients,
    weighted_means,
)
from fedlearn.strategy.fedavg import FedAvg, FedProx, field_types, type_problem
from fedlearn.strategy.fedbuff import FedBuff, FedBuffFold
from fedlearn.strategy.fednova import FedNova, FedNovaFold
from fedlearn.strategy.fedopt import FedAdagrad, FedAdam, FedAvgM, FedOpt, FedYogi
from fedlearn.strategy.qfedavg import QFedAvg, QFedAvgFold
from fedlearn.strategy.robust import (
    Bulyan,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    RobustStrategy,
)
from fedlearn.strategy.scaffold import Scaffold, ScaffoldFold

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "qfedavg": QFedAvg,
    "fednova": FedNova,
    "scaffold": Scaffold,
    "fedbuff": FedBuff,
    "krum": Krum,
    "multikrum": MultiKrum,
    "bulyan": Bulyan,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}
"""Built-in strategies by lowercase name."""


def build_strategy(name: str, params: Mapping[str, object]) -> Strategy:
    """The built-in strategy ``name`` (case-insensitive) with settings ``params``.

    Raises ConfigError naming an unknown strategy (with the valid names), an unknown,
    missing or mistyped parameter (with the expected type), or a value out of range.
    Integers are accepted for float settings and converted.
    """
    cls = STRATEGIES.get(name.strip().lower()) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(
            f"unknown strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    types = field_types(cls)
    kwargs: dict[str, object] = {}
    for key, value in params.items():
        if key not in fields:
            raise ConfigError(
                f"{cls.__name__} has no parameter {key!r}; valid parameters: "
                f"{', '.join(sorted(fields))}"
            )
        expected = types.get(key)
        if expected is not None:
            problem = type_problem(expected, value)
            if problem is not None:
                raise ConfigError(f"{cls.__name__}: parameter {key!r} {problem}")
            if expected is float:
                value = float(value)  # type: ignore[arg-type]
            elif expected is int:
                value = int(value)  # type: ignore[call-overload]
        kwargs[key] = value
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{cls.__name__}: missing required parameter(s): {', '.join(map(repr, missing))}"
        )
    try:
        return cls(**kwargs)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: bad parameters: {exc}") from exc


__all__ = [
    "STRATEGIES",
    "Asynchrony",
    "Bulyan",
    "ClientEvaluation",
    "ClientUpdate",
    "CollectFold",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedBuffFold",
    "FedMedian",
    "FedNova",
    "FedNovaFold",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "Fold",
    "Krum",
    "MultiKrum",
    "QFedAvg",
    "QFedAvgFold",
    "RobustStrategy",
    "RoundContext",
    "Scaffold",
    "ScaffoldFold",
    "Strategy",
    "WeightedMeanFold",
    "build_strategy",
    "sample_clients",
    "weighted_means",
]
