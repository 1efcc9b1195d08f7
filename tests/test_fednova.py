"""FedNova: a hand-computed round, the paper's update on a random problem, step reports.

Expected values come from Wang et al. (2020): ``d_i = (x - x_i) / a_i``,
``tau_eff = sum p_i a_i``, ``x' = x - tau_eff sum p_i d_i`` with ``p_i = n_i / sum n``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from algo_apps import LeastSquares, gradient, problems

from fedlearn.apps.torch_app import TorchClientApp
from fedlearn.engine.client_app import ClientContext
from fedlearn.engine.messages import Stage
from fedlearn.errors import ConfigError
from fedlearn.simulation import run_simulation
from fedlearn.strategy import FedNova, RoundContext, build_strategy
from fedlearn.strategy.base import ClientUpdate
from fedlearn.strategy.fednova import momentum_norm


def _ctx(rnd: int = 1) -> RoundContext:
    return RoundContext(rnd, 3, np.random.default_rng(0), num_clients=3, seed=7)


def test_hand_computed_round() -> None:
    # x = (1, 2); client 0: n=10, tau=2, x_0 = (0, 1); client 1: n=30, tau=4, x_1 = (2, 0)
    # d_0 = (1, 1)/2 = (0.5, 0.5); d_1 = (-1, 2)/4 = (-0.25, 0.5); p = (0.25, 0.75)
    # tau_eff = 0.25*2 + 0.75*4 = 3.5; sum p d = (-0.0625, 0.5)
    # x' = (1, 2) - 3.5 * (-0.0625, 0.5) = (1.21875, 0.25)   [FedAvg: (1.5, 0.25)]
    x = {"w": np.array([1.0, 2.0])}
    fold = FedNova().start_fold(_ctx(), x)
    fold.add(ClientUpdate(0, {"w": np.array([0.0, 1.0])}, 10, {"fednova.steps": 2}))
    fold.add(ClientUpdate(1, {"w": np.array([2.0, 0.0])}, 30, {"fednova.steps": 4}))
    new, state = FedNova().server_update(_ctx(), x, fold.result(), {})
    np.testing.assert_allclose(new["w"], [1.21875, 0.25], rtol=0, atol=1e-15)
    assert state == {}


def test_momentum_normalizer_and_explicit_a() -> None:
    # tau=3, rho=0.5: step weights (1-rho^3)/(1-rho)=1.75, (1-rho^2)/(1-rho)=1.5, 1 -> 4.25
    assert momentum_norm(3, 0.5) == pytest.approx(4.25)
    assert momentum_norm(5, 0.0) == 5.0
    # one client with a = 4.25 alone: x' = x - a * (x - x_1)/a = x_1
    x = {"w": np.array([1.0])}
    fold = FedNova().start_fold(_ctx(), x)
    fold.add(ClientUpdate(0, {"w": np.array([0.5])}, 3, {"fednova.steps": 3, "fednova.a": 4.25}))
    assert fold.result()["w"][0] == pytest.approx(0.5)


def test_missing_step_count_rejects_that_client() -> None:
    strategy = FedNova(min_train_clients=1)
    result = run_simulation(
        lambda: _NoSteps(problems(2, 2, 4, 0), [1, 1], 0.1),
        strategy,
        num_clients=2,
        rounds=1,
        evaluate_every=0,
    )
    errors = [r.error for r in result.clients if r.stage is Stage.TRAIN]
    assert errors and all("fednova.steps" in str(e) for e in errors)
    assert not result.rounds[0].ok


class _NoSteps(LeastSquares):
    def train(self, arrays, config, ctx):  # type: ignore[no-untyped-def]
        out = super().train(arrays, config, ctx)
        return type(out)(out.arrays, out.num_examples, {})


def test_matches_the_paper_on_a_random_problem() -> None:
    n, rounds, lr = 4, 3, 0.05
    data = problems(n, 3, 8, seed=1)
    steps = [1, 2, 5, 3]
    result = run_simulation(
        lambda: LeastSquares(data, steps, lr),
        FedNova(),
        num_clients=n,
        rounds=rounds,
        evaluate_every=0,
    )
    # independent reference: every client trains each round
    x = np.zeros(3)
    for _ in range(rounds):
        sizes = np.array([len(b) for _, b in data], dtype=float)
        p = sizes / sizes.sum()
        d, a = [], []
        for (mat, b), tau in zip(data, steps, strict=True):
            y = x.copy()
            for _ in range(tau):
                y = y - lr * gradient(mat, b, y)
            d.append((x - y) / tau)
            a.append(tau)
        tau_eff = float(np.dot(p, a))
        x = x - tau_eff * sum(pi * di for pi, di in zip(p, d, strict=True))
    np.testing.assert_allclose(result.arrays["w"], x, rtol=1e-12, atol=1e-14)
    # and it is not FedAvg's answer on this problem
    fedavg = run_simulation(
        lambda: LeastSquares(data, steps, lr),
        build_strategy("fedavg", {}),
        num_clients=n,
        rounds=rounds,
        evaluate_every=0,
    )
    assert not np.allclose(fedavg.arrays["w"], x, rtol=1e-6)


def test_heterogeneous_epochs_are_drawn_per_client_and_round() -> None:
    strategy = FedNova(local_epochs_min=1, local_epochs_max=4)
    ctx = _ctx()
    drawn = [strategy.client_train_config(ctx, cid, {"fednova": True}) for cid in range(20)]
    epochs = [c["epochs"] for c in drawn]
    assert all(1 <= e <= 4 for e in epochs) and len(set(epochs)) > 1
    assert all(c["fednova"] is True for c in drawn)
    again = [strategy.client_train_config(_ctx(), cid, {})["epochs"] for cid in range(20)]
    assert again == epochs  # seeded by (run seed, round, client)
    other = [strategy.client_train_config(_ctx(2), cid, {})["epochs"] for cid in range(20)]
    assert other != epochs
    assert FedNova().client_train_config(ctx, 0, {"a": 1}) == {"a": 1}


def test_drawn_epochs_reach_the_clients_and_backends_agree() -> None:
    data = problems(4, 3, 8, seed=2)
    strategy = FedNova(local_epochs_min=1, local_epochs_max=3)

    def run(backend: str) -> np.ndarray:
        result = run_simulation(
            lambda: LeastSquares(data, [1, 1, 1, 1], 0.05),
            strategy,
            num_clients=4,
            rounds=2,
            seed=3,
            backend=backend,  # type: ignore[arg-type]
            workers=2,
            evaluate_every=0,
        )
        steps = {r.metrics["fednova.steps"] for r in result.clients if r.stage is Stage.TRAIN}
        assert len(steps) > 1  # the clients ran the drawn epochs, not their own 1
        return result.arrays["w"]

    assert run("inprocess").tobytes() == run("pool").tobytes()


@pytest.mark.parametrize(
    "params",
    [
        {"local_epochs_min": 3, "local_epochs_max": 2},
        {"local_epochs_min": 0, "local_epochs_max": 2},
    ],
)
def test_bad_epoch_ranges_are_config_errors(params: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="local_epochs"):
        build_strategy("fednova", params)


class _Data:
    def __init__(self, n: int) -> None:
        g = np.random.default_rng(0)
        self.x_train = g.normal(size=(n, 4)).astype(np.float32)
        self.y_train = g.integers(0, 2, size=n)
        self.x_test, self.y_test = self.x_train[:4], self.y_train[:4]

    def client(self, cid: int) -> _Data:
        return self


def test_torch_app_reports_steps_and_momentum_normalizer() -> None:
    app = TorchClientApp(lambda: torch.nn.Linear(4, 2), _Data(10), batch_size=4, momentum=0.5)
    arrays = app.initial_arrays(0)
    out = app.train(arrays, {"fednova": True, "epochs": 2}, ClientContext(0, 1, 5))
    assert out.metrics["fednova.steps"] == 6  # 2 epochs x ceil(10 / 4) batches
    assert out.metrics["fednova.a"] == pytest.approx(momentum_norm(6, 0.5))
    plain = app.train(arrays, {}, ClientContext(0, 1, 5))
    assert "fednova.steps" not in plain.metrics
