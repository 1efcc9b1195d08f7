"""A plain Flower ``NumPyClient`` (numpy logistic regression) run as a fedlearn site client.

:class:`LogisticRegressionClient` is written exactly as for Flower and knows nothing
of fedlearn; :func:`make_app` wraps it with :class:`fedlearn.apps.flower.FlowerClientApp`
so configs can name it::

    [client]
    app = "clients.flower_numpy:make_app"
    params = { local_epochs = 5, lr = 0.5 }

or, in a simulation::

    data = partition_dataset(load_dataset("breast_cancer"), "iid", 5, seed=0)
    run_simulation(lambda: make_app(data), FedAvg(), num_clients=5, rounds=3)

Needs ``flwr`` installed (``pip install fedlearn[test]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from fedlearn.apps.flower import FlowerClientApp


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-z))
    return out


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1.0 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


class LogisticRegressionClient(NumPyClient):
    """Binary logistic regression trained by full-batch gradient descent.

    The model is a weight vector ``w`` and a bias ``b`` (float64), starting at zero.
    ``fit`` runs ``local_epochs`` gradient steps of size ``lr`` (the server may override
    both through the config keys of the same names).
    """

    def __init__(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        local_epochs: int = 5,
        lr: float = 0.5,
    ) -> None:
        self.x_train = np.asarray(x_train, dtype=np.float64)
        self.y_train = np.asarray(y_train, dtype=np.float64)
        self.x_test = np.asarray(x_test, dtype=np.float64)
        self.y_test = np.asarray(y_test, dtype=np.float64)
        self.local_epochs = local_epochs
        self.lr = lr
        self.w = np.zeros(self.x_train.shape[1])
        self.b = np.zeros(1)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return [self.w.copy(), self.b.copy()]

    def set_parameters(self, parameters: NDArrays) -> None:
        self.w, self.b = (np.asarray(p, dtype=np.float64).copy() for p in parameters)

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.set_parameters(parameters)
        epochs = int(config.get("local_epochs", self.local_epochs))
        lr = float(config.get("lr", self.lr))
        x, y = self.x_train, self.y_train
        for _ in range(epochs):
            err = _sigmoid(x @ self.w + self.b) - y
            self.w -= lr * (x.T @ err) / len(y)
            self.b -= lr * np.mean(err)
        loss = _log_loss(y, _sigmoid(x @ self.w + self.b))
        return self.get_parameters(config={}), len(y), {"train_loss": loss}

    def evaluate(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        self.set_parameters(parameters)
        p = _sigmoid(self.x_test @ self.w + self.b)
        accuracy = float(np.mean((p > 0.5) == (self.y_test > 0.5)))
        return _log_loss(self.y_test, p), len(self.y_test), {"accuracy": accuracy}


def make_app(data: Any, *, local_epochs: int = 5, lr: float = 0.5) -> FlowerClientApp:
    """A ClientApp serving client ``cid`` with a LogisticRegressionClient on ``data.client(cid)``.

    ``data`` is a :class:`fedlearn.data.FederatedDataset` (or a site's own data): anything
    whose ``client(cid)`` has ``x_train, y_train, x_test, y_test``.
    """

    def client_fn(cid: int) -> LogisticRegressionClient:
        split = data.client(cid)
        return LogisticRegressionClient(
            split.x_train, split.y_train, split.x_test, split.y_test, local_epochs, lr
        )

    return FlowerClientApp(client_fn, names=("w", "b"))
