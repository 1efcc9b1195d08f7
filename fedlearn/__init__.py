"""fedlearn: federated learning with pluggable strategies, fast simulation, per-client evaluation.

The public API is what this module exports; everything else is internal.

Names load on first use (PEP 562), so ``import fedlearn.<module>`` (a site daemon, the
coordinator) pulls in only what that module needs.
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from fedlearn.apps.flower import FlowerClientApp
    from fedlearn.apps.flower_message import MessageClientApp
    from fedlearn.drift.stats import DataSummary, SummarySpec
    from fedlearn.engine.client_app import (
        ClientApp,
        ClientContext,
        EvaluateResult,
        ProvidesInitialArrays,
        TrainResult,
    )
    from fedlearn.engine.client_state import ClientState
    from fedlearn.engine.clock import Latency
    from fedlearn.engine.coordinator import Coordinator, Transport
    from fedlearn.engine.messages import Reply, Stage, Task
    from fedlearn.engine.records import (
        Arrays,
        Config,
        Metrics,
        Scalar,
        decode_arrays,
        encode_arrays,
    )
    from fedlearn.engine.results import ClientRecord, RoundRecord, RunResult
    from fedlearn.engine.store import RunStore
    from fedlearn.engine.weights import load_weights, save_weights
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
        RunConflict,
        RunInterrupted,
        SecAggError,
        SerializationError,
        UpdateRejected,
    )
    from fedlearn.registry.builders import model_builder
    from fedlearn.registry.model_registry import Decision, Gate, ModelRegistry, ModelVersion
    from fedlearn.registry.traffic import Canary, LiveGate, Shadow, Split
    from fedlearn.simulation import (
        InProcessTransport,
        PoolTransport,
        RayTransport,
        run_simulation,
    )
    from fedlearn.strategy import (
        STRATEGIES,
        Asynchrony,
        Bulyan,
        ClientEvaluation,
        ClientUpdate,
        CollectFold,
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedBuff,
        FedMedian,
        FedNova,
        FedProx,
        FedTrimmedAvg,
        FedYogi,
        Fold,
        Krum,
        MultiKrum,
        QFedAvg,
        RoundContext,
        Scaffold,
        Strategy,
        WeightedMeanFold,
        build_strategy,
    )

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "Decision": "fedlearn.registry.model_registry",
    "Gate": "fedlearn.registry.model_registry",
    "ModelRegistry": "fedlearn.registry.model_registry",
    "ModelVersion": "fedlearn.registry.model_registry",
    "Canary": "fedlearn.registry.traffic",
    "LiveGate": "fedlearn.registry.traffic",
    "Shadow": "fedlearn.registry.traffic",
    "Split": "fedlearn.registry.traffic",
    "Arrays": "fedlearn.engine.records",
    "AuthError": "fedlearn.errors",
    "Asynchrony": "fedlearn.strategy",
    "Bulyan": "fedlearn.strategy",
    "ClientApp": "fedlearn.engine.client_app",
    "ClientContext": "fedlearn.engine.client_app",
    "ClientState": "fedlearn.engine.client_state",
    "DataSummary": "fedlearn.drift.stats",
    "SummarySpec": "fedlearn.drift.stats",
    "ClientEvaluation": "fedlearn.strategy",
    "ClientRecord": "fedlearn.engine.results",
    "ClientUpdate": "fedlearn.strategy",
    "CollectFold": "fedlearn.strategy",
    "Config": "fedlearn.engine.records",
    "ConfigError": "fedlearn.errors",
    "Coordinator": "fedlearn.engine.coordinator",
    "DataError": "fedlearn.errors",
    "EvaluateResult": "fedlearn.engine.client_app",
    "FedAdagrad": "fedlearn.strategy",
    "FedAdam": "fedlearn.strategy",
    "FedAvg": "fedlearn.strategy",
    "FedAvgM": "fedlearn.strategy",
    "FedMedian": "fedlearn.strategy",
    "FedBuff": "fedlearn.strategy",
    "FedNova": "fedlearn.strategy",
    "FedProx": "fedlearn.strategy",
    "FedTrimmedAvg": "fedlearn.strategy",
    "FedYogi": "fedlearn.strategy",
    "FedlearnError": "fedlearn.errors",
    "FlowerClientApp": "fedlearn.apps.flower",
    "MessageClientApp": "fedlearn.apps.flower_message",
    "Fold": "fedlearn.strategy",
    "InProcessTransport": "fedlearn.simulation",
    "InferenceError": "fedlearn.errors",
    "InvalidInput": "fedlearn.errors",
    "Krum": "fedlearn.strategy",
    "Latency": "fedlearn.engine.clock",
    "Metrics": "fedlearn.engine.records",
    "ModelNotFound": "fedlearn.errors",
    "ModelNotReady": "fedlearn.errors",
    "MultiKrum": "fedlearn.strategy",
    "PoolTransport": "fedlearn.simulation",
    "ProvidesInitialArrays": "fedlearn.engine.client_app",
    "QFedAvg": "fedlearn.strategy",
    "RayTransport": "fedlearn.simulation",
    "Reply": "fedlearn.engine.messages",
    "RoundContext": "fedlearn.strategy",
    "Scaffold": "fedlearn.strategy",
    "RoundFailed": "fedlearn.errors",
    "RunConflict": "fedlearn.errors",
    "RunInterrupted": "fedlearn.errors",
    "RoundRecord": "fedlearn.engine.results",
    "RunResult": "fedlearn.engine.results",
    "RunStore": "fedlearn.engine.store",
    "STRATEGIES": "fedlearn.strategy",
    "Scalar": "fedlearn.engine.records",
    "SecAggError": "fedlearn.errors",
    "SerializationError": "fedlearn.errors",
    "Stage": "fedlearn.engine.messages",
    "Strategy": "fedlearn.strategy",
    "Task": "fedlearn.engine.messages",
    "TrainResult": "fedlearn.engine.client_app",
    "Transport": "fedlearn.engine.coordinator",
    "UpdateRejected": "fedlearn.errors",
    "WeightedMeanFold": "fedlearn.strategy",
    "build_strategy": "fedlearn.strategy",
    "decode_arrays": "fedlearn.engine.records",
    "encode_arrays": "fedlearn.engine.records",
    "load_weights": "fedlearn.engine.weights",
    "model_builder": "fedlearn.registry.builders",
    "run_simulation": "fedlearn.simulation",
    "save_weights": "fedlearn.engine.weights",
}

__all__ = [
    "Asynchrony",
    "Decision",
    "Gate",
    "ModelRegistry",
    "ModelVersion",
    "Canary",
    "LiveGate",
    "Shadow",
    "Split",
    "STRATEGIES",
    "Arrays",
    "AuthError",
    "Bulyan",
    "ClientApp",
    "ClientContext",
    "ClientEvaluation",
    "ClientState",
    "ClientRecord",
    "ClientUpdate",
    "CollectFold",
    "Config",
    "ConfigError",
    "Coordinator",
    "DataError",
    "DataSummary",
    "EvaluateResult",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedMedian",
    "FedNova",
    "FedProx",
    "FedTrimmedAvg",
    "FedYogi",
    "FedlearnError",
    "InferenceError",
    "InvalidInput",
    "ModelNotFound",
    "ModelNotReady",
    "FlowerClientApp",
    "MessageClientApp",
    "Fold",
    "InProcessTransport",
    "Krum",
    "Latency",
    "Metrics",
    "MultiKrum",
    "PoolTransport",
    "ProvidesInitialArrays",
    "QFedAvg",
    "RayTransport",
    "Reply",
    "RoundContext",
    "RoundFailed",
    "Scaffold",
    "RunConflict",
    "RunInterrupted",
    "RoundRecord",
    "RunResult",
    "RunStore",
    "Scalar",
    "SecAggError",
    "SerializationError",
    "SummarySpec",
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
    "model_builder",
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
