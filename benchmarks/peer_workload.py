"""The Flower peer workload as a fedlearn ClientApp.

Same as ``shared/peers/flower/sim_bench.py`` (and the bare loop in
``shared/peers/limits/bare_loop.py``): FedAvg over a numpy logistic regression with
d=20 features; each client has 200 training and 100 held-out samples drawn from a
seeded generator with a per-client feature shift; local training is 5 epochs of
full-batch gradient descent with lr 0.1; evaluation reports log-loss and accuracy.

The numpy operations are written in the same order as the peer's, so a client's
update is bit-identical to what Flower's ClientApp computes for the same input.

One difference by design: a :class:`PeerLogReg` instance caches the data of every
client it has served, so a worker that keeps its ClientApp between tasks generates a
client's data once rather than twice per round (Flower regenerates it on each call).
"""

from __future__ import annotations

import numpy as np

from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config

D = 20
N_TRAIN = 200
N_TEST = 100
LOCAL_EPOCHS = 5
LR = 0.1

ClientData = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def make_data(partition_id: int) -> ClientData:
    """Train/test data of one client: ``x_train, y_train, x_test, y_test`` (as the peer's)."""
    w_true = np.random.default_rng(0).normal(size=D)
    rng = np.random.default_rng(1000 + partition_id)
    shift = rng.normal(scale=0.5, size=D)
    x = rng.normal(size=(N_TRAIN + N_TEST, D)) + shift
    logits = x @ w_true + rng.normal(scale=0.5, size=N_TRAIN + N_TEST)
    y = (logits > 0).astype(np.float64)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function."""
    return 1.0 / (1.0 + np.exp(-z))


def loss_acc(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean log-loss and accuracy of the model ``(w, b)`` on ``(x, y)``."""
    p = np.clip(sigmoid(x @ w + b), 1e-12, 1 - 1e-12)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    acc = float(np.mean((p > 0.5) == (y > 0.5)))
    return loss, acc


def local_train(
    w: np.ndarray,
    b: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int = LOCAL_EPOCHS,
    lr: float = LR,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-batch gradient descent from ``(w, b)``; the inputs are not modified."""
    w, b = w.copy(), b.copy()
    for _ in range(epochs):
        err = sigmoid(x @ w + b) - y
        w -= lr * (x.T @ err) / len(y)
        b -= lr * np.array([err.mean()])
    return w, b


class PeerLogReg:
    """The peer workload's ClientApp; keeps each served client's data for later tasks."""

    def __init__(self, cache: bool = True) -> None:
        self.cache = cache
        self._data: dict[int, ClientData] = {}

    def data(self, client_id: int) -> ClientData:
        """This client's data, generated on first use (every time if caching is off)."""
        found = self._data.get(client_id)
        if found is None:
            found = make_data(client_id)
            if self.cache:
                self._data[client_id] = found
        return found

    def initial_arrays(self, seed: int) -> Arrays:
        """The peer's initial model: all zeros."""
        return {"w": np.zeros(D), "b": np.zeros(1)}

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        """5 epochs of GD on the client's training data; reports the training loss."""
        x, y, _, _ = self.data(ctx.client_id)
        w, b = local_train(arrays["w"], arrays["b"], x, y)
        loss, _ = loss_acc(w, b, x, y)
        return TrainResult({"w": w, "b": b}, len(y), {"train_loss": loss})

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        """Log-loss and accuracy of the global model on the client's held-out data."""
        _, _, xt, yt = self.data(ctx.client_id)
        loss, acc = loss_acc(arrays["w"], arrays["b"], xt, yt)
        return EvaluateResult(len(yt), loss, {"accuracy": acc})


def bare_loop(num_clients: int, rounds: int, cache: bool = False) -> tuple[Arrays, float]:
    """The workload with no framework (as ``bare_loop.py``): final model and last eval accuracy.

    Aggregation is ``sum(n_i * x_i) / sum(n_i)`` in client order, as fedlearn's
    streaming fold computes it, so the final model is bit-identical to a fedlearn run.
    With ``cache`` each client's data is generated once, as a fedlearn worker does.
    """
    store: dict[int, ClientData] = {}

    def data(cid: int) -> ClientData:
        if not cache:
            return make_data(cid)
        if cid not in store:
            store[cid] = make_data(cid)
        return store[cid]

    w, b = np.zeros(D), np.zeros(1)
    acc_sum, n_sum = 0.0, 0
    for _ in range(rounds):
        sw, sb, total = np.zeros(D), np.zeros(1), 0
        for cid in range(num_clients):
            x, y, _, _ = data(cid)
            w2, b2 = local_train(w, b, x, y)
            loss_acc(w2, b2, x, y)
            sw += w2 * len(y)
            sb += b2 * len(y)
            total += len(y)
        w, b = sw / total, sb / total
        acc_sum, n_sum = 0.0, 0
        for cid in range(num_clients):
            _, _, xt, yt = data(cid)
            _, acc = loss_acc(w, b, xt, yt)
            acc_sum += len(yt) * acc
            n_sum += len(yt)
    return {"w": w, "b": b}, acc_sum / n_sum
