"""A small numpy ClientApp for deployment fault tests, with faults chosen by its params.

``make_app(data, **params)`` is a ``[client] app`` factory: ``data`` is the site's data
source (anything with ``client(cid) -> ClientData``), and the params set in one site's
``site.toml`` pick that site's misbehaviour:

* ``crash_round = r``: ``os._exit`` in the middle of training round ``r`` (a crashed site);
* ``sleep_round = r, sleep_s = s``: training round ``r`` first sleeps ``s`` seconds;
* ``pace_s = s``: every training task first sleeps ``s`` seconds (a slow or fast site);
* ``fail_rounds = "1,3"`` (with ``fail_client = c``, default any, or ``fail_clients =
  "1,2"``): training raises;
* ``unsendable_round = r``: training round ``r`` returns an array no wire can carry.

``pad = n`` adds a float64 array of ``n`` zeros to the model (trained as a no-op), for
tests that need larger payloads. Under SCAFFOLD (control variates in the broadcast) each
step's gradient takes the correction ``c - c_i`` and the reply carries ``c_i``'s change
(:mod:`fedlearn.strategy.scaffold`, ``c_i`` in the client's own state).

The model is a logistic regression (``w``, ``b`` in float64) trained by a few full-batch
gradient steps; it needs no torch, so a site starts fast.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config
from fedlearn.strategy import FedAvg, scaffold
from fedlearn.strategy.base import RoundContext


def _rounds(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part.strip()}


class FaultyLogReg:
    """Logistic regression whose faults are set per site."""

    def __init__(
        self,
        data: Any,
        *,
        lr: float = 0.5,
        steps: int = 3,
        crash_round: int = 0,
        sleep_round: int = 0,
        sleep_s: float = 0.0,
        fail_rounds: str = "",
        fail_client: int = -1,
        fail_clients: str = "",
        unsendable_round: int = 0,
        pad: int = 0,
        pace_s: float = 0.0,
    ) -> None:
        self.data = data
        self.lr = lr
        self.steps = steps
        self.crash_round = crash_round
        self.sleep_round = sleep_round
        self.sleep_s = sleep_s
        self.fail_rounds = _rounds(fail_rounds)
        self.fail_client = fail_client
        self.fail_clients = _rounds(fail_clients)
        self.unsendable_round = unsendable_round
        self.pad = pad
        self.pace_s = pace_s

    def initial_arrays(self, seed: int) -> Arrays:
        features = self.data.client(0).x_train.shape[1]
        arrays = {"w": np.zeros(features), "b": np.zeros(1)}
        return arrays | ({"pad": np.zeros(self.pad)} if self.pad else {})

    def _xy(self, cid: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        part = self.data.client(cid)
        x = np.asarray(getattr(part, f"x_{split}"), dtype=np.float64)
        y = np.asarray(getattr(part, f"y_{split}"), dtype=np.float64)
        return x, y

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        if ctx.round == self.crash_round:
            os._exit(3)  # no reply, no goodbye: the process is gone mid-task
        if ctx.round == self.sleep_round:
            time.sleep(self.sleep_s)
        if self.pace_s:
            time.sleep(self.pace_s)
        failing = (
            ctx.client_id in self.fail_clients
            if self.fail_clients
            else self.fail_client in (-1, ctx.client_id)
        )
        if ctx.round in self.fail_rounds and failing:
            raise RuntimeError(f"injected training failure in round {ctx.round}")
        x, y = self._xy(ctx.client_id, "train")
        model, c = scaffold.split_controls(arrays)
        c_i = scaffold.client_controls(ctx.state, c) if c else {}
        w, b = model["w"].copy(), model["b"].copy()
        for _ in range(self.steps):
            err = 1.0 / (1.0 + np.exp(-(x @ w + b))) - y
            gw = x.T @ err / len(y) + ctx.rng.normal(scale=1e-3, size=w.shape)
            gb = err.mean()
            if c:
                gw, gb = gw + c["w"] - c_i["w"], gb + c["b"] - c_i["b"]
            w -= self.lr * gw
            b -= self.lr * gb
        if ctx.round == self.unsendable_round:
            w = w.astype(object)  # encode_arrays refuses object arrays
        out = {"w": w, "b": b} | ({"pad": np.array(model["pad"])} if "pad" in model else {})
        if c:
            out = scaffold.client_reply(ctx.state, c, c_i, model, out, self.steps, self.lr)
        return TrainResult(out, len(y), {"train_mse": float(np.mean(err**2))})

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        x, y = self._xy(ctx.client_id, "test")
        p = np.clip(1.0 / (1.0 + np.exp(-(x @ arrays["w"] + arrays["b"]))), 1e-9, 1 - 1e-9)
        loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        return EvaluateResult(len(y), loss, {"accuracy": float(np.mean((p > 0.5) == y))})


def make_app(data: Any, **params: Any) -> FaultyLogReg:
    """The ``[client] app`` factory."""
    return FaultyLogReg(data, **params)


@dataclass(frozen=True, kw_only=True)
class UnsendableConfig(FedAvg):
    """FedAvg whose round-1 training config holds an int no wire can carry (64-bit max)."""

    def train_config(self, ctx: RoundContext) -> Config:
        return {"seed_offset": 2**70} if ctx.round == 1 else {}
