"""SCAFFOLD: hand-computed rounds, the paper's equations on a random problem, client state
kept across rounds on every backend, and kill -9 resume bit-identical.

Expected values come from Karimireddy et al. (2020), Algorithm 1, option II:
``y <- y - eta_l (g(y) + c - c_i)`` for K steps; ``c_i+ = c_i - c + (x - y)/(K eta_l)``;
``x <- x + eta_g mean(y_i - x)``; ``c <- c + |S|/N mean(c_i+ - c_i)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from algo_apps import KILL_ENV, LeastSquares, gradient, problems

from fedlearn.apps.torch_app import TorchClientApp
from fedlearn.config.simulation import SimulationConfig, load_config
from fedlearn.engine.client_app import ClientContext
from fedlearn.engine.client_state import ClientState
from fedlearn.engine.messages import Stage
from fedlearn.engine.weights import load_weights
from fedlearn.errors import ConfigError
from fedlearn.run.job import run_job
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import run_simulation
from fedlearn.strategy import RoundContext, Scaffold, build_strategy
from fedlearn.strategy.base import ClientUpdate

ROOT = Path(__file__).resolve().parents[1]


def test_two_hand_computed_rounds() -> None:
    # f_0(w) = (w - 0)^2 / 2, f_1(w) = (w - 4)^2 / 2; K = 2 steps, eta_l = 0.5; N = |S| = 2.
    # Round 1 (x = 0, c = 0, c_i = 0): client 0 stays at y = 0, c_0+ = 0;
    #   client 1: y = 0 -> 2 -> 3, c_1+ = (0 - 3)/(2 * 0.5) = -3.
    #   x = 0 + (0 + 3)/2 = 1.5; c = 0 + (2/2) (0 - 3)/2 = -1.5.
    # Round 2: client 0: correction c - c_0 = -1.5, g = 1.5 - 1.5 = 0, y = 1.5;
    #   c_0+ = 0 + 1.5 + 0 = 1.5.  Client 1: correction -1.5 + 3 = 1.5,
    #   y = 1.5 -> 2.0 -> 2.25; c_1+ = -3 + 1.5 + (1.5 - 2.25)/1 = -2.25.
    #   x = 1.5 + (0 + 0.75)/2 = 1.875; c = -1.5 + (1.5 + 0.75)/2 = -0.375.
    data = [(np.ones((1, 1)), np.array([0.0])), (np.ones((1, 1)), np.array([4.0]))]
    app = LeastSquares(data, [2, 2], 0.5)
    one = run_simulation(lambda: app, Scaffold(), num_clients=2, rounds=1, evaluate_every=0)
    assert one.arrays["w"].tolist() == [1.5]
    assert one.state["c/w"].tolist() == [-1.5]
    two = run_simulation(lambda: app, Scaffold(), num_clients=2, rounds=2, evaluate_every=0)
    assert two.arrays["w"].tolist() == [1.875]
    assert two.state["c/w"].tolist() == [-0.375]


def test_fold_scales_the_control_step_by_the_sampled_share() -> None:
    # N = 4, S = {0, 1}: c = 1; delta c_i = 2 and 4 -> c + (2/4) * 3 = 2.5
    # x = 1; y_i = 3 and 5 -> mean 4; eta_g = 0.5 -> x = 1 + 0.5 * (4 - 1) = 2.5
    strategy = Scaffold(server_learning_rate=0.5)
    x = {"w": np.array([1.0])}
    state = {"c/w": np.array([1.0])}
    ctx = RoundContext(1, 1, np.random.default_rng(0), state, num_clients=4)
    assert strategy.train_arrays(ctx, x).keys() == {"w", "scaffold.c/w"}
    fold = strategy.start_fold(ctx, x)
    for cid, (y, dc) in enumerate([(3.0, 2.0), (5.0, 4.0)]):
        arrays = {"w": np.array([y]), "scaffold.c/w": np.array([dc])}
        fold.add(ClientUpdate(cid, arrays, 10 * (cid + 1)))  # unweighted: sizes do not count
    new, new_state = strategy.server_update(ctx, x, fold.result(), state)
    assert new["w"].tolist() == [2.5] and new_state["c/w"].tolist() == [2.5]


def _reference(
    data: list[tuple[np.ndarray, np.ndarray]],
    steps: list[int],
    lr: float,
    eta_g: float,
    selected: list[list[int]],
    forget: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Algorithm 1 of the paper, written out with numpy over the given sampled sets
    (``forget``: clients lose their c_i between rounds, which the runtime must not do)."""
    n, dim = len(data), data[0][0].shape[1]
    x, c = np.zeros(dim), np.zeros(dim)
    ci = [np.zeros(dim) for _ in range(n)]
    for s in selected:
        if forget:
            ci = [np.zeros(dim) for _ in range(n)]
        dy, dc = [], []
        for i in s:
            mat, b = data[i]
            y = x.copy()
            for _ in range(steps[i]):
                y = y - lr * (gradient(mat, b, y) + c - ci[i])
            new = ci[i] - c + (x - y) / (steps[i] * lr)
            dy.append(y - x)
            dc.append(new - ci[i])
            ci[i] = new
        x = x + eta_g * np.mean(dy, axis=0)
        c = c + len(s) / n * np.mean(dc, axis=0)
    return x, c, ci


def _run(backend: str, data: Any, steps: list[int], **kw: Any) -> Any:
    return run_simulation(
        lambda: LeastSquares(data, steps, 0.05),
        Scaffold(fraction_train=0.6, server_learning_rate=0.8),
        num_clients=len(data),
        rounds=5,
        seed=4,
        backend=backend,  # type: ignore[arg-type]
        workers=2,
        evaluate_every=0,
        **kw,
    )


def test_matches_the_paper_with_partial_participation() -> None:
    data = problems(5, 3, 8, seed=3)
    steps = [1, 2, 3, 2, 4]
    result = _run("inprocess", data, steps)
    selected = [
        [r.client_id for r in result.clients if r.round == rnd and r.stage is Stage.TRAIN]
        for rnd in range(1, 6)
    ]
    assert all(len(s) == 3 for s in selected) and len({tuple(s) for s in selected}) > 1
    x, c, _ = _reference(data, steps, 0.05, 0.8, selected)
    np.testing.assert_allclose(result.arrays["w"], x, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(result.state["c/w"], c, rtol=1e-12, atol=1e-13)
    # without the clients' own c_i kept across rounds the answer would differ
    forgetful, _, _ = _reference(data, steps, 0.05, 0.8, selected, forget=True)
    assert not np.allclose(forgetful, x, rtol=1e-6)


def test_client_state_persists_the_same_in_process_and_in_the_pool(tmp_path: Path) -> None:
    data = problems(5, 3, 8, seed=3)
    steps = [1, 2, 3, 2, 4]
    inprocess = _run("inprocess", data, steps)
    pool = _run("pool", data, steps, state_dir=tmp_path)
    assert pool.arrays["w"].tobytes() == inprocess.arrays["w"].tobytes()
    assert pool.state["c/w"].tobytes() == inprocess.state["c/w"].tobytes()
    # every client that trained keeps c_i on disk, as the reference loop has it
    selected = [
        [r.client_id for r in pool.clients if r.round == rnd and r.stage is Stage.TRAIN]
        for rnd in range(1, 6)
    ]
    _, _, ci = _reference(data, steps, 0.05, 0.8, selected)
    from fedlearn.engine.client_state import DirectoryStateStore

    store = DirectoryStateStore(tmp_path)
    for cid in {c for s in selected for c in s}:
        kept = store.load(cid, before=6).arrays["scaffold.c_i/w"]
        np.testing.assert_allclose(kept, ci[cid], rtol=1e-12, atol=1e-13)


def test_config_and_secure_aggregation_refusal() -> None:
    strategy = build_strategy("scaffold", {"server_learning_rate": 0.5})
    assert isinstance(strategy, Scaffold) and strategy.server_learning_rate == 0.5
    with pytest.raises(ConfigError, match="server_learning_rate"):
        build_strategy("scaffold", {"server_learning_rate": 0.0})
    with pytest.raises(ConfigError, match="aggregates differently"):
        SecureAggregation().check(strategy, 5)
    with pytest.raises(ConfigError, match="aggregates differently"):
        SecureAggregation().check(build_strategy("fednova", {}), 5)


class _Data:
    def __init__(self) -> None:
        g = np.random.default_rng(0)
        self.x_train = g.normal(size=(6, 3)).astype(np.float32)
        self.y_train = g.integers(0, 2, size=6)
        self.x_test, self.y_test = self.x_train, self.y_train

    def client(self, cid: int) -> _Data:
        return self


def test_torch_app_applies_the_correction_and_keeps_c_i() -> None:
    # One full batch (6 samples), one step, lr 0.1: the corrected step moves every
    # parameter by an extra -lr * (c - c_i); c_i+ = c_i - c + (x - y)/(K lr).
    app = TorchClientApp(lambda: torch.nn.Linear(3, 2), _Data(), batch_size=6, lr=0.1)
    x = app.initial_arrays(0)
    plain = app.train(x, {}, ClientContext(0, 1, 9)).arrays
    c = {k: np.full(v.shape, 0.5, np.float32) for k, v in x.items()}
    state = ClientState(
        {f"scaffold.c_i/{k}": np.full(v.shape, 0.2, np.float32) for k, v in x.items()}
    )
    broadcast = {**x, **{f"scaffold.c/{k}": v for k, v in c.items()}}
    ctx = ClientContext(0, 1, 9, load_state=lambda: state)
    out = app.train(broadcast, {}, ctx).arrays
    for k in x:
        np.testing.assert_allclose(out[k], plain[k] - 0.1 * (0.5 - 0.2), rtol=0, atol=1e-6)
        new_ci = 0.2 - 0.5 + (x[k] - out[k]) / 0.1
        np.testing.assert_allclose(ctx.state.arrays[f"scaffold.c_i/{k}"], new_ci, atol=1e-5)
        np.testing.assert_allclose(out[f"scaffold.c/{k}"], new_ci - 0.2, atol=1e-5)


def _config(out: Path, rounds: int) -> SimulationConfig:
    return load_config(
        None,
        {
            "run.out_dir": str(out),
            "run.rounds": rounds,
            "run.clients": 5,
            "run.seed": 2,
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "algo_apps:make_app",
            "client.params": {"clients": 5, "seed": 1},
            "strategy.name": "scaffold",
            "strategy.params": {"fraction_train": 0.6, "server_learning_rate": 0.9},
            "backend.kind": "inprocess",
            "publish.enabled": False,
        },
    )


def test_kill_9_mid_round_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """The run process SIGKILLs itself in round 3 after some clients of that round have
    trained and saved their c_i; the resumed run must start them from their round-2 c_i."""
    whole = run_job(_config(tmp_path / "whole", 4))
    assert whole.result is not None
    killed = tmp_path / "killed"
    round3 = sorted(
        r.client_id
        for r in whole.result.clients
        if r.round == 3 and r.stage is Stage.TRAIN and r.ok
    )
    assert len(round3) == 3
    script = (
        "import sys\nfrom test_scaffold import _config\nfrom fedlearn.run.job import run_job\n"
        f"run_job(_config(__import__('pathlib').Path({str(killed)!r}), 4))\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        **{KILL_ENV: f"3:{round3[-1]}"},
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == -9
    states = sorted(p.name for p in (killed / "client-state").iterdir())
    assert f"client-{round3[0]}.state" in states  # trained in round 3 before the kill
    resumed = run_job(_config(killed, 4), resume=True)
    assert resumed.result is not None
    assert [r.round for r in resumed.result.rounds] == [3, 4]
    a = load_weights(whole.out_dir / "model.safetensors")
    b = load_weights(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert whole.result.state["c/w"].tobytes() == resumed.result.state["c/w"].tobytes()


class _Split:
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x_train, self.y_train, self.x_test, self.y_test = x, y, x, y


class _Clients:
    def __init__(self, splits: list[_Split]) -> None:
        self.splits = splits

    def client(self, cid: int) -> _Split:
        return self.splits[cid]


def test_torch_app_over_rounds_matches_the_paper_for_softmax_regression() -> None:
    """TorchClientApp (full-batch steps, so the shuffle does not matter) against the
    paper's loop written out in numpy for softmax regression, over 3 rounds."""
    g = np.random.default_rng(5)
    sizes, epochs, lr = [6, 10, 4], 3, 0.2
    splits = []
    for i, n in enumerate(sizes):
        x = (g.normal(size=(n, 3)) + i).astype(np.float32)
        splits.append(_Split(x, (x.sum(axis=1) > 1.5 * i).astype(np.int64)))
    data = _Clients(splits)

    def app() -> TorchClientApp:
        return TorchClientApp(
            lambda: torch.nn.Linear(3, 2), data, epochs=epochs, batch_size=64, lr=lr
        )

    result = run_simulation(app, Scaffold(), num_clients=3, rounds=3, seed=1, evaluate_every=0)

    def grad(w: np.ndarray, b: np.ndarray, s: _Split) -> tuple[np.ndarray, np.ndarray]:
        z = s.x_train.astype(np.float64) @ w.T + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(s.y_train)), s.y_train] -= 1
        return p.T @ s.x_train / len(s.y_train), p.mean(axis=0)

    x0 = app().initial_arrays(1)
    x = {k: v.astype(np.float64) for k, v in x0.items()}
    c = {k: np.zeros_like(v) for k, v in x.items()}
    ci = [{k: np.zeros_like(v) for k, v in x.items()} for _ in sizes]
    for _ in range(3):
        dy, dc = [], []
        for i, s in enumerate(splits):
            y = {k: v.copy() for k, v in x.items()}
            for _ in range(epochs):
                gw, gb = grad(y["weight"], y["bias"], s)
                for k, gk in (("weight", gw), ("bias", gb)):
                    y[k] = y[k] - lr * (gk + c[k] - ci[i][k])
            new = {k: ci[i][k] - c[k] + (x[k] - y[k]) / (epochs * lr) for k in x}
            dy.append({k: y[k] - x[k] for k in x})
            dc.append({k: new[k] - ci[i][k] for k in x})
            ci[i] = new
        x = {k: x[k] + np.mean([d[k] for d in dy], axis=0) for k in x}
        c = {k: c[k] + np.mean([d[k] for d in dc], axis=0) for k in x}
    for k in x:
        np.testing.assert_allclose(result.arrays[k], x[k], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.state[f"c/{k}"], c[k], rtol=1e-3, atol=1e-4)
