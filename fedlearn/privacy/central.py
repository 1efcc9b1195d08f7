"""Central DP: DP-FedAvg (McMahan et al., 2018) around any linear strategy.

Each round, on the coordinator:

1. each accepted client's change to the global model, ``Δ_i = x_i - x`` (floating arrays,
   all of them as one vector), is clipped to L2 norm ``C``: ``Δ_i · min(1, C/‖Δ_i‖)``;
2. the clipped changes are summed with equal weights (not ``num_examples``: a client's
   influence must not depend on what it claims) and Gaussian noise ``N(0, (σ_Δ·C)²)`` is
   added to every coordinate of the sum, from :mod:`fedlearn.privacy.noise`;
3. the noised sum is divided by the *expected* number of clients (a constant, so the
   divisor reveals nothing) and the wrapped strategy's server update runs on
   ``x + mean`` as if it were the usual weighted mean.

Integer arrays (counters) keep the global model's value: they are not released.

**Adaptive clipping** (Andrew et al., 2021): each client also contributes whether its
update was unclipped, ``b_i = 1[‖Δ_i‖ ≤ C]``; the coordinator releases the noised
fraction ``b̃ = clip((Σ(b_i - ½) + N(0, σ_b²)) / m + ½, 0, 1)`` and moves ``C`` geometrically
toward the ``target_quantile`` γ: ``C ← C · exp(-η (b̃ - γ))``. The two releases together
cost what one Gaussian release with noise multiplier σ costs, because the update noise
uses ``σ_Δ = (σ⁻² - (2σ_b)⁻²)^(-1/2)`` (``σ_b`` = ``clipped_count_stddev``, default
``m / 20``). ``C`` lives in the strategy state (``privacy/clip``), so a resumed run
continues from the clip the interrupted one reached.

**Client sampling** draws from the same noise source as the noise (a secret sample is what
amplification by sampling assumes): ``fixed`` picks ``m`` of the ``n`` clients uniformly
without replacement, ``poisson`` takes each client independently with
``q = fraction_train``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedlearn.engine.records import Arrays, Metrics
from fedlearn.errors import ConfigError
from fedlearn.privacy.noise import NoiseSource, noise_source
from fedlearn.privacy.norms import sum_of_squares
from fedlearn.privacy.strategy import PrivacyWrapper
from fedlearn.strategy.base import ClientUpdate, Fold, RoundContext, Strategy

STATE_PREFIX = "privacy/"
CLIP_STATE = "privacy/clip"
"""The strategy-state entry holding the current clip (adaptive clipping)."""
UNCLIPPED = "privacy/unclipped_fraction"
"""The fold's result entry carrying the noised unclipped fraction to the server update."""

#: Seeded noise keys are ``(seed, round, SERVER, purpose)``: never a client's key.
SERVER = 1 << 32
SAMPLING = 1
AGGREGATE = 2


def adaptive_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier ``σ_Δ`` that keeps the round's cost at σ's.

    ConfigError unless ``2 σ_b > σ`` (otherwise no update noise could be small enough).
    """
    if 2.0 * count_stddev <= noise_multiplier:
        raise ConfigError(
            f"privacy: adaptive clipping with noise_multiplier={noise_multiplier:g} needs "
            f"clipped_count_stddev > {noise_multiplier / 2:g} (got {count_stddev:g}); raise "
            "it or the number of clients per round"
        )
    return float((noise_multiplier**-2 - (2.0 * count_stddev) ** -2) ** -0.5)


def next_clip(clip: float, unclipped_fraction: float, target: float, rate: float) -> float:
    """The geometric update ``C · exp(-η (b̃ - γ))``."""
    return float(clip * math.exp(-rate * (unclipped_fraction - target)))


class CentralFold:
    """Sum of clipped changes; the result adds the noise and divides by ``divisor``.

    The floating arrays are laid end to end as one float64 vector: the global model is
    converted once per round, and each update costs one pass to take its change, one for
    its norm and one to add it (plus one to scale it when it is clipped).
    """

    def __init__(
        self,
        global_arrays: Arrays,
        *,
        clip: float,
        noise_std: float,
        divisor: float,
        noise: NoiseSource,
        count_stddev: float | None = None,
    ) -> None:
        self._global = global_arrays
        self.clip = clip
        self.noise_std = noise_std
        self.divisor = divisor
        self.count_stddev = count_stddev
        self._noise = noise
        self._layout: list[tuple[str, int, int]] = []
        offset = 0
        for name, x in global_arrays.items():
            if np.issubdtype(x.dtype, np.floating):
                self._layout.append((name, offset, offset + x.size))
                offset += x.size
        self._flat = np.empty(offset, np.float64)
        for name, start, stop in self._layout:
            self._flat[start:stop] = np.ravel(global_arrays[name])
        self._sum = np.zeros(offset, np.float64)
        self._delta = np.empty(offset, np.float64)
        self._squares = np.empty(offset, np.float64)
        self.count = 0
        self.unclipped = 0
        self.norms: list[float] = []

    def add(self, update: ClientUpdate) -> None:
        """Clip ``update``'s change to the global model and add it to the sum."""
        delta, flat = self._delta, self._flat
        for name, start, stop in self._layout:
            np.subtract(np.ravel(update.arrays[name]), flat[start:stop], out=delta[start:stop])
        norm = math.sqrt(sum_of_squares(delta, self._squares))
        if norm > self.clip:
            delta *= self.clip / norm
        self._sum += delta
        self.count += 1
        self.unclipped += norm <= self.clip
        self.norms.append(norm)

    def result(self) -> Arrays:
        """``global + (sum + noise) / divisor`` per floating array (others unchanged), and
        with adaptive clipping the noised unclipped fraction under :data:`UNCLIPPED`."""
        noised = self._sum + self._noise.normal(self._sum.size, self.noise_std)
        noised /= self.divisor
        noised += self._flat
        out: Arrays = {name: np.array(x) for name, x in self._global.items()}
        for name, start, stop in self._layout:
            x = self._global[name]
            out[name] = noised[start:stop].reshape(x.shape).astype(x.dtype)
        if self.count_stddev is not None:
            centred = self.unclipped - 0.5 * self.count
            noisy = centred + float(self._noise.normal(1, self.count_stddev)[0])
            fraction = min(max(noisy / self.divisor + 0.5, 0.0), 1.0)
            out[UNCLIPPED] = np.asarray(fraction, np.float64)
        return out


@dataclass(frozen=True, kw_only=True)
class CentralPrivacy(PrivacyWrapper):
    """DP-FedAvg around ``inner`` (see the module docstring).

    ``expected_clients`` is ``m``, the expected number of clients per round (fixed
    sampling: the number selected; Poisson: ``q · n``); ``seed`` keys seeded noise.
    """

    noise_multiplier: float
    clip: float
    expected_clients: float
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    sampling: Literal["fixed", "poisson"] = "fixed"
    noise: Literal["secure", "seeded"] = "secure"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        inner = self.inner
        if not inner.linear or type(inner).start_fold is not Strategy.start_fold:
            raise ConfigError(
                f"privacy.mode = 'central' replaces the weighted mean with a clipped, noised "
                f"mean, so it needs a linear weighted-mean strategy (FedAvg, FedProx, "
                f"FedAvgM, FedAdam, FedYogi, FedAdagrad); {type(inner).__name__} aggregates "
                "differently (use mode = 'local' with robust aggregators)"
            )
        for name in ("noise_multiplier", "clip", "expected_clients", "clip_learning_rate"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"privacy: {name} must be > 0, got {value}")
        if self.adaptive_clip:
            adaptive_noise_multiplier(self.noise_multiplier, self.count_stddev)

    @property
    def count_stddev(self) -> float:
        """``σ_b``: ``clipped_count_stddev``, else ``m / 20``."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return self.expected_clients / 20.0

    @property
    def update_noise_multiplier(self) -> float:
        """``σ_Δ``: σ itself, or the smaller one adaptive clipping leaves for the update."""
        if not self.adaptive_clip:
            return self.noise_multiplier
        return adaptive_noise_multiplier(self.noise_multiplier, self.count_stddev)

    def current_clip(self, state: Arrays) -> float:
        """The clip this round uses: the state's (adaptive) or the fixed ``clip``."""
        value = state.get(CLIP_STATE) if self.adaptive_clip else None
        return self.clip if value is None else float(value)

    def _source(self, ctx: RoundContext, purpose: int) -> NoiseSource:
        return noise_source(self.noise, self.seed, ctx.round, SERVER, purpose)

    def select_train(self, ctx: RoundContext, clients: Sequence[int]) -> list[int]:
        """A secret sample: Poisson with ``q = fraction_train``, or ``m`` of ``n`` uniformly."""
        n = len(clients)
        if n == 0:
            return []
        u = self._source(ctx, SAMPLING).uniform(n)
        if self.sampling == "poisson":
            return sorted(c for c, ui in zip(clients, u, strict=True) if ui < self.fraction_train)
        k = self.train_clients_per_round(n)
        if k >= n:
            return sorted(clients)
        return sorted(clients[int(i)] for i in np.argsort(u, kind="stable")[:k])

    def init_state(self, global_arrays: Arrays) -> Arrays:
        """``inner``'s state, plus the clip when it adapts."""
        state = dict(self.inner.init_state(global_arrays))
        if self.adaptive_clip:
            state[CLIP_STATE] = np.asarray(self.clip, np.float64)
        return state

    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> Fold:
        """A :class:`CentralFold` with this round's clip and noise."""
        clip = self.current_clip(ctx.state)
        return CentralFold(
            global_arrays,
            clip=clip,
            noise_std=self.update_noise_multiplier * clip,
            divisor=self.expected_clients,
            noise=self._source(ctx, AGGREGATE),
            count_stddev=self.count_stddev if self.adaptive_clip else None,
        )

    def server_update(
        self, ctx: RoundContext, global_arrays: Arrays, aggregate: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """``inner``'s server update on the noised mean; then the clip's update."""
        aggregate = dict(aggregate)
        fraction = aggregate.pop(UNCLIPPED, None)
        inner_state = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
        arrays, new_state = self.inner.server_update(ctx, global_arrays, aggregate, inner_state)
        new_state = dict(new_state)
        if self.adaptive_clip:
            clip = self.current_clip(state)
            if fraction is not None:
                clip = next_clip(
                    clip, float(fraction), self.target_quantile, self.clip_learning_rate
                )
            new_state[CLIP_STATE] = np.asarray(clip, np.float64)
        return arrays, new_state

    def summarize_train(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> Metrics:
        """``inner``'s summary plus ``dp.clip``, the clip this round used."""
        metrics = dict(self.inner.summarize_train(ctx, updates))
        metrics["dp.clip"] = self.current_clip(ctx.state)
        return metrics
