"""Distributed DP under SecAgg+: Skellam shares, calibration, modulus room, accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from apps import LogReg
from fedlearn.config.simulation import PrivacySection, SecAggSection
from fedlearn.engine.client_app import ClientContext, TrainResult
from fedlearn.engine.records import Arrays, Config
from fedlearn.errors import ConfigError, SerializationError
from fedlearn.privacy.distributed import (
    RDP_ORDERS,
    DistributedNoise,
    calibrate,
    distributed_event,
    distributed_noise,
    noised_integers,
    randomized_round,
    rounded_norm_bound,
    skellam_rdp,
    skellam_tail,
    zcdp_parameters,
)
from fedlearn.privacy.noise import seeded_noise
from fedlearn.privacy.skellam import poisson, skellam
from fedlearn.secagg import SecAggConfig, SecAggSimulation, Stage
from fedlearn.secagg.messages import Setup, decode_message
from fedlearn.secagg.stages import SecureAggregation, SecureRound
from fedlearn.simulation import run_simulation
from fedlearn.strategy import FedAvg

DELTA = 1e-5


def _clip(x: np.ndarray, c: float) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x if norm <= c else x * (c / norm)


def _updates(n: int, d: int, seed: int = 0) -> dict[int, tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)  # norms around 0.5..3: some clipped, some not
    return {c: (rng.normal(size=d) * rng.uniform(0.5, 3.0) / math.sqrt(d), 7 + c) for c in range(n)}


def _epsilon(event: dp_accounting.DpEvent, rounds: int = 1, integer: bool = False) -> float:
    acc = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS) if integer else None)
    acc.compose(event, rounds)
    return float(acc.get_epsilon(DELTA))


# ------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("lam", [0.7, 4.0, 12.0, 60.0])
def test_poisson_sampler_matches_the_pmf(lam: float) -> None:
    n = 200_000
    x = poisson(seeded_noise(1, 2, 3), lam, n)
    top = int(lam + 12 * math.sqrt(lam) + 10)
    counts = np.bincount(x, minlength=top + 1)[: top + 1] / n
    pmf = np.array([math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)) for k in range(top + 1)])
    # total variation: sampling alone gives about 0.5 sqrt(2 / (pi n)) sum(sqrt(pmf)), which
    # is 0.0056 at lam = 60; and a chi-square test on the bins expecting at least 5
    assert 0.5 * np.abs(counts - pmf).sum() < 0.01
    expected = pmf * n
    big = expected >= 5
    observed = np.append(counts[big] * n, n - (counts[big] * n).sum())
    assert (
        stats.chisquare(observed, np.append(expected[big], n - expected[big].sum())).pvalue > 1e-4
    )
    assert x.min() >= 0


@pytest.mark.parametrize("variance", [3.0, 2.5e3, 7.3e9, 2.0**51])
def test_skellam_sampler_has_mean_zero_and_the_asked_variance(variance: float) -> None:
    x = skellam(seeded_noise(9, variance.hex().__len__()), variance, 400_000).astype(np.float64)
    assert x.dtype == np.float64
    assert abs(x.mean()) < 5 * math.sqrt(variance / 400_000)
    assert abs(x.var() / variance - 1) < 0.012  # sd of the estimate ~0.0022


def test_the_samplers_draw_only_from_their_source() -> None:
    a = skellam(seeded_noise(5, 1, 2), 1e8, 1000)
    b = skellam(seeded_noise(5, 1, 2), 1e8, 1000)
    c = skellam(seeded_noise(5, 1, 3), 1e8, 1000)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


@pytest.mark.parametrize("variance", [2.0, 40.0, 1e4])
def test_skellam_tail_bound_holds(variance: float) -> None:
    t = skellam_tail(variance, 1e-4)
    x = skellam(seeded_noise(4), variance, 200_000)
    assert np.mean(np.abs(x) >= t) <= 1e-4 + 1e-4  # empirical tail below the bound
    assert t < 6 * math.sqrt(variance) + 10  # and the bound is not absurd


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40),
    st.floats(0.01, 1e3),
    st.integers(0, 2**32),
)
def test_conditional_rounding_meets_its_bound_and_moves_each_value_by_less_than_one(
    values: list[float], c: float, seed: int
) -> None:
    y = np.array(values)
    norm = float(np.linalg.norm(y))
    if norm > c:
        y *= c / norm
    bound = rounded_norm_bound(c, y.size)
    out = randomized_round(y, bound, seeded_noise(seed))
    assert out.dtype == np.int64
    assert float(np.dot(out, out)) <= bound * bound
    assert np.all(np.abs(out - y) < 1.0)


# ---------------------------------------------------------------------- the protocol


def test_noised_secure_sum_has_the_target_variance_within_3_percent() -> None:
    n, d, sigma, clip = 8, 150_000, 1.5, 1.0
    cfg = SecAggConfig.create(
        range(n), d, max_weight=100, clip=clip, noise=DistributedNoise(sigma, seed=11)
    )
    updates = _updates(n, d)
    result = SecAggSimulation(updates, cfg, round=3).run()
    exact = sum(_clip(x, clip) for x, _ in updates.values())
    noise = result.weighted_sum - exact
    target = (sigma * clip) ** 2
    assert result.total_weight == n  # every client sends weight 1 under distributed DP
    assert abs(noise.var() / target - 1) < 0.03, noise.var() / target
    assert abs(noise.mean()) < 5 * sigma * clip / math.sqrt(d)
    assert math.isclose(cfg.round_noise.noise_std(n), sigma * clip)  # type: ignore[union-attr]


def test_dropouts_leave_less_noise_and_a_larger_epsilon() -> None:
    n, d, sigma = 10, 100_000, 1.0
    noise = DistributedNoise(sigma, seed=2)
    cfg = SecAggConfig.create(range(n), d, max_weight=100, clip=1.0, noise=noise)
    updates = _updates(n, d, seed=1)
    full = SecAggSimulation(updates, cfg).run()
    dropped = SecAggSimulation(updates, cfg).run({Stage.MASKED: [1, 4, 7]})
    assert len(full.survivors) == 10 and len(dropped.survivors) == 7
    exact = sum(_clip(updates[c][0], 1.0) for c in dropped.survivors)
    ratio = (dropped.weighted_sum - exact).var() / sigma**2
    assert abs(ratio - 0.7) < 0.03 * 0.7, ratio  # 7 of 10 shares: 70 % of the variance
    rn = cfg.round_noise
    assert rn is not None
    eps_full = _epsilon(distributed_event(rn, 10), 20)
    eps_drop = _epsilon(distributed_event(rn, 7), 20)
    assert eps_drop > eps_full * 1.1, (eps_full, eps_drop)


def test_worst_case_clients_cannot_make_the_sum_wrap() -> None:
    # every client puts its whole norm on one coordinate, with the same sign, at the
    # largest scale the modulus check allows
    n, d = 6, 64
    cfg = SecAggConfig.create(
        range(n), d, max_weight=1, clip=3.0, modulus_bits=20, noise=DistributedNoise(0.5, seed=1)
    )
    spike = np.zeros(d)
    spike[5] = 1e6
    for sign in (1.0, -1.0):
        result = SecAggSimulation({c: (sign * spike, 1) for c in range(n)}, cfg).run()
        assert abs(result.weighted_sum[5] - sign * n * 3.0) < 10 * 0.5 * 3.0
    bigger = cfg.scale_bits + 1
    with pytest.raises(ConfigError, match="do not fit"):
        SecAggConfig.create(
            range(n),
            d,
            max_weight=1,
            clip=3.0,
            modulus_bits=20,
            scale_bits=bigger,
            noise=DistributedNoise(0.5),
        )


@given(
    st.floats(1e-3, 1e3),
    st.one_of(st.none(), st.integers(1, 10_000)),
    st.one_of(st.none(), st.integers(0, 2**63 - 1)),
)
def test_noise_settings_round_trip_through_json(
    sigma: float, expected: int | None, seed: int | None
) -> None:
    noise = DistributedNoise(sigma, expected, seed)
    assert DistributedNoise.from_json(noise.to_json()) == noise
    source = noise.source(4, 2)
    assert source.secure == (seed is None)
    if seed is not None:
        again = noise.source(4, 2).bits(4)
        assert source.bits(4).tobytes() == again.tobytes()
        assert noise.source(4, 3).bits(4).tobytes() != again.tobytes()


@pytest.mark.parametrize(("clients", "modulus_bits"), [(3, 32), (3, 64), (40, 64), (200, 32)])
def test_the_chosen_scale_is_usable_for_any_ring(clients: int, modulus_bits: int) -> None:
    noise = DistributedNoise(1.0, seed=1)
    cfg = SecAggConfig.create(
        range(clients), 500, max_weight=1, clip=1.0, modulus_bits=modulus_bits, noise=noise
    )
    rn = cfg.round_noise
    assert rn is not None and rn.headroom() >= 0 and rn.variance <= 2.0**50
    assert rn.norm_bound / rn.scaled_clip < 1.001
    updates = _updates(clients, 500) if clients <= 40 else None
    if updates is not None:
        result = SecAggSimulation(updates, cfg).run()
        exact = sum(_clip(x, 1.0) for x, _ in updates.values())
        assert np.abs(result.weighted_sum - exact).max() < 8.0  # noise of std 1, no wrap
    with pytest.raises(ConfigError, match="2\\^50"):
        calibrate(
            noise,
            clip=1.0,
            dimension=500,
            clients=clients,
            modulus_bits=64,
            scale_bits=40,
        )


def test_noise_settings_travel_in_setup_and_seeded_rounds_repeat() -> None:
    noise = DistributedNoise(0.8, expected_clients=4, seed=5)
    cfg = SecAggConfig.create(range(5), 300, max_weight=10, clip=0.5, noise=noise)
    setup = cfg_setup = SecAggSimulation(_updates(5, 300), cfg).server.start()[0]
    again = decode_message(cfg_setup.to_bytes())
    assert isinstance(again, Setup) and again.config == cfg and again.config.noise == noise
    assert again.config.round_noise == cfg.round_noise
    assert setup.config.to_json()["noise"] == {
        "noise_multiplier": 0.8,
        "expected_clients": 4,
        "seed": 5,
    }
    plain = SecAggConfig.create(range(5), 300, max_weight=10, clip=0.5)
    assert "noise" not in plain.to_json()  # plain rounds keep their wire format
    raw = cfg.to_json()
    raw["noise"] = {"noise_multiplier": -1.0, "expected_clients": None, "seed": None}
    with pytest.raises(SerializationError):
        SecAggConfig.from_json(raw)
    runs = [SecAggSimulation(_updates(5, 300), cfg).run() for _ in range(2)]
    assert runs[0].weighted_sum.tobytes() == runs[1].weighted_sum.tobytes()
    secure = SecAggConfig.create(
        range(5), 300, max_weight=10, clip=0.5, noise=DistributedNoise(0.8)
    )
    fresh = [SecAggSimulation(_updates(5, 300), secure).run() for _ in range(2)]
    assert fresh[0].weighted_sum.tobytes() != fresh[1].weighted_sum.tobytes()


def test_a_client_alone_is_clipped_in_l2_and_noised() -> None:
    cfg = SecAggConfig.create(range(4), 1000, max_weight=10, clip=2.0, noise=DistributedNoise(1.0))
    rn = cfg.round_noise
    assert rn is not None
    x = np.full(1000, 10.0)
    v = noised_integers(x, rn, seeded_noise(1)).astype(np.float64) / 2.0**rn.scale_bits
    # the noise share has variance (sigma C)^2 / 4 = 1 per coordinate; the signal is
    # x clipped to norm 2, i.e. 2/sqrt(1000) per coordinate
    assert abs(v.mean() - 2 / math.sqrt(1000)) < 5 / math.sqrt(1000)
    assert abs(v.var() / 1.0 - 1) < 0.15


# ---------------------------------------------------------------------- accounting


def test_event_upper_bounds_the_skellam_rdp_at_every_order_and_is_near_gaussian() -> None:
    noise = calibrate(
        DistributedNoise(1.2), clip=0.7, dimension=50_000, clients=20, modulus_bits=32
    )
    for survivors in (20, 13):
        for neighbours in ("add_or_remove", "replace"):
            rho, xi = zcdp_parameters(noise, survivors, neighbours)  # type: ignore[arg-type]
            rho_i, xi_i = zcdp_parameters(noise, survivors, neighbours, integer_orders=True)  # type: ignore[arg-type]
            for order in np.arange(1.1, 80.0, 0.1):
                paper = skellam_rdp(noise, survivors, math.ceil(order), neighbours)  # type: ignore[arg-type]
                assert rho * order + xi >= paper  # at every real order
            for k in range(2, 200):
                paper = skellam_rdp(noise, survivors, k, neighbours)  # type: ignore[arg-type]
                assert rho_i * k + xi_i >= paper * (1 - 1e-12)
                assert rho_i * k + xi_i <= paper * (1 + 1e-9)  # the paper's bound itself
    for sigma, rounds in ((1.2, 50), (8.0, 30)):
        noise = calibrate(
            DistributedNoise(sigma), clip=0.7, dimension=50_000, clients=20, modulus_bits=32
        )
        gauss = dp_accounting.GaussianDpEvent(sigma)  # the same variance, real-valued
        tight = _epsilon(distributed_event(noise, 20, integer_orders=True), rounds, True)
        assert _epsilon(gauss, rounds, True) < tight < _epsilon(gauss, rounds, True) * 1.001
        safe = _epsilon(distributed_event(noise, 20), rounds)
        assert tight <= safe < 2 * tight, (tight, safe)
        assert _epsilon(distributed_event(noise, 20, "replace"), rounds) > safe
    assert 2.5 < tight < 3.5, tight  # the (8.0, 30) setting: a practical epsilon
    assert safe < 1.1 * tight, (tight, safe)  # where the conservative event costs ~1/alpha


def test_secure_rounds_report_their_survivors_and_event() -> None:
    seen: list[SecureRound] = []
    secure = SecureAggregation(clip=2.0, max_weight=100).with_noise(
        DistributedNoise(1.0, seed=3), clip=1.5, on_round=seen.append
    )

    class Flaky(LogReg):
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            if ctx.client_id in (2, 5) and ctx.round == 2:
                raise RuntimeError("gone")
            return super().train(arrays, config, ctx)

    result = run_simulation(Flaky, FedAvg(), num_clients=8, rounds=2, seed=3, secure=secure)
    assert [r.ok for r in result.rounds] == [True, True]
    assert [(r.round, len(r.survivors)) for r in seen] == [(1, 8), (2, 6)]
    assert seen[1].survivors == frozenset({0, 1, 3, 4, 6, 7})
    assert seen[0].noise is not None and seen[0].noise.clip == 1.5
    assert math.isclose(seen[0].noise_std, 1.5)
    assert seen[1].noise_std < seen[0].noise_std
    assert _epsilon(seen[1].event()) > _epsilon(seen[0].event())
    assert secure.planned_noise(8, 6) == seen[0].noise  # LogReg: 6 parameters
    assert SecureAggregation().planned_noise(8, 6) is None
    plain: list[SecureRound] = []
    run_simulation(
        LogReg,
        FedAvg(),
        num_clients=4,
        rounds=1,
        secure=SecureAggregation(clip=2.0, max_weight=100, on_round=plain.append),
    )
    assert plain[0].noise is None and plain[0].noise_std == 0.0
    with pytest.raises(ConfigError):
        plain[0].event()


# -------------------------------------------------------------------- refusals


def test_impossible_settings_are_configuration_errors() -> None:
    for sigma in (0.0, -1.0, math.inf):
        with pytest.raises(ConfigError, match="noise_multiplier"):
            DistributedNoise(sigma)
    with pytest.raises(ConfigError, match="expected_clients"):
        DistributedNoise(1.0, expected_clients=0)
    # 8-bit ring: no scale leaves room for 50 clients plus noise tails
    with pytest.raises(ConfigError):
        SecAggConfig.create(
            range(50), 100, max_weight=1, clip=1.0, modulus_bits=8, noise=DistributedNoise(1.0)
        )
    # a coarse scale: rounding would inflate the sensitivity far beyond the clip
    with pytest.raises(ConfigError, match="too coarse"):
        calibrate(
            DistributedNoise(1.0),
            clip=1.0,
            dimension=10_000,
            clients=5,
            modulus_bits=32,
            scale_bits=2,
        )
    secure = SecureAggregation().with_noise(DistributedNoise(1.0, expected_clients=12), clip=1.0)
    with pytest.raises(ConfigError, match="expects 12"):
        secure.check(FedAvg(), 10)
    secure.check(FedAvg(), 12)
    with pytest.raises(ConfigError, match="survivors"):
        zcdp_parameters(
            calibrate(DistributedNoise(1.0), clip=1.0, dimension=9, clients=3, modulus_bits=32), 0
        )


def test_config_builder() -> None:
    privacy = PrivacySection(mode="distributed", noise_multiplier=0.9, clip=0.3, noise="seeded")
    secagg = SecAggSection(enabled=True)
    noise = distributed_noise(privacy, secagg, 10, seed=42)
    assert noise == DistributedNoise(0.9, expected_clients=10, seed=42)
    secure = SecureAggregation(clip=secagg.clip).with_noise(noise, clip=privacy.clip)
    assert secure.clip == 0.3 and secure.noise == noise
    secret = distributed_noise(privacy.model_copy(update={"noise": "secure"}), secagg, None)
    assert secret is not None and secret.seed is None and secret.expected_clients is None
    assert distributed_noise(PrivacySection(mode="central"), secagg, 10) is None
    with pytest.raises(ConfigError, match="secagg"):
        distributed_noise(privacy, SecAggSection(enabled=False), 10)
