"""Distributed DP under SecAgg+: each client adds its share of Skellam noise before masking.

**Mechanism** (the Skellam mechanism of Agarwal, Kairouz and Liu, NeurIPS 2021). In a
round with public parameters ``C`` (L2 clip, the secure-aggregation clip), ``s`` (scale
bits), ``d`` (coordinates) and per-client variance ``mu``, each client

1. clips its model change ``x`` to L2 norm ``C`` and scales it by ``2^s``: ``y = x min(1,
   C/|x|) 2^s``, so ``|y| <= c = C 2^s``;
2. rounds it to integers by *conditional randomized rounding* (Kairouz et al. 2021,
   "The distributed discrete Gaussian mechanism", §4): each coordinate rounds up with
   probability equal to its fractional part, and the whole vector is redrawn until
   ``|round(y)|_2 <= D2``. Because every output meets the bound, ``D2`` *is* the L2
   sensitivity, whatever the rounding did. ``D2 = min(sqrt(c^2 + d/4 + sqrt(2 ln(1/beta))
   (c + sqrt(d)/2)), c + sqrt(d))``: the second is deterministic (each coordinate moves by
   < 1); the first holds with probability >= 1 - beta by Hoeffding (``E|round(y)|^2 <=
   |y|^2 + d/4`` and ``round(y)_j^2`` ranges over ``2|y_j| + 1``), so a draw is accepted
   with probability >= 1 - beta (``beta = e^-1/2`` as in the paper). The integer vector
   then has L1 norm at most ``D1 = min(D2^2, sqrt(d) D2)``;
3. adds Skellam(``mu``) noise to every coordinate (``Poisson(mu/2) - Poisson(mu/2)``, from
   :mod:`fedlearn.privacy.skellam` on a CSPRNG by default), sets its weight to 1, and only
   then masks (:mod:`fedlearn.secagg.quantize`).

The coordinator unmasks the sum over the ``m`` survivors: their clipped changes plus
Skellam(``m mu``) *exactly*, because independent Skellams add up to a Skellam - the noise
is known for any set of survivors, which the discrete Gaussian does not offer (a sum of
discrete Gaussians is not one; its accounting carries an extra divergence term that
depends on how many survive). That closure is why fedlearn uses Skellam.

**Calibration.** The target is the central noise of DP-FedAvg: total standard deviation
``sigma C`` in model units when ``n_e`` (expected) clients survive, so ``mu = (sigma c)^2 /
n_e``. Fewer survivors leave less noise and a larger epsilon: the ledger uses the actual
``m`` (:func:`distributed_event`).

**Modulus.** The sum decodes right when no coordinate leaves ``[-2^(b-1), 2^(b-1))``. Each
client's integer coordinate is at most ``floor(D2)`` (an integer vector's entries are
bounded by its L2 norm), so the signal is at most ``n floor(D2)`` over the ``n`` selected
clients, deterministically; the noise ``Sk(m mu)``, ``m <= n``, exceeds ``T`` with
probability ``<= 2 exp(-T asinh(T/v) + v (sqrt(1 + (T/v)^2) - 1))`` (Chernoff, with the
Skellam moment generating function ``exp(v (cosh t - 1))``, ``v = n mu``). fedlearn
requires ``n floor(D2) + T < min(2^(b-1), 2^52)`` with ``T`` chosen so that some coordinate
wraps with probability below 2^-40 per round; the 2^52 keeps every value exact in float64.
The scale is the largest that passes, unless given, and a setting where none does (or
where rounding inflates the sensitivity by more than 10 %, or where a client's variance
would pass 2^50 and its Poisson draws leave float64's exact integers) is a
:class:`ConfigError`.

**Accounting.** For integer orders ``alpha > 1`` the Skellam mechanism with total
variance ``v`` and sensitivities ``D2``, ``D1`` is ``(alpha, eps(alpha))``-RDP with (their
Theorem 3.5)

    eps(alpha) <= alpha D2^2 / (2 v) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 v^2), 3 D1 / (2 v)).

Keeping the first branch of the minimum, ``eps(k) <= rho k + xi0`` with ``rho = D2^2 / (2v) +
D2^2 / (2 v^2)`` and ``xi0 = max(0, (6 D1 - D2^2) / (4 v^2))``. Renyi divergence does not
decrease with the order, so for a real order ``alpha`` in ``(k - 1, k]``, ``eps(alpha) <=
eps(k) <= rho (alpha + 1) + xi0``: the round is ``(xi, rho)``-zCDP with ``xi = xi0 + rho``,
a :class:`dp_accounting.ZCDpEvent` that dp-accounting's RDP accountant composes at every
order it uses (its default orders include fractional ones) - conservative, by about
``1/alpha`` of the cost at the order that ``eps(delta)`` picks (much more at large
epsilon, where that order is near 1). An accountant built with the integer orders
:data:`RDP_ORDERS` can take the tight event (``integer_orders=True``: ``xi = xi0``), whose
only slack against the Gaussian mechanism of the same variance is the rounding's ``D2 / c
- 1`` (below 1e-6 at the default scale) and the ``1/v`` terms (below 1e-12).
The event covers the round *as run*: no amplification by sampling is claimed, so it
must not be wrapped in a sampled event (dp-accounting's PLD accountant and its sampled
events take only Gaussian-type events; see the README). Add/remove neighbours (one
client's data in or out): ``D2``, ``D1``; replace-one: twice both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fedlearn.errors import ConfigError, SecAggError, SerializationError, UpdateRejected
from fedlearn.privacy.noise import NoiseSource, noise_source
from fedlearn.privacy.norms import sum_of_squares
from fedlearn.privacy.skellam import skellam

if TYPE_CHECKING:
    import dp_accounting

    from fedlearn.config.simulation import PrivacySection, SecAggSection

ROUNDING_BETA = math.exp(-0.5)
"""Probability bound of a rejected conditional rounding (the papers' choice)."""
WRAP_PROBABILITY = 2.0**-40
"""Bound on the probability that the noised sum wraps in some coordinate, per round."""
MAX_INFLATION = 1.1
"""Largest ``D2 / c`` (sensitivity growth from rounding) accepted at configuration."""
EXACT_LIMIT = 2**52
"""Every integer the protocol handles stays below this (exact in float64)."""
MAX_VARIANCE = 2.0**50
"""Largest per-client Skellam variance: its two Poisson draws (about ``mu / 2`` each) then
stay exact in float64 and within the samplers' range."""
MAX_ROUNDING_TRIES = 200
RDP_ORDERS: tuple[int, ...] = (*range(2, 129), 160, 192, 256, 384, 512, 768, 1024)
"""Integer RDP orders: with an accountant on these, ``integer_orders=True`` is exact."""
Neighbours = Literal["add_or_remove", "replace"]
SEED_TAG = 0x5E11A
"""Last component of a seeded client's noise key: distributed DP's own stream."""


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class DistributedNoise:
    """Run-level settings of distributed DP (public; sent to clients in every Setup).

    ``noise_multiplier`` (sigma): the survivors' total noise has standard deviation
    ``sigma * clip`` when ``expected_clients`` of them survive (``None``: as many as were
    selected for the round). ``seed``: ``None`` draws every client's noise from
    :func:`~fedlearn.privacy.noise.secure_noise`; an int draws it from
    ``seeded_noise(seed, round, client_id, SEED_TAG)`` - reproducible, for tests and
    replays only (the tag keeps it apart from other seeded noise of the same round),
    since whoever knows the seed can subtract the noise.
    """

    noise_multiplier: float
    expected_clients: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        sigma = self.noise_multiplier
        if not isinstance(sigma, int | float) or isinstance(sigma, bool):
            raise ConfigError(f"noise_multiplier must be a number, got {sigma!r}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"noise_multiplier must be positive and finite, got {sigma}")
        object.__setattr__(self, "noise_multiplier", float(sigma))
        n = self.expected_clients
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ConfigError(f"expected_clients must be a positive int, got {n!r}")
        seed = self.seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ConfigError(f"noise seed must be a non-negative int, got {seed!r}")

    def source(self, round: int, client_id: int) -> NoiseSource:
        """The client's noise source for ``round``."""
        if self.seed is None:
            return noise_source("secure")
        return noise_source("seeded", self.seed, round, client_id, SEED_TAG)

    def to_json(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.noise_multiplier,
            "expected_clients": self.expected_clients,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, raw: Any) -> DistributedNoise:
        keys = {"noise_multiplier", "expected_clients", "seed"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise SerializationError(f"distributed noise must have exactly the keys {sorted(keys)}")
        try:
            return cls(raw["noise_multiplier"], raw["expected_clients"], raw["seed"])
        except ConfigError as exc:
            raise SerializationError(f"invalid distributed noise: {exc}") from exc


# --------------------------------------------------------------------- calibration


def rounded_norm_bound(c: float, dimension: int, beta: float = ROUNDING_BETA) -> float:
    """``D2``: the L2 bound conditional rounding enforces on a vector of norm ``<= c``."""
    root_d = math.sqrt(dimension)
    hoeffding = c * c + dimension / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + root_d / 2)
    return min(math.sqrt(hoeffding), c + root_d)


def skellam_tail(variance: float, probability: float) -> float:
    """A ``T`` with ``P(|Sk(variance)| >= T) <= probability`` (Chernoff bound)."""
    if variance <= 0:
        return 0.0

    def log_bound(t: float) -> float:
        r = t / variance
        return math.log(2.0) - t * math.asinh(r) + variance * r * r / (math.sqrt(1 + r * r) + 1)

    target = math.log(probability)
    lo, hi = 0.0, math.sqrt(variance) + 1.0
    while log_bound(hi) > target:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if log_bound(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi


@dataclass(frozen=True)
class RoundNoise:
    """One round's calibration in quantized units (derived from its public config)."""

    settings: DistributedNoise
    clip: float
    scale_bits: int
    modulus_bits: int
    dimension: int
    clients: int
    """Clients selected for the round: the most that can survive."""

    @property
    def expected_clients(self) -> int:
        n = self.settings.expected_clients
        return self.clients if n is None else n

    @property
    def scaled_clip(self) -> float:
        """``c = C 2^s``: the clip in quantized units."""
        return self.clip * 2.0**self.scale_bits

    @property
    def variance(self) -> float:
        """``mu``: each client's Skellam variance per coordinate (quantized units)."""
        return (self.settings.noise_multiplier * self.scaled_clip) ** 2 / self.expected_clients

    @property
    def target_std(self) -> float:
        """``sigma C``: the total noise std in model units when ``expected_clients`` survive."""
        return self.settings.noise_multiplier * self.clip

    @cached_property
    def norm_bound(self) -> float:
        """``D2``: every client's integer vector has at most this L2 norm."""
        return rounded_norm_bound(self.scaled_clip, self.dimension)

    @property
    def l1_bound(self) -> float:
        """``D1 = min(D2^2, sqrt(d) D2)``."""
        d2 = self.norm_bound
        return min(d2 * d2, math.sqrt(self.dimension) * d2)

    def noise_std(self, survivors: int) -> float:
        """Standard deviation of the total noise in model units for ``survivors``."""
        return math.sqrt(survivors * self.variance) / 2.0**self.scale_bits

    def headroom(self) -> float:
        """``limit - (n floor(D2) + T)``: negative when the sum could wrap."""
        tail = skellam_tail(self.clients * self.variance, WRAP_PROBABILITY / self.dimension)
        signal = self.clients * math.floor(self.norm_bound)
        limit = min(2 ** (self.modulus_bits - 1), EXACT_LIMIT)
        return float(limit - (signal + tail) - 1)

    def check(self) -> None:
        """ConfigError unless the setting is usable (see the module docstring)."""
        inflation = self.norm_bound / self.scaled_clip
        if inflation > MAX_INFLATION:
            raise ConfigError(
                f"scale_bits {self.scale_bits} is too coarse for clip {self.clip} and "
                f"{self.dimension} coordinates: rounding inflates the sensitivity by "
                f"{100 * (inflation - 1):.0f} % (raise scale_bits or modulus_bits)"
            )
        if self.variance > MAX_VARIANCE:
            raise ConfigError(
                f"distributed DP: each client's noise variance {self.variance:.3g} at "
                f"scale_bits {self.scale_bits} exceeds 2^50 quantized units; lower scale_bits"
            )
        if self.headroom() < 0:
            raise ConfigError(
                f"distributed DP: {self.clients} clients' signal (each coordinate <= "
                f"{math.floor(self.norm_bound)}) plus Skellam noise tails (variance "
                f"{self.clients * self.variance:.3g}) do not fit a {self.modulus_bits}-bit "
                f"modulus at scale_bits {self.scale_bits}; lower scale_bits or raise "
                "modulus_bits"
            )


def calibrate(
    settings: DistributedNoise,
    *,
    clip: float,
    dimension: int,
    clients: int,
    modulus_bits: int,
    scale_bits: int | None = None,
) -> RoundNoise:
    """The round's calibration; the largest usable ``scale_bits`` when not given.

    Raises :class:`ConfigError` for a setting that cannot meet the target.
    """
    if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
        raise ConfigError(f"clip must be a positive finite number, got {clip!r}")
    if dimension < 1 or clients < 1:
        raise ConfigError("distributed DP needs at least one coordinate and one client")
    return _calibrated(settings, float(clip), dimension, clients, modulus_bits, scale_bits)


@lru_cache(maxsize=256)
def _calibrated(
    settings: DistributedNoise,
    clip: float,
    dimension: int,
    clients: int,
    modulus_bits: int,
    scale_bits: int | None,
) -> RoundNoise:
    """:func:`calibrate` once per distinct round setting (every client of a round, and
    every round with the same selection, builds the same config)."""
    if scale_bits is not None:
        noise = RoundNoise(settings, float(clip), scale_bits, modulus_bits, dimension, clients)
        noise.check()
        return noise
    best: RoundNoise | None = None
    for s in range(0, 53):
        candidate = RoundNoise(settings, float(clip), s, modulus_bits, dimension, clients)
        if candidate.headroom() < 0 or candidate.variance > MAX_VARIANCE:
            break
        best = candidate
    if best is None:
        best = RoundNoise(settings, float(clip), 0, modulus_bits, dimension, clients)
    best.check()
    return best


# ---------------------------------------------------------------------- accounting


def zcdp_parameters(
    noise: RoundNoise,
    survivors: int,
    neighbours: Neighbours = "add_or_remove",
    *,
    integer_orders: bool = False,
) -> tuple[float, float]:
    """``(rho, xi)`` of the round with ``survivors`` noise shares in the sum; with
    ``integer_orders`` valid only at integer orders (see the module docstring)."""
    if not isinstance(survivors, int) or survivors < 1:
        raise ConfigError(f"survivors must be a positive int, got {survivors!r}")
    if neighbours not in ("add_or_remove", "replace"):
        raise ConfigError(f"neighbours must be 'add_or_remove' or 'replace', got {neighbours!r}")
    factor = 2.0 if neighbours == "replace" else 1.0
    d2, d1 = factor * noise.norm_bound, factor * noise.l1_bound
    v = survivors * noise.variance
    rho = d2 * d2 / (2.0 * v) + d2 * d2 / (2.0 * v * v)
    xi0 = max(0.0, (6.0 * d1 - d2 * d2) / (4.0 * v * v))
    return rho, xi0 if integer_orders else xi0 + rho


def skellam_rdp(
    noise: RoundNoise, survivors: int, order: int, neighbours: Neighbours = "add_or_remove"
) -> float:
    """The paper's RDP bound at an integer ``order > 1`` (for tests and reports)."""
    factor = 2.0 if neighbours == "replace" else 1.0
    d2, d1 = factor * noise.norm_bound, factor * noise.l1_bound
    v = survivors * noise.variance
    a = float(order)
    return a * d2 * d2 / (2 * v) + min(
        ((2 * a - 1) * d2 * d2 + 6 * d1) / (4 * v * v), 3 * d1 / (2 * v)
    )


def distributed_event(
    noise: RoundNoise,
    survivors: int,
    neighbours: Neighbours = "add_or_remove",
    *,
    integer_orders: bool = False,
) -> dp_accounting.DpEvent:
    """The round's :class:`dp_accounting.ZCDpEvent` given the actual ``survivors``.

    Compose it as is (no sampling wrapper) with dp-accounting's RDP accountant; pass
    ``integer_orders=True`` only when that accountant uses integer orders (e.g.
    ``RdpAccountant(list(RDP_ORDERS))``). See the module docstring for the bound.
    """
    from fedlearn.config.extras import require_extra

    require_extra("privacy", "distributed DP accounting")
    import dp_accounting

    rho, xi = zcdp_parameters(noise, survivors, neighbours, integer_orders=integer_orders)
    return dp_accounting.ZCDpEvent(rho=rho, xi=xi)


# -------------------------------------------------------------------- client side


def randomized_round(y: np.ndarray, bound: float, source: NoiseSource) -> np.ndarray:
    """Conditional randomized rounding of ``y`` (float64) to ``int64`` with L2 norm ``<=
    bound``: redraw until the bound holds (SecAggError after many failures)."""
    base = np.floor(y)
    frac = y - base
    # float64 sums of squares err by < d * 2^-53 relative; compare with a margin below
    limit = bound * bound * (1.0 - 2.0**-30)
    for _ in range(MAX_ROUNDING_TRIES):
        up = source.uniform(y.size) < frac
        out = base + up
        if sum_of_squares(out) <= limit:
            rounded: np.ndarray = out.astype(np.int64)
            return rounded
    raise SecAggError("conditional rounding failed repeatedly; the clip is not respected")


def noised_integers(vector: np.ndarray, noise: RoundNoise, source: NoiseSource) -> np.ndarray:
    """A client's contribution before masking: clip to L2 norm ``C``, scale, round
    conditionally, add Skellam(``mu``) noise; ``int64`` of ``len(vector)``."""
    x = np.asarray(vector, dtype=np.float64)
    if x.ndim != 1 or x.size != noise.dimension:
        raise UpdateRejected(f"update has {x.size} values, the round expects {noise.dimension}")
    norm = math.sqrt(sum_of_squares(x))
    if not math.isfinite(norm):
        raise UpdateRejected("update contains NaN or infinite values")
    factor = 2.0**noise.scale_bits
    if norm > noise.clip:
        factor *= noise.clip / norm
    rounded = randomized_round(x * factor, noise.norm_bound, source)
    rounded += skellam(source, noise.variance, x.size)
    return rounded


# ------------------------------------------------------------------------- config


def distributed_noise(
    privacy: PrivacySection, secagg: SecAggSection, num_clients: int | None = None, seed: int = 0
) -> DistributedNoise | None:
    """The ``DistributedNoise`` of ``[privacy] mode = "distributed"`` (None otherwise).

    ``num_clients``: the clients selected per round (the expected survivors; None: each
    round's selection). ``seed``: the run seed, used when ``privacy.noise = "seeded"``.
    The L2 clip is ``privacy.clip``: give it to :class:`SecureAggregation` as its ``clip``
    (see :func:`fedlearn.secagg.stages.SecureAggregation.with_noise`).
    """
    if privacy.mode != "distributed":
        return None
    if not secagg.enabled:
        raise ConfigError("privacy.mode = 'distributed' needs [secagg] enabled = true")
    return DistributedNoise(
        noise_multiplier=privacy.noise_multiplier,
        expected_clients=num_clients,
        seed=seed if privacy.noise == "seeded" else None,
    )


__all__ = [
    "RDP_ORDERS",
    "DistributedNoise",
    "RoundNoise",
    "calibrate",
    "distributed_event",
    "distributed_noise",
    "noised_integers",
    "randomized_round",
    "rounded_norm_bound",
    "skellam_rdp",
    "skellam_tail",
    "zcdp_parameters",
]
