"""How to choose σ: the smallest noise multiplier that keeps a whole run within ε at δ.

A run's ε grows with the number of rounds and the fraction of clients sampled per round,
and falls as the noise multiplier σ grows. Given the target ε at δ and the run's shape,
these helpers search σ with dp-accounting's own calibration (Brent's method on
``ε(σ) - target``; the σ returned never gives more than the target ε), composing exactly
the events the run's ledger composes, so a run with the returned σ reports ε at (just
below) the target:

* :func:`central_noise_multiplier`: central DP, one Gaussian sum per round with noise
  ``σ·C``; ``sampling="poisson"`` takes each client with probability ``rate``
  (add-or-remove-one, ``PoissonSampledDpEvent(rate, GaussianDpEvent(σ))``; ``rate=1`` is
  every client every round, no amplification); ``"fixed"`` takes ``sample_size`` of
  ``population`` (replace-one, sensitivity 2C: ``GaussianDpEvent(σ/2)``, RDP only).
  Distributed DP adds the same total noise ``σ·C`` to the sum, so its σ starts here too
  (its discrete noise is then accounted as what it is).
* :func:`local_noise_multiplier`: local DP, each client's update clipped to C and noised
  with ``σ·C`` on the client, every round it takes part: ``GaussianDpEvent(σ/2)`` per
  round (any two of its datasets move the clipped update by up to 2C); no amplification,
  because the client knows that it was picked.
* :func:`noise_multiplier_for`: any per-round event ``σ ↦ DpEvent``.

Example: 100 clients, all of them in each of 20 rounds, ε = 8 at δ = 1e-5::

    sigma = central_noise_multiplier(8.0, 1e-5, rounds=20)      # about 2.85
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import dp_accounting
from dp_accounting import NeighboringRelation as Relation
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedlearn.errors import ConfigError

AccountantKind = Literal["rdp", "pld"]

#: The search bracket for σ; ε(σ) is decreasing, a target outside it is a ConfigError.
SIGMA_RANGE = (1e-3, 1e4)


def noise_multiplier_for(
    epsilon: float,
    delta: float,
    rounds: int,
    round_event: Callable[[float], dp_event.DpEvent],
    *,
    accountant: AccountantKind = "rdp",
    relation: Relation = Relation.ADD_OR_REMOVE_ONE,
    tol: float = 1e-6,
    bracket: tuple[float, float] = SIGMA_RANGE,
) -> float:
    """The smallest σ (within ``tol``) whose ``round_event(σ)``, composed ``rounds`` times,
    spends at most ``epsilon`` at ``delta``, searched within ``bracket``."""
    if not (epsilon > 0 and 0 < delta < 1):
        raise ConfigError(f"need epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")

    def fresh() -> dp_accounting.PrivacyAccountant:
        if accountant == "rdp":
            return RdpAccountant(neighboring_relation=relation)
        if accountant == "pld":
            return PLDAccountant(neighboring_relation=relation)
        raise ConfigError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")

    def run_event(sigma: float) -> dp_event.DpEvent:
        return dp_event.SelfComposedDpEvent(round_event(sigma), rounds)

    low, high = bracket
    for sigma, side in ((high, "largest"), (low, "smallest")):
        reached = fresh().compose(run_event(sigma)).get_epsilon(delta)
        if side == "largest" and reached > epsilon:
            raise ConfigError(
                f"epsilon={epsilon:g} at delta={delta:g} needs a noise multiplier above "
                f"{high:g} for {rounds} rounds: raise epsilon or lower the rounds"
            )
        if side == "smallest" and reached <= epsilon:
            return low
    sigma = dp_accounting.calibrate_dp_mechanism(
        fresh,
        run_event,
        epsilon,
        delta,
        dp_accounting.ExplicitBracketInterval(low, high),
        tol=tol,
    )
    return float(sigma)


def central_noise_multiplier(
    epsilon: float,
    delta: float,
    rounds: int,
    *,
    sampling: Literal["poisson", "fixed"] = "poisson",
    rate: float = 1.0,
    population: int = 1,
    sample_size: int = 1,
    accountant: AccountantKind = "rdp",
) -> float:
    """σ for central (or distributed) DP over ``rounds`` rounds (see the module docstring)."""
    if sampling == "poisson":
        if not 0 < rate <= 1:
            raise ConfigError(f"rate must be in (0, 1], got {rate}")
        return noise_multiplier_for(
            epsilon,
            delta,
            rounds,
            lambda s: dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(s)),
            accountant=accountant,
        )
    if accountant != "rdp":
        raise ConfigError("fixed-size sampling is accounted with RDP only (accountant='rdp')")
    if not 1 <= sample_size <= population:
        raise ConfigError(f"need 1 <= sample_size <= population, got {sample_size}, {population}")
    return noise_multiplier_for(
        epsilon,
        delta,
        rounds,
        lambda s: dp_event.SampledWithoutReplacementDpEvent(
            population, sample_size, dp_event.GaussianDpEvent(s / 2)
        ),
        accountant=accountant,
        relation=Relation.REPLACE_ONE,
    )


def local_noise_multiplier(
    epsilon: float, delta: float, rounds: int, *, accountant: AccountantKind = "rdp"
) -> float:
    """σ for local DP when a client takes part in ``rounds`` rounds."""
    return noise_multiplier_for(
        epsilon,
        delta,
        rounds,
        lambda s: dp_event.GaussianDpEvent(s / 2),
        accountant=accountant,
    )


__all__ = [
    "central_noise_multiplier",
    "local_noise_multiplier",
    "noise_multiplier_for",
]
