"""Choosing σ for a target ε: the calibrated σ spends the target, no more, and scales as
Gaussian composition says it must."""

from __future__ import annotations

import pytest

pytest.importorskip("dp_accounting")

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedlearn.errors import ConfigError
from fedlearn.privacy.calibrate import (
    central_noise_multiplier,
    local_noise_multiplier,
    noise_multiplier_for,
)

DELTA = 1e-5


def rdp_epsilon(event: dp_event.DpEvent, rounds: int) -> float:
    return float(RdpAccountant().compose(event, rounds).get_epsilon(DELTA))


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_central_sigma_spends_the_target_and_no_more(epsilon: float) -> None:
    sigma = central_noise_multiplier(epsilon, DELTA, rounds=20)
    spent = rdp_epsilon(dp_event.GaussianDpEvent(sigma), 20)
    assert spent <= epsilon
    # a hair less noise would overspend: the search returned the smallest such sigma
    assert rdp_epsilon(dp_event.GaussianDpEvent(sigma * (1 - 1e-3)), 20) > epsilon


def test_gaussian_composition_scales_sigma_with_the_root_of_the_rounds() -> None:
    # RDP of a Gaussian is a/(2 sigma^2): R rounds at sigma equal one round at sigma/sqrt(R)
    one = central_noise_multiplier(3.0, DELTA, rounds=1)
    assert central_noise_multiplier(3.0, DELTA, rounds=4) == pytest.approx(2 * one, rel=1e-5)


def test_local_sigma_is_twice_central_at_full_participation() -> None:
    # local DP: sensitivity 2C, GaussianDpEvent(sigma / 2)
    central = central_noise_multiplier(8.0, DELTA, rounds=10)
    assert local_noise_multiplier(8.0, DELTA, rounds=10) == pytest.approx(2 * central, rel=1e-5)


def test_sampling_amplifies_privacy() -> None:
    full = central_noise_multiplier(8.0, DELTA, rounds=30)
    sampled = central_noise_multiplier(8.0, DELTA, rounds=30, rate=0.2)
    assert sampled < full
    event = dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(sampled))
    assert rdp_epsilon(event, 30) <= 8.0


def test_fixed_size_sampling_is_replace_one() -> None:
    sigma = central_noise_multiplier(
        8.0, DELTA, rounds=20, sampling="fixed", population=100, sample_size=20
    )
    event = dp_event.SampledWithoutReplacementDpEvent(100, 20, dp_event.GaussianDpEvent(sigma / 2))
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    assert accountant.compose(event, 20).get_epsilon(DELTA) <= 8.0
    with pytest.raises(ConfigError, match="RDP only"):
        central_noise_multiplier(
            8.0,
            DELTA,
            rounds=20,
            sampling="fixed",
            population=100,
            sample_size=20,
            accountant="pld",
        )


def test_unreachable_or_bad_targets_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="above"):
        noise_multiplier_for(1e-6, DELTA, 10**6, dp_event.GaussianDpEvent)
    with pytest.raises(ConfigError):
        central_noise_multiplier(0.0, DELTA, rounds=5)
    with pytest.raises(ConfigError):
        central_noise_multiplier(1.0, DELTA, rounds=0)
    with pytest.raises(ConfigError):
        central_noise_multiplier(1.0, DELTA, rounds=5, rate=1.5)
