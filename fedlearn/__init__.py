"""fedlearn: federated learning with pluggable strategies, fast simulation, per-client evaluation.

The public API is what this module exports; everything else is internal.

Names load on first use (PEP 562), so ``import fedlearn.<module>`` (a site daemon, the
coordinator) pulls in only what that module needs.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from fedlearn.client_app import (
        ClientApp,
        ClientContext,
        EvaluateResult,
        ProvidesInitialArrays,
        TrainResult,
    )
    from fedlearn.coordinator import ClientRecord, Coordinator, RoundRecord, RunResult, Transport
    from fedlearn.errors import (
        AuthError,
        ConfigError,
        DataError,
        FedlearnError,
        InferenceError,
        InvalidInput,
        ModelNotFound,
        ModelNotReady,
        RoundFailed,
        SecAggError,
        SerializationError,
        UpdateRejected,
    )
    from fedlearn.flower import FlowerClientApp
    from fedlearn.messages import Reply, Stage, Task
    from fedlearn.records import Arrays, Config, Metrics, Scalar, decode_arrays, encode_arrays
    from fedlearn.registry import Decision, Gate, ModelRegistry, ModelVersion
    from fedlearn.simulation import InProcessTransport, PoolTransport, run_simulation
    from fedlearn.store import RunStore
    from fedlearn.strategy import (
        STRATEGIES,
        Bulyan,
        ClientEvaluation,
        ClientUpdate,
        CollectFold,
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedMedian,
        FedProx,
        FedTrimmedAvg,
        FedYogi,
        Fold,
        Krum,
        MultiKrum,
        QFedAvg,
        RoundContext,
        Strategy,
        WeightedMeanFold,
        build_strategy,
    )
    from fedlearn.weights import load_weights, save_weights

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Decision": "fedlearn.registry",
    "Gate": "fedlearn.registry",
    "ModelRegistry": "fedlearn.registry",
    "ModelVersion": "fedlearn.registry",
    "Arrays": "fedlearn.records",
    "AuthError": "fedlearn.errors",
    "Bulyan": "fedlearn.strategy",
    "ClientApp": "fedlearn.client_app",
    "ClientContext": "fedlearn.client_app",
    "ClientEvaluation": "fedlearn.strategy",
    "ClientRecord": "fedlearn.coordinator",
    "ClientUpdate": "fedlearn.strategy",
    "CollectFold": "fedlearn.strategy",
    "Config": "fedlearn.records",
    "ConfigError": "fedlearn.errors",
    "Coordinator": "fedlearn.coordinator",
    "DataError": "fedlearn.errors",
    "EvaluateResult": "fedlearn.client_app",
    "FedAdagrad": "fedlearn.strategy",
    "FedAdam": "fedlearn.strategy",
    "FedAvg": "fedlearn.strategy",
    "FedAvgM": "fedlearn.strategy",
    "FedMedian": "fedlearn.strategy",
    "FedProx": "fedlearn.strategy",
    "FedTrimmedAvg": "fedlearn.strategy",
    "FedYogi": "fedlearn.strategy",
    "FedlearnError": "fedlearn.errors",
    "FlowerClientApp": "fedlearn.flower",
    "Fold": "fedlearn.strategy",
    "InProcessTransport": "fedlearn.simulation",
    "InferenceError": "fedlearn.errors",
    "InvalidInput": "fedlearn.errors",
    "Krum": "fedlearn.strategy",
    "Metrics": "fedlearn.records",
    "ModelNotFound": "fedlearn.errors",
    "ModelNotReady": "fedlearn.errors",
    "MultiKrum": "fedlearn.strategy",
    "PoolTransport": "fedlearn.simulation",
    "ProvidesInitialArrays": "fedlearn.client_app",
    "QFedAvg": "fedlearn.strategy",
    "Reply": "fedlearn.messages",
    "RoundContext": "fedlearn.strategy",
    "RoundFailed": "fedlearn.errors",
    "RoundRecord": "fedlearn.coordinator",
    "RunResult": "fedlearn.coordinator",
    "RunStore": "fedlearn.store",
    "STRATEGIES": "fedlearn.strategy",
    "Scalar": "fedlearn.records",
    "SecAggError": "fedlearn.errors",
    "SerializationError": "fedlearn.errors",
    "Stage": "fedlearn.messages",
    "Strategy": "fedlearn.strategy",
    "Task": "fedlearn.messages",
    "TrainResult": "fedlearn.client_app",
    "Transport": "fedlearn.coordinator",
    "UpdateRejected": "fedlearn.errors",
    "WeightedMeanFold": "fedlearn.strategy",
    "build_strategy": "fedlearn.strategy",
    "decode_arrays": "fedlearn.records",
    "encode_arrays": "fedlearn.records",
    "load_weights": "fedlearn.weights",
    "run_simulation": "fedlearn.simulation",
    "save_weights": "fedlearn.weights",
}

__all__ = [
    "Decision",
    "Gate",
    "ModelRegistry",
    "ModelVersion",
    "STRATEGIES",
    "Arrays",
    "AuthError",
    "Bulyan",
    "ClientApp",
    "ClientContext",
    "ClientEvaluation",
    "ClientRecord",
    "ClientUpdate",
    "CollectFold",
    "Config",
    "ConfigError",
    "Coordinator",
    "DataError",
    "EvaluateResult",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "FedlearnError",
    "InferenceError",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "FlowerClientApp",
    "Fold",
    "InProcessTransport",
    "Krum",
    "Metrics",
    "MultiKrum",
    "PoolTransport",
    "ProvidesInitialArrays",
    "QFedAvg",
    "Reply",
    "RoundContext",
    "RoundFailed",
    "RoundRecord",
    "RunResult",
    "RunStore",
    "Scalar",
    "SecAggError",
    "SerializationError",
    "Stage",
    "Strategy",
    "Task",
    "TrainResult",
    "Transport",
    "UpdateRejected",
    "WeightedMeanFold",
    "__version__",
    "build_strategy",
    "decode_arrays",
    "encode_arrays",
    "load_weights",
    "run_simulation",
    "save_weights",
]


def __getattr__(name: str) -> _Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlearn' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
