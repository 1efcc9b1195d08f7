"""A numpy least-squares ClientApp that speaks SCAFFOLD and FedNova, for the algorithm tests.

Client ``i`` minimizes ``f_i(w) = ||A_i w - b_i||^2 / (2 m)`` by full-batch gradient descent:
``K_i`` steps at learning rate ``lr``; with control variates in the broadcast every step
uses ``g + c - c_i`` and the reply follows SCAFFOLD's option II (through the helpers of
:mod:`fedlearn.strategy.scaffold`, as a researcher's own app would). It reports its step
count for FedNova. ``FEDLEARN_TEST_KILL="<round>:<client>"`` makes the process SIGKILL
itself when that client starts training in that round (kill -9 mid-round).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np

from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config
from fedlearn.strategy import fednova, scaffold

KILL_ENV = "FEDLEARN_TEST_KILL"


def problems(
    num_clients: int, dim: int, rows: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Heterogeneous least-squares problems: each client its own optimum."""
    out = []
    for cid in range(num_clients):
        rng = np.random.default_rng([seed, cid])
        a = rng.normal(size=(rows, dim))
        w_star = rng.normal(scale=2.0, size=dim)
        out.append((a, a @ w_star + rng.normal(scale=0.1, size=rows)))
    return out


def gradient(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a.T @ (a @ w - b) / len(b)


class LeastSquares:
    """Full-batch GD on each client's least-squares problem."""

    def __init__(
        self, data: list[tuple[np.ndarray, np.ndarray]], steps: list[int], lr: float
    ) -> None:
        self.data, self.steps, self.lr = data, steps, lr

    def initial_arrays(self, seed: int) -> Arrays:
        return {"w": np.zeros(self.data[0][0].shape[1])}

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        if os.environ.get(KILL_ENV) == f"{ctx.round}:{ctx.client_id}":
            os.kill(os.getpid(), signal.SIGKILL)
        a, b = self.data[ctx.client_id]
        steps = int(config.get("epochs", self.steps[ctx.client_id]))
        x, c = scaffold.split_controls(arrays)
        c_i = scaffold.client_controls(ctx.state, c) if c else {}
        y = np.array(x["w"])
        for _ in range(steps):
            g = gradient(a, b, y)
            if c:
                g = g + (c["w"] - c_i["w"])
            y = y - self.lr * g
        reply: Arrays = {"w": y}
        if c:
            reply = scaffold.client_reply(ctx.state, c, c_i, x, reply, steps, self.lr)
        return TrainResult(reply, len(b), {fednova.STEPS_KEY: steps})

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        a, b = self.data[ctx.client_id]
        loss = float(np.mean((a @ arrays["w"] - b) ** 2) / 2)
        return EvaluateResult(len(b), loss, {})


def make_app(data: Any, clients: int = 5, seed: int = 0, lr: float = 0.05) -> LeastSquares:
    """For configs (``client.app = "algo_apps:make_app"``): ``data`` is not used."""
    return LeastSquares(problems(clients, 3, 8, seed), [1 + cid % 3 for cid in range(clients)], lr)
