"""Central DP (DP-FedAvg) on the coordinator: clipping, noise, adaptive clipping, sampling.

Acceptance 2 (central part): the noise added to the aggregate has standard deviation
σ·C within 2 % over 10^6 coordinates (secure and seeded sources), every update's
contribution is clipped to C (hypothesis), and adaptive clipping tracks the target
quantile of a synthetic norm distribution. The rest checks hand-computed rounds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedlearn.engine.records import Arrays
from fedlearn.errors import ConfigError
from fedlearn.privacy.central import (
    CLIP_STATE,
    UNCLIPPED,
    CentralPrivacy,
    adaptive_noise_multiplier,
    next_clip,
)
from fedlearn.strategy import FedAdam, FedAvg, Krum, QFedAvg
from fedlearn.strategy.base import ClientUpdate, RoundContext


class ZeroNoise:
    """A noise source without noise: what is left of a round is its clipped mean."""

    secure = False

    def bits(self, size: int) -> np.ndarray:
        return np.zeros(size, np.uint64)

    def uniform(self, size: int) -> np.ndarray:
        return np.full(size, 0.5)

    def normal(self, size: int, std: float = 1.0) -> np.ndarray:
        return np.zeros(size)


def _ctx(rnd: int = 1, state: Arrays | None = None) -> RoundContext:
    return RoundContext(rnd, 100, np.random.default_rng(rnd), state or {})


def _central(**settings: object) -> CentralPrivacy:
    values: dict[str, object] = {
        "inner": FedAvg(),
        "noise_multiplier": 1.0,
        "clip": 1.0,
        "expected_clients": 1.0,
        "noise": "seeded",
        "seed": 7,
    }
    values.update(settings)
    return CentralPrivacy(**values)  # type: ignore[arg-type]


def _noiseless(strategy: CentralPrivacy, ctx: RoundContext, global_arrays: Arrays):  # type: ignore[no-untyped-def]
    fold = strategy.start_fold(ctx, global_arrays)
    fold._noise = ZeroNoise()  # type: ignore[attr-defined]
    return fold


@pytest.mark.parametrize("noise", ["secure", "seeded"])
def test_noise_on_the_aggregate_has_std_sigma_times_clip(noise: str) -> None:
    sigma, clip, m, n = 1.3, 0.7, 4.0, 1_000_000
    strategy = _central(noise_multiplier=sigma, clip=clip, expected_clients=m, noise=noise)
    zeros = {"w": np.zeros(n, np.float64)}
    fold = strategy.start_fold(_ctx(), zeros)
    fold.add(ClientUpdate(0, {"w": np.zeros(n)}, 10))  # no change: the result is noise / m
    noise_of_sum = fold.result()["w"] * m
    std = float(noise_of_sum.std())
    assert abs(std / (sigma * clip) - 1.0) < 0.02
    assert abs(float(noise_of_sum.mean())) < 5 * sigma * clip / math.sqrt(n)


def test_seeded_noise_repeats_per_round_and_secure_noise_never_does() -> None:
    g = {"w": np.zeros(1000)}

    def noise_of(strategy: CentralPrivacy, rnd: int) -> bytes:
        fold = strategy.start_fold(_ctx(rnd), g)
        fold.add(ClientUpdate(0, {"w": np.zeros(1000)}, 1))
        return fold.result()["w"].tobytes()

    seeded = _central()
    assert noise_of(seeded, 1) == noise_of(_central(), 1)
    assert noise_of(seeded, 1) != noise_of(seeded, 2)
    assert noise_of(_central(seed=8), 1) != noise_of(seeded, 1)
    secure = _central(noise="secure")
    assert noise_of(secure, 1) != noise_of(secure, 1)


@given(
    st.lists(
        arrays(np.float64, st.integers(1, 20), elements=st.floats(-1e6, 1e6)),
        min_size=1,
        max_size=4,
    ),
    st.floats(1e-3, 1e3),
)
def test_every_update_is_clipped_to_c(parts: list[np.ndarray], clip: float) -> None:
    global_arrays = {f"a{i}": np.zeros_like(p) for i, p in enumerate(parts)}
    update = {f"a{i}": p for i, p in enumerate(parts)}
    norm = math.sqrt(sum(float(np.sum(p * p)) for p in parts))
    # one client, m = 1, no noise: the model moves by the clipped change, at most C
    strategy = _central(clip=clip)
    fold = _noiseless(strategy, _ctx(), global_arrays)
    fold.add(ClientUpdate(0, update, 1))
    moved = fold.result()
    assert math.sqrt(sum(float(np.sum(v * v)) for v in moved.values())) <= clip * (1 + 1e-9)
    assert fold.norms == [pytest.approx(norm, rel=1e-12)]
    if norm <= clip:  # a short update passes unchanged (0 + -0.0 is 0.0: compare values)
        for name, p in update.items():
            assert moved[name].dtype == p.dtype
            assert np.array_equal(moved[name], p)


def test_a_round_by_hand_uniform_weights_and_the_expected_divisor() -> None:
    strategy = _central(clip=1.0, expected_clients=2.0)
    g = {"w": np.array([1.0, 1.0]), "steps": np.array([5], np.int64)}
    fold = _noiseless(strategy, _ctx(), g)
    # norm 5: scaled to [0.6, 0.8]; norm 0.5: unchanged; 1000 examples buy no weight
    fold.add(ClientUpdate(0, {"w": np.array([4.0, 5.0]), "steps": np.array([9])}, 1000))
    fold.add(ClientUpdate(1, {"w": np.array([1.3, 1.4]), "steps": np.array([7])}, 1))
    result = fold.result()
    np.testing.assert_allclose(result["w"], [1.0 + 0.9 / 2, 1.0 + 1.2 / 2], rtol=0, atol=1e-15)
    assert result["steps"].tolist() == [5]  # integer arrays are not released
    new, state = strategy.server_update(_ctx(), g, result, {})
    assert new["w"].tobytes() == result["w"].tobytes() and state == {}


def test_adaptive_noise_multiplier_by_hand_and_its_limit() -> None:
    # sigma = 1, sigma_b = 1: (1 - 1/4)^(-1/2)
    assert adaptive_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75), abs=1e-15)
    assert _central(adaptive_clip=True, expected_clients=20.0).update_noise_multiplier == (
        pytest.approx(1 / math.sqrt(0.75))
    )  # default sigma_b = m / 20 = 1
    with pytest.raises(ConfigError, match=r"clipped_count_stddev > 0\.5"):
        _central(adaptive_clip=True, clipped_count_stddev=0.5)


def test_adaptive_clip_moves_geometrically_and_lives_in_the_state() -> None:
    strategy = _central(
        inner=FedAdam(),
        adaptive_clip=True,
        clip=2.0,
        expected_clients=4.0,
        clip_learning_rate=0.2,
        clipped_count_stddev=1.0,
    )
    g = {"w": np.zeros(3, np.float32)}
    state = strategy.init_state(g)
    assert float(state[CLIP_STATE]) == 2.0 and "m/w" in state and "v/w" in state
    ctx = _ctx(1, state)
    fold = _noiseless(strategy, ctx, g)
    for i, norm in enumerate([0.5, 1.0, 1.5, 3.0]):  # three of four unclipped
        fold.add(ClientUpdate(i, {"w": np.array([norm, 0, 0], np.float32)}, 1))
    result = fold.result()
    assert float(result[UNCLIPPED]) == 0.75  # (3 - 2 + 0) / 4 + 1/2
    arrays, new_state = strategy.server_update(ctx, g, result, state)
    assert list(arrays) == ["w"]
    assert float(new_state[CLIP_STATE]) == pytest.approx(2.0 * math.exp(-0.2 * 0.25), abs=1e-15)
    assert "step" in new_state  # FedAdam's own state went through
    summary = strategy.summarize_train(ctx, [])
    assert summary["dp.clip"] == 2.0  # the clip this round used


@pytest.mark.parametrize("target", [0.5, 0.8])
def test_adaptive_clipping_tracks_the_target_quantile(target: float) -> None:
    rng = np.random.default_rng(3)
    m = 100
    strategy = _central(
        adaptive_clip=True, clip=0.1, expected_clients=float(m), target_quantile=target
    )
    g = {"w": np.zeros(2)}
    state = strategy.init_state(g)
    clips = []
    for rnd in range(1, 151):
        ctx = _ctx(rnd, state)
        fold = strategy.start_fold(ctx, g)
        norms = rng.lognormal(0.0, 0.5, m)  # the synthetic norm distribution
        angles = rng.uniform(0, 2 * np.pi, m)
        for i in range(m):
            d = norms[i] * np.array([np.cos(angles[i]), np.sin(angles[i])])
            fold.add(ClientUpdate(i, {"w": d}, 1))
        _, state = strategy.server_update(ctx, g, fold.result(), state)
        clips.append(float(state[CLIP_STATE]))
    late = float(np.mean(clips[-50:]))
    # the target quantile of lognormal(0, 0.5): exp(0.5 * z_target)
    z = {0.5: 0.0, 0.8: 0.8416212335729143}[target]
    assert late == pytest.approx(math.exp(0.5 * z), rel=0.06)
    fraction_unclipped = 0.5 * (1 + math.erf(math.log(late) / (0.5 * math.sqrt(2))))
    assert abs(fraction_unclipped - target) < 0.04


def test_poisson_sampling_takes_each_client_with_probability_q() -> None:
    strategy = _central(inner=FedAvg(fraction_train=0.3), sampling="poisson")
    clients = list(range(2000))
    chosen = strategy.select_train(_ctx(1), clients)
    assert abs(len(chosen) / 2000 - 0.3) < 0.04
    assert chosen == sorted(set(chosen)) and chosen == strategy.select_train(_ctx(1), clients)
    assert chosen != strategy.select_train(_ctx(2), clients)
    fixed = _central(inner=FedAvg(fraction_train=0.3))
    picked = fixed.select_train(_ctx(1), clients)
    assert len(picked) == 600 and len(set(picked)) == 600


def test_holistic_and_own_fold_strategies_are_refused() -> None:
    with pytest.raises(ConfigError, match="linear weighted-mean strategy"):
        _central(inner=Krum(num_malicious=1))
    with pytest.raises(ConfigError, match="QFedAvg aggregates differently"):
        _central(inner=QFedAvg(client_learning_rate=0.1))
    assert next_clip(1.0, 0.5, 0.5, 0.2) == 1.0


@pytest.mark.parametrize(("sigma", "count_stddev"), [(1.0, 1.0), (0.7, 5.0), (2.0, 1.5)])
def test_adaptive_clipping_costs_what_one_gaussian_with_sigma_costs(
    sigma: float, count_stddev: float
) -> None:
    from dp_accounting import dp_event
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

    update = adaptive_noise_multiplier(sigma, count_stddev)
    # the unclipped count has sensitivity 1/2 (b - 1/2): noise multiplier 2 sigma_b
    both = dp_event.ComposedDpEvent(
        [dp_event.GaussianDpEvent(update), dp_event.GaussianDpEvent(2 * count_stddev)]
    )
    for delta in (1e-5, 1e-3):
        joint = RdpAccountant().compose(both, 10).get_epsilon(delta)
        single = RdpAccountant().compose(dp_event.GaussianDpEvent(sigma), 10).get_epsilon(delta)
        assert joint == pytest.approx(single, rel=1e-9)
