"""The chaos runs' ClientApp: the fault tests' logistic regression, slowed down and traced.

``make_app(data, **params)`` is a ``[client] app`` factory with, on top of
:class:`fault_apps.FaultyLogReg`'s params:

* ``delay_s``: each training task first sleeps between 0.5 and 1.5 times this (drawn from
  the task's seed with its own generator: the model does not depend on it), so a site
  can be killed while it trains;
* ``pad_kib``: the model carries a float32 array of this many KiB that training hands
  back unchanged, so an upload lasts long enough to be killed in;
* ``trace``: a file to which each task appends ``<client> <phase> <round> <time>``
  (``train-start``, ``train-end``, ``eval-start``; ``time.monotonic()``, one clock for
  every process), which tells a chaos driver when to strike.

The model is the same with or without delay and trace, so a replay runs this app with
``delay_s = 0`` and no trace.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import numpy as np

from fault_apps import FaultyLogReg
from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config

PHASES = ("train-start", "train-end", "eval-start")


class ChaosLogReg(FaultyLogReg):
    """FaultyLogReg with a training delay, a padded model and a trace of its tasks."""

    def __init__(
        self, data: Any, *, delay_s: float = 0.0, pad_kib: int = 0, trace: str = "", **params: Any
    ) -> None:
        super().__init__(data, **params)
        self.delay_s = delay_s
        self.pad_kib = pad_kib
        self.trace = trace

    def _mark(self, phase: str, ctx: ClientContext) -> None:
        if not self.trace:
            return
        line = f"{ctx.client_id} {phase} {ctx.round} {time.monotonic():.6f}\n".encode()
        # one write to a file opened for appending: whole lines, whichever process writes
        fd = os.open(self.trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def initial_arrays(self, seed: int) -> Arrays:
        arrays = super().initial_arrays(seed)
        if self.pad_kib:
            arrays["pad"] = np.zeros(self.pad_kib * 256, np.float32)
        return arrays

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        self._mark("train-start", ctx)
        if self.delay_s:
            time.sleep(random.Random(ctx.seed).uniform(0.5, 1.5) * self.delay_s)
        result = super().train(arrays, config, ctx)
        out = dict(result.arrays)
        if "pad" in arrays:
            out["pad"] = np.array(arrays["pad"])
        self._mark("train-end", ctx)
        return TrainResult(out, result.num_examples, result.metrics)

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        self._mark("eval-start", ctx)
        return super().evaluate(arrays, config, ctx)


def make_app(data: Any, **params: Any) -> ChaosLogReg:
    """The ``[client] app`` factory."""
    return ChaosLogReg(data, **params)
