"""The README's custom-strategy example: hand-checked maths, and it runs from a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlearn import ClientUpdate, RoundContext
from fedlearn.config.simulation import load_config
from fedlearn.run.builders import make_strategy
from simulations.custom_strategy import ClippedFedAvg

ROOT = Path(__file__).resolve().parents[1]


def _fold(strategy: ClippedFedAvg, updates: list[tuple[list[float], int]]) -> np.ndarray:
    global_arrays = {"w": np.zeros(2)}
    ctx = RoundContext(1, 1, np.random.default_rng(0))
    fold = strategy.start_fold(ctx, global_arrays)
    for cid, (w, n) in enumerate(updates):
        fold.add(ClientUpdate(cid, {"w": np.array(w)}, n))
    return fold.result()["w"]


def test_large_bound_is_plain_fedavg() -> None:
    out = _fold(ClippedFedAvg(max_norm=100.0), [([1.0, 2.0], 1), ([3.0, 4.0], 3)])
    np.testing.assert_allclose(out, [2.5, 3.5])


def test_deltas_are_clipped_before_the_mean() -> None:
    # delta (3,4) has norm 5 -> scaled to (0.6, 0.8); delta (0.3, 0) is under the bound
    out = _fold(ClippedFedAvg(max_norm=1.0), [([3.0, 4.0], 1), ([0.3, 0.0], 1)])
    np.testing.assert_allclose(out, [(0.6 + 0.3) / 2, 0.8 / 2])


def test_config_names_the_custom_strategy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "simulations" / "custom_strategy.toml")
    strategy = make_strategy(cfg.strategy)
    assert isinstance(strategy, ClippedFedAvg) and strategy.max_norm == 2.0
