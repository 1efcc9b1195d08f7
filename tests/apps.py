"""Tiny ClientApps for tests: a numpy logistic regression with per-client data."""

from __future__ import annotations

import numpy as np

from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config

D = 5


def client_data(cid: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + cid)
    x = rng.normal(size=(40, D)) + rng.normal(scale=0.5, size=D)
    y = (x @ np.arange(1, D + 1) / D + rng.normal(scale=0.3, size=40) > 0).astype(np.float64)
    return x, y


class LogReg:
    """Logistic regression trained by a few noisy GD steps (noise uses ctx.rng)."""

    def initial_arrays(self, seed: int) -> Arrays:
        return {"w": np.zeros(D), "b": np.zeros(1)}

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        x, y = client_data(ctx.client_id)
        w, b = arrays["w"].copy(), arrays["b"].copy()
        for _ in range(3):
            err = 1 / (1 + np.exp(-(x @ w + b))) - y
            w -= 0.1 * (x.T @ err / len(y) + ctx.rng.normal(scale=1e-3, size=D))
            b -= 0.1 * err.mean()
        return TrainResult({"w": w, "b": b}, len(y), {"train_loss": float(np.mean(err**2))})

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        x, y = client_data(ctx.client_id)
        p = np.clip(1 / (1 + np.exp(-(x @ arrays["w"] + arrays["b"]))), 1e-9, 1 - 1e-9)
        loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        return EvaluateResult(len(y), loss, {"accuracy": float(np.mean((p > 0.5) == y))})
