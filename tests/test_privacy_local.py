"""Local DP in the client runtime: clip bound, noise scale, seeding, site floors, and real
runs (a robust strategy in simulation; sites over gRPC on loopback)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays as np_arrays

from apps import LogReg
from deployment import FAULT_APP, FAULT_PARAMS, Deployment, in_process_coordinator, simulated_data
from fedlearn.config.deployment import SiteConfig
from fedlearn.config.loading import load_toml, validate
from fedlearn.deploy.launch import site_dp_floor
from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.messages import Stage, Task
from fedlearn.engine.records import Arrays, Config
from fedlearn.engine.references import resolve
from fedlearn.engine.runtime import ClientRuntime
from fedlearn.errors import ConfigError
from fedlearn.privacy.keys import TaskDP
from fedlearn.privacy.local import (
    LOCAL_DP_STREAM,
    LocalDPFloor,
    PrivateTraining,
    clip_update,
    local_dp,
    privatize,
)
from fedlearn.privacy.noise import seeded_noise
from fedlearn.privacy.norms import l2_norm
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import run_simulation
from fedlearn.strategy import FedAvg, FedMedian
from fedlearn.strategy.base import RoundContext


def local_config(sigma: float, clip: float, noise: str = "seeded") -> Config:
    return {"dp.mode": "local", "dp.noise_multiplier": sigma, "dp.clip": clip, "dp.noise": noise}


@dataclass(frozen=True, kw_only=True)
class LocalMedian(FedMedian):
    """FedMedian whose training tasks ask for local DP (the core part's wrapper, later)."""

    sigma: float = 1.0
    clip: float = 1.0

    def train_config(self, ctx: RoundContext) -> Config:
        return local_config(self.sigma, self.clip)


@dataclass(frozen=True, kw_only=True)
class LocalFedAvg(FedAvg):
    sigma: float = 1.0
    clip: float = 1.0

    def train_config(self, ctx: RoundContext) -> Config:
        return local_config(self.sigma, self.clip)


class Shift:
    """A ClientApp whose update is a fixed delta (and an int counter it bumps)."""

    def __init__(self, delta: np.ndarray) -> None:
        self.delta = delta

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        new = {"w": arrays["w"] + self.delta.reshape(arrays["w"].shape), "n": arrays["n"] + 1}
        return TrainResult(new, 10, {"train_loss": 0.5})

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        return EvaluateResult(1, 0.0)


def train_task(config: Config, seed: int = 7, cid: int = 0) -> Task:
    return Task(Stage.TRAIN, 1, cid, seed, config)


# ------------------------------------------------------------------------- the clip bound


finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(
    delta=np_arrays(np.float64, st.integers(1, 300), elements=finite),
    clip=st.floats(1e-6, 1e6),
)
def test_clip_bounds_every_update_and_keeps_its_direction(delta: np.ndarray, clip: float) -> None:
    out = clip_update(delta, clip)
    norm = l2_norm(delta)
    assert l2_norm(out) <= clip  # the norm it clips by: never above
    assert float(np.linalg.norm(out)) <= clip * (1 + 1e-12)  # BLAS's: within its rounding
    if norm <= clip:
        assert out.tobytes() == delta.tobytes()  # within the bound: untouched
    else:
        np.testing.assert_allclose(out, delta * (clip / norm), rtol=1e-12, atol=1e-300)


@settings(max_examples=60, deadline=None)
@given(
    delta=np_arrays(np.float64, st.integers(1, 200), elements=finite),
    clip=st.floats(1e-3, 1e3),
    sigma=st.floats(0.01, 10),
    seed=st.integers(0, 2**63 - 1),
)
def test_what_leaves_is_the_clipped_delta_plus_the_keyed_noise(
    delta: np.ndarray, clip: float, sigma: float, seed: int
) -> None:
    """Over the runtime: (sent - global) - noise is within C, the counter stays global."""
    glob = {"w": np.linspace(-1, 1, delta.size), "n": np.array([3], np.int64)}
    runtime = ClientRuntime(Shift(delta))
    reply = runtime.handle(train_task(local_config(sigma, clip), seed), glob)
    assert reply.ok, reply.error
    assert reply.arrays is not None
    noise = seeded_noise(seed, LOCAL_DP_STREAM).normal(delta.size, sigma * clip)
    sent = reply.arrays["w"] - glob["w"]
    assert float(np.linalg.norm(sent - noise)) <= clip * (1 + 1e-9) + 1e-9
    assert reply.arrays["n"].tobytes() == glob["n"].tobytes()  # not +1: counters say nothing


def test_privatize_rejects_an_update_with_other_names_or_nan() -> None:
    dp = TaskDP("local", 1.0, 1.0, "seeded")
    glob = {"w": np.zeros(3)}
    with pytest.raises(ValueError, match="names"):
        privatize({"v": np.zeros(3)}, glob, dp, 0)
    with pytest.raises(ValueError, match="NaN"):
        privatize({"w": np.array([0.0, np.nan, 0.0])}, glob, dp, 0)


# ------------------------------------------------------------------------- the noise


@pytest.mark.parametrize("noise", ["secure", "seeded"])
def test_noise_std_is_sigma_times_clip_within_2_percent(noise: str) -> None:
    """1.2e6 coordinates of a float32 model, an update far inside C: what leaves minus the
    global model is pure noise of std sigma * C."""
    n, sigma, clip = 1_200_000, 1.3, 0.7
    glob = {"w": np.full(n, 0.25, np.float32), "n": np.zeros(1, np.int64)}
    app = Shift(np.full(n, 1e-7 / np.sqrt(n), np.float32))
    reply = ClientRuntime(app).handle(train_task(local_config(sigma, clip, noise)), glob)
    assert reply.arrays is not None
    sent = reply.arrays["w"].astype(np.float64) - glob["w"]
    assert reply.arrays["w"].dtype == np.float32
    assert abs(sent.std() / (sigma * clip) - 1) < 0.02
    assert abs(sent.mean()) < 5 * sigma * clip / np.sqrt(n)
    assert reply.metrics == {"dp.noise_multiplier": sigma, "dp.clip": clip}


def test_seeded_noise_repeats_and_secure_noise_does_not() -> None:
    glob = {"w": np.zeros(50), "n": np.zeros(1, np.int64)}
    runtime = ClientRuntime(Shift(np.ones(50)))

    def sent(config: Config, seed: int = 7) -> bytes:
        reply = runtime.handle(train_task(config, seed), glob)
        assert reply.arrays is not None
        return reply.arrays["w"].tobytes()

    seeded = local_config(1.0, 1.0, "seeded")
    assert sent(seeded) == sent(seeded)
    assert sent(seeded) != sent(seeded, seed=8)
    secure = local_config(1.0, 1.0, "secure")
    assert sent(secure) != sent(secure)


# ------------------------------------------------------------------------- the runtime


def test_without_dp_the_runtime_sends_the_apps_update_bit_for_bit() -> None:
    app = LogReg()
    glob = app.initial_arrays(0)
    ctx = ClientContext(2, 1, 99)
    direct = app.train(glob, {}, ctx)
    reply = ClientRuntime(LogReg()).handle(Task(Stage.TRAIN, 1, 2, 99, {}), glob)
    assert reply.arrays is not None
    assert [reply.arrays[k].tobytes() for k in glob] == [direct.arrays[k].tobytes() for k in glob]
    assert reply.metrics == direct.metrics  # train_loss stays without DP


def test_local_dp_keeps_only_dp_metrics() -> None:
    reply = ClientRuntime(LogReg()).handle(
        train_task(local_config(0.5, 2.0), cid=1), LogReg().initial_arrays(0)
    )
    assert reply.ok
    assert reply.metrics == {"dp.noise_multiplier": 0.5, "dp.clip": 2.0}
    assert reply.num_examples == 40


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"dp.mode": "local", "dp.clip": 1.0}, "dp.noise_multiplier is missing"),
        ({"dp.mode": "local", "dp.clip": 0.0, "dp.noise_multiplier": 1.0}, "dp.clip must be"),
        ({"dp.mode": "global", "dp.clip": 1.0, "dp.noise_multiplier": 1.0}, "dp.mode must be"),
        (local_config(1.0, 1.0, "pseudo"), "dp.noise must be"),
    ],
)
def test_a_bad_dp_config_fails_the_task_with_its_key_before_training(
    config: Config, message: str
) -> None:
    calls: list[int] = []

    class Counting(LogReg):
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            calls.append(ctx.client_id)
            return super().train(arrays, config, ctx)

    reply = ClientRuntime(Counting()).handle(train_task(config), LogReg().initial_arrays(0))
    assert reply.error is not None
    assert "ConfigError" in reply.error
    assert message in reply.error
    assert calls == []


def test_site_floor_raises_sigma_applies_unasked_and_allows_seeded_only_if_both_say_so() -> None:
    floor = LocalDPFloor(2.0, clip=0.5, noise="secure")
    assert local_dp({}, None) is None
    assert local_dp({"dp.mode": "example", "dp.clip": 1.0, "dp.noise_multiplier": 1.0}) is None
    assert local_dp({}, floor) == TaskDP("local", 2.0, 0.5, "secure")
    assert local_dp(local_config(1.0, 3.0), floor) == TaskDP("local", 2.0, 3.0, "secure")
    assert local_dp(local_config(4.0, 3.0), floor) == TaskDP("local", 4.0, 3.0, "secure")
    seeded_floor = LocalDPFloor(2.0, noise="seeded")
    assert local_dp(local_config(1.0, 3.0, "seeded"), seeded_floor) == TaskDP(
        "local", 2.0, 3.0, "seeded"
    )
    with pytest.raises(ConfigError, match=r"dp\.noise_multiplier"):
        LocalDPFloor(0.0)


def test_floor_on_top_of_example_level_dp_reports_both() -> None:
    class Example(Shift):
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            result = super().train(arrays, config, ctx)
            return TrainResult(
                result.arrays,
                10,
                {"dp.noise_multiplier": 0.9, "dp.sample_rate": 0.1, "train_loss": 1.0},
            )

    training = PrivateTraining(Example(np.ones(4)), LocalDPFloor(3.0, 0.25))
    glob = {"w": np.zeros(4), "n": np.zeros(1, np.int64)}
    result = training.train(glob, {}, ClientContext(0, 1, 5))
    assert result.metrics == {
        "dp.noise_multiplier": 0.9,
        "dp.sample_rate": 0.1,
        "dp.local.noise_multiplier": 3.0,
        "dp.local.clip": 0.25,
    }


def test_site_privacy_section_is_off_by_default_and_checked() -> None:
    raw = {"site": {"name": "s"}, "data": {"path": "x.npz"}, "client": {"app": "m:f"}}
    assert site_dp_floor(validate(SiteConfig, raw)) is None
    with pytest.raises(ConfigError, match=r"privacy\.min_noise_multiplier"):
        validate(SiteConfig, raw | {"privacy": {"min_noise_multiplier": 0}})
    with pytest.raises(ConfigError, match=r"privacy\.noise"):
        validate(SiteConfig, raw | {"privacy": {"min_noise_multiplier": 1, "noise": "weak"}})


# ------------------------------------------------------------------------- real runs


def test_local_dp_with_a_robust_strategy_in_simulation() -> None:
    """FedMedian (holistic) over locally noised updates: runs, is reproducible when
    seeded, is the plain run when the mechanism is a no-op, and noise moves the model."""

    def run(strategy: FedMedian, backend: str = "inprocess"):  # type: ignore[no-untyped-def]
        return run_simulation(
            LogReg,
            strategy,
            num_clients=5,
            rounds=3,
            seed=3,
            backend=backend,  # type: ignore[arg-type]
        )

    noised = run(LocalMedian(sigma=1.0, clip=0.1))
    assert all(r.ok for r in noised.rounds)
    train = [c for c in noised.clients if c.stage is Stage.TRAIN]
    assert len(train) == 15
    assert all(c.metrics == {"dp.noise_multiplier": 1.0, "dp.clip": 0.1} for c in train)
    again = run(LocalMedian(sigma=1.0, clip=0.1), backend="pool")
    assert all(noised.arrays[k].tobytes() == again.arrays[k].tobytes() for k in noised.arrays)

    plain = run(FedMedian())
    no_op = run(LocalMedian(sigma=1e-12, clip=1e6))  # clipping nothing, noise ~1e-6
    gap = max(float(np.abs(no_op.arrays[k] - plain.arrays[k]).max()) for k in plain.arrays)
    assert gap < 1e-4
    moved = max(float(np.abs(noised.arrays[k] - plain.arrays[k]).max()) for k in plain.arrays)
    assert moved > 0.01


def test_local_dp_noises_the_update_before_secure_aggregation_masks_it() -> None:
    """Under SecAgg+ the setup stage trains through the same wrapper: the securely summed
    model is the plain local-DP run's up to SecAgg's fixed-point rounding."""
    secure = SecureAggregation(clip=10.0, max_weight=100)
    strategy = LocalFedAvg(sigma=0.5, clip=0.3)

    def run(secure: SecureAggregation | None, strategy: FedAvg):  # type: ignore[no-untyped-def]
        return run_simulation(LogReg, strategy, num_clients=4, rounds=2, seed=1, secure=secure)  # type: ignore[arg-type]

    masked, plain = run(secure, strategy), run(None, strategy)
    assert all(r.ok for r in masked.rounds)
    for name in plain.arrays:
        np.testing.assert_allclose(masked.arrays[name], plain.arrays[name], atol=1e-5)
    unnoised = run(secure, FedAvg())
    assert (
        max(float(np.abs(unnoised.arrays[k] - masked.arrays[k]).max()) for k in plain.arrays) > 0.01
    )
    train = [c for c in masked.clients if c.stage is Stage.TRAIN]
    assert train and all(c.metrics == {"dp.noise_multiplier": 0.5, "dp.clip": 0.3} for c in train)


def test_site_privacy_floor_over_grpc_equals_the_local_dp_simulation(tmp_path: Path) -> None:
    """Sites whose site.toml demands local DP (seeded, for the comparison) under a
    coordinator that asks for none: the run over gRPC on loopback is bit for bit the
    simulation whose tasks ask for that local DP."""
    d = Deployment(tmp_path, app=FAULT_APP, params=dict(FAULT_PARAMS), rounds=2)
    for i in range(d.num_sites):
        path = d.root / f"site-{i}.toml"
        path.write_text(
            path.read_text() + "\n[privacy]\nmin_noise_multiplier = 0.5\nclip = 0.2\n"
            'noise = "seeded"\n'
        )
    floor = site_dp_floor(load_toml(SiteConfig, d.root / "site-0.toml"))
    assert floor == LocalDPFloor(0.5, 0.2, "seeded")
    try:
        with in_process_coordinator(d) as c:
            for i in range(d.num_sites):
                c.start_site(i)
            result = c.wait(60)
    finally:
        d.stop_all()
    make_app = resolve(d.app, "client.app")
    data = simulated_data(d.num_sites, d.seed)
    simulated = run_simulation(
        lambda: make_app(data, **d.params),
        LocalFedAvg(sigma=0.5, clip=0.2, min_train_clients=1),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )
    assert list(result.arrays) == list(simulated.arrays)
    for name in simulated.arrays:
        assert result.arrays[name].tobytes() == simulated.arrays[name].tobytes(), name
    train = [c for c in result.clients if c.stage is Stage.TRAIN]
    assert train and all(c.metrics["dp.noise_multiplier"] == 0.5 for c in train)
    assert not (d.initial["w"] == result.arrays["w"]).all()
