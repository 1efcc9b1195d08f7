"""The ``dp.*`` keys of a training task's config and of a client's train metrics.

The coordinator asks a client for client-side differential privacy through the config of
each TRAIN task (``dp.mode`` = ``"local"`` or ``"example"``); the client answers with what
it applied in its train metrics. :func:`task_dp` reads and checks the config keys; the
names below are the contract between the coordinator and every client runtime.

========================= ======= ==========================================================
config key                type    meaning
========================= ======= ==========================================================
``dp.mode``               str     ``"local"`` (runtime: clip and noise the update) or
                                  ``"example"`` (``TorchClientApp``: DP-SGD with Opacus)
``dp.clip``               float   C: the update's L2 bound (local) or each example's
                                  gradient bound (example)
``dp.noise_multiplier``   float   sigma: the noise's std is ``sigma * C``
``dp.noise``              str     ``"secure"`` (default) or ``"seeded"`` (tests, replays)
``dp.delta``              float   delta for ``dp.epsilon`` (example; default 1e-5)
========================= ======= ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from fedlearn.errors import ConfigError

MODE = "dp.mode"
CLIP = "dp.clip"
NOISE_MULTIPLIER = "dp.noise_multiplier"
NOISE = "dp.noise"
DELTA = "dp.delta"

SAMPLE_RATE = "dp.sample_rate"
"""Metric (example): Opacus's Poisson sampling rate of the client's examples."""
STEPS = "dp.steps"
"""Metric (example): the DP-SGD steps this round."""
EPSILON = "dp.epsilon"
"""Metric (example): Opacus's RDP epsilon at ``dp.delta`` for this round's steps alone."""
PREFIX = "dp."
"""Every key above starts with it; under client-side DP a train reply keeps only these."""

DEFAULT_DELTA = 1e-5

Mode = Literal["local", "example"]
NoiseKind = Literal["secure", "seeded"]


@dataclass(frozen=True)
class TaskDP:
    """Client-side DP a training task asks for."""

    mode: Mode
    noise_multiplier: float
    clip: float
    noise: NoiseKind = "secure"
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        """Reject values no mechanism can run with."""
        if self.mode not in ("local", "example"):
            raise ConfigError(f"{MODE} must be 'local' or 'example', got {self.mode!r}")
        for key, value in ((NOISE_MULTIPLIER, self.noise_multiplier), (CLIP, self.clip)):
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")
        if self.noise not in ("secure", "seeded"):
            raise ConfigError(f"{NOISE} must be 'secure' or 'seeded', got {self.noise!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"{DELTA} must be in (0, 1), got {self.delta!r}")


def task_dp(config: Mapping[str, object]) -> TaskDP | None:
    """The client-side DP ``config`` asks for, or None when it has no ``dp.mode``.

    Raises ConfigError when a key is missing or has a value of the wrong kind.
    """
    mode = config.get(MODE)
    if mode is None:
        return None
    if not isinstance(mode, str):
        raise ConfigError(f"{MODE} must be a string, got {mode!r}")
    noise = config.get(NOISE, "secure")
    if not isinstance(noise, str):
        raise ConfigError(f"{NOISE} must be a string, got {noise!r}")
    return _task_dp(
        mode,
        _number(config, NOISE_MULTIPLIER),
        _number(config, CLIP),
        noise,
        _number(config, DELTA, DEFAULT_DELTA),
    )


@lru_cache(maxsize=256)
def _task_dp(mode: str, sigma: float, clip: float, noise: str, delta: float) -> TaskDP:
    """One checked TaskDP per distinct request (every task of a run asks the same)."""
    return TaskDP(mode, sigma, clip, noise, delta)  # type: ignore[arg-type]  # checked


def _number(config: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = config.get(key, default)
    if value is None:
        raise ConfigError(f"{key} is missing from a task with {MODE} = {config[MODE]!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)
