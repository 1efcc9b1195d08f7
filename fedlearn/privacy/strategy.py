"""Strategy wrappers that add a DP mechanism around any strategy.

:class:`PrivacyWrapper` hands every hook to the strategy it wraps (``inner``); a mode
overrides the hooks it changes. :class:`ClientPrivacy` (local DP, example-level DP-SGD)
changes only the training config: each TRAIN task carries the ``dp.*`` keys the client
runtime reads. :class:`CountedSum` (distributed DP) records how many clients each secure
sum holds. Central DP (:mod:`fedlearn.privacy.central`) changes the fold and the
server update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedlearn.engine.records import Arrays, Config, Metrics
from fedlearn.strategy.base import (
    ClientEvaluation,
    ClientUpdate,
    Fold,
    RoundContext,
    Strategy,
)

#: Training-config keys of client-side DP (the client part reads them).
MODE_KEY = "dp.mode"
CLIP_KEY = "dp.clip"
NOISE_MULTIPLIER_KEY = "dp.noise_multiplier"
NOISE_KEY = "dp.noise"
DELTA_KEY = "dp.delta"
#: Round train metric: how many clients' updates the round's (secure) sum holds.
SURVIVORS_KEY = "dp.survivors"

_SHARED = ("fraction_train", "fraction_evaluate", "min_train_clients", "min_evaluate_clients")


@dataclass(frozen=True, kw_only=True)
class PrivacyWrapper(Strategy):
    """Every hook of ``inner``; its selection settings and ``linear`` are ``inner``'s."""

    inner: Strategy

    def __post_init__(self) -> None:
        for name in _SHARED:
            object.__setattr__(self, name, getattr(self.inner, name))
        object.__setattr__(self, "linear", self.inner.linear)

    def validate(self, num_clients: int) -> None:
        """``inner``'s checks."""
        self.inner.validate(num_clients)

    def train_clients_per_round(self, num_clients: int) -> int:
        """As ``inner``."""
        return self.inner.train_clients_per_round(num_clients)

    def select_train(self, ctx: RoundContext, clients: Sequence[int]) -> list[int]:
        """As ``inner``."""
        return self.inner.select_train(ctx, clients)

    def select_evaluate(self, ctx: RoundContext, clients: Sequence[int]) -> list[int]:
        """As ``inner``."""
        return self.inner.select_evaluate(ctx, clients)

    def train_config(self, ctx: RoundContext) -> Config:
        """As ``inner``."""
        return self.inner.train_config(ctx)

    def evaluate_config(self, ctx: RoundContext) -> Config:
        """As ``inner``."""
        return self.inner.evaluate_config(ctx)

    def client_train_config(self, ctx: RoundContext, client_id: int, config: Config) -> Config:
        """As ``inner``."""
        return self.inner.client_train_config(ctx, client_id, config)

    def train_arrays(self, ctx: RoundContext, global_arrays: Arrays) -> Arrays:
        """As ``inner``."""
        return self.inner.train_arrays(ctx, global_arrays)

    def init_state(self, global_arrays: Arrays) -> Arrays:
        """As ``inner``."""
        return self.inner.init_state(global_arrays)

    def combine(
        self, ctx: RoundContext, global_arrays: Arrays, updates: Sequence[ClientUpdate]
    ) -> Arrays:
        """As ``inner``."""
        return self.inner.combine(ctx, global_arrays, updates)

    def server_update(
        self, ctx: RoundContext, global_arrays: Arrays, aggregate: Arrays, state: Arrays
    ) -> tuple[Arrays, Arrays]:
        """As ``inner``."""
        return self.inner.server_update(ctx, global_arrays, aggregate, state)

    def summarize_train(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> Metrics:
        """As ``inner``."""
        return self.inner.summarize_train(ctx, updates)

    def summarize_evaluate(
        self, ctx: RoundContext, evaluations: Sequence[ClientEvaluation]
    ) -> Metrics:
        """As ``inner``."""
        return self.inner.summarize_evaluate(ctx, evaluations)


@dataclass(frozen=True, kw_only=True)
class CountedSum(PrivacyWrapper):
    """``inner``, whose round summary also says how many clients' updates the aggregate
    holds (``dp.survivors``): under secure aggregation the survivors of every stage, which
    distributed DP's accounting needs. The fold is the base one, so secure aggregation's
    checks pass wherever they pass for ``inner``."""

    def summarize_train(self, ctx: RoundContext, updates: Sequence[ClientUpdate]) -> Metrics:
        """``inner``'s summary plus ``dp.survivors``."""
        metrics = dict(self.inner.summarize_train(ctx, updates))
        metrics[SURVIVORS_KEY] = len(updates)
        return metrics


@dataclass(frozen=True, kw_only=True)
class ClientPrivacy(PrivacyWrapper):
    """``inner`` with client-side DP asked for in every training task's config.

    The fold is the base one (``inner``'s weighted mean, or its holistic rule through
    :meth:`combine`), so this wrapper passes secure aggregation's checks wherever ``inner``
    does; :func:`client_privacy` picks :class:`_ClientPrivacyOwnFold` for a strategy with
    a fold of its own.
    """

    mode: Literal["local", "example"]
    clip: float
    noise_multiplier: float
    noise: Literal["secure", "seeded"] = "secure"
    delta: float = 1e-5

    def train_config(self, ctx: RoundContext) -> Config:
        """``inner``'s config plus ``dp.mode``, ``dp.clip``, ``dp.noise_multiplier``,
        ``dp.noise`` and ``dp.delta``."""
        config = dict(self.inner.train_config(ctx))
        config[MODE_KEY] = self.mode
        config[CLIP_KEY] = float(self.clip)
        config[NOISE_MULTIPLIER_KEY] = float(self.noise_multiplier)
        config[NOISE_KEY] = self.noise
        config[DELTA_KEY] = float(self.delta)
        return config


@dataclass(frozen=True, kw_only=True)
class _ClientPrivacyOwnFold(ClientPrivacy):
    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> Fold:
        return self.inner.start_fold(ctx, global_arrays)


def client_privacy(
    inner: Strategy,
    mode: Literal["local", "example"],
    clip: float,
    noise_multiplier: float,
    noise: Literal["secure", "seeded"] = "secure",
    delta: float = 1e-5,
) -> ClientPrivacy:
    """``inner`` asking its clients for client-side DP (see :class:`ClientPrivacy`)."""
    own_fold = type(inner).start_fold is not Strategy.start_fold
    cls = _ClientPrivacyOwnFold if own_fold else ClientPrivacy
    return cls(
        inner=inner,
        mode=mode,
        clip=clip,
        noise_multiplier=noise_multiplier,
        noise=noise,
        delta=delta,
    )
