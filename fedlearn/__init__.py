"""fedlearn: federated learning with pluggable strategies, fast simulation, per-client evaluation.

The public API is what this module exports; everything else is internal.
"""

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
    RoundFailed,
    SecAggError,
    SerializationError,
    UpdateRejected,
)
from fedlearn.flower import FlowerClientApp
from fedlearn.messages import Reply, Stage, Task
from fedlearn.records import Arrays, Config, Metrics, Scalar, decode_arrays, encode_arrays
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

__all__ = [
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
