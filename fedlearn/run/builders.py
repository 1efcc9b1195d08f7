"""Strategy, secure-aggregation and privacy objects from config sections (simulation and
coordinator)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from fedlearn.config.extras import require_extra
from fedlearn.config.simulation import (
    DriftSection,
    PrivacySection,
    SecAggSection,
    StrategySection,
)
from fedlearn.drift.stats import SummarySpec
from fedlearn.engine.references import resolve
from fedlearn.errors import ConfigError
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.strategy import Strategy, build_strategy

if TYPE_CHECKING:  # dp-accounting (the privacy extra) loads only when privacy is on
    from fedlearn.privacy.accountant import DpEvent
    from fedlearn.privacy.tracker import PrivacyTracker


def make_strategy(section: StrategySection) -> Strategy:
    """A built-in strategy by name, or a user's ``module:Class`` Strategy subclass."""
    if ":" not in section.name:
        return build_strategy(section.name, section.params)
    cls = resolve(section.name, "strategy.name")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ConfigError(f"strategy.name: {section.name} is not a Strategy subclass")
    try:
        return cls(**section.params)  # type: ignore[arg-type]
    except TypeError as exc:
        raise ConfigError(f"strategy.params: {exc}") from exc


def make_secure(section: SecAggSection) -> SecureAggregation | None:
    """Secure aggregation settings, or None when ``[secagg]`` is off."""
    if not section.enabled:
        return None
    return SecureAggregation(
        clip=section.clip,
        max_weight=section.max_weight,
        modulus_bits=section.modulus_bits,
        neighbours=section.neighbours,
        threshold=section.threshold,
    )


def make_distributed(
    privacy: PrivacySection,
    secagg: SecAggSection,
    secure: SecureAggregation | None,
    *,
    clients_per_round: int,
    num_params: Callable[[], int],
    seed: int,
) -> tuple[SecureAggregation | None, Callable[[int], DpEvent] | None]:
    """Secure aggregation with distributed DP's noise added by every client, and the DP
    event of a round whose sum holds ``survivors`` clients; ``(secure, None)`` unless
    ``privacy.mode = "distributed"``.

    A round's event is computed from the calibration it actually used (reported by the
    secure stages once its sum is revealed); before any round (the budget check) from the
    calibration a full round over the model's ``num_params()`` parameters will use.
    """
    if privacy.mode != "distributed" or secure is None:
        return secure, None
    require_extra("privacy", "privacy.mode = 'distributed'")
    from fedlearn.privacy.distributed import distributed_event, distributed_noise
    from fedlearn.secagg.stages import SecureRound

    if privacy.accountant == "pld":
        raise ConfigError(
            "privacy.accountant = 'pld' cannot account distributed DP (its bound is a zCDP "
            "event, which dp-accounting's PLD accountant does not take): use 'rdp'"
        )
    noise = distributed_noise(privacy, secagg, clients_per_round, seed=seed)
    neighbours: Literal["replace", "add_or_remove"] = (
        "replace" if privacy.sampling == "fixed" else "add_or_remove"
    )
    last: list[SecureRound] = []

    def on_round(report: SecureRound) -> None:
        last[:] = [report]

    noised = secure.with_noise(noise, clip=privacy.clip, on_round=on_round)
    planned = noised.planned_noise(clients_per_round, num_params())
    assert planned is not None

    def event(survivors: int) -> DpEvent:
        used = last[0].noise if last and last[0].noise is not None else planned
        return distributed_event(used, survivors, neighbours)

    return noised, event


def make_privacy(
    section: PrivacySection,
    strategy: Strategy,
    *,
    num_clients: int,
    seed: int,
    secure: SecureAggregation | None,
    distributed_event: Callable[[int], DpEvent] | None = None,
) -> tuple[Strategy, PrivacyTracker | None]:
    """The strategy to run (``strategy`` wrapped for ``[privacy]``) and the run's privacy
    accounting; ``(strategy, None)`` when ``privacy.mode = "off"``.

    Every impossible setting is a ConfigError here, before any round: δ ≥ 1/clients,
    central DP with a holistic strategy or with secure aggregation (the coordinator would
    not see the updates it must clip), PLD with fixed-size sampling, a budget that round 1
    alone exceeds. ``distributed_event(survivors)`` is the distributed mechanism's DP event
    for a round whose sum holds ``survivors`` clients (``mode = "distributed"``).
    """
    if section.mode == "off":
        return strategy, None
    if strategy.asynchrony(num_clients) is not None:
        raise ConfigError(
            f"privacy.mode = {section.mode!r} accounts synchronous rounds; "
            f"{type(strategy).__name__} is asynchronous: set privacy.mode = 'off'"
        )
    require_extra("privacy", f"privacy.mode = {section.mode!r}")
    from fedlearn.privacy.central import CentralPrivacy
    from fedlearn.privacy.strategy import CountedSum, client_privacy
    from fedlearn.privacy.tracker import PrivacySettings, PrivacyTracker

    if section.delta >= 1.0 / num_clients:
        raise ConfigError(
            f"privacy.delta = {section.delta:g} must be below 1/clients = {1.0 / num_clients:g}: "
            "a delta that large allows the mechanism to reveal one client outright"
        )
    per_round = strategy.train_clients_per_round(num_clients)
    q = strategy.fraction_train
    wrapped: Strategy = strategy
    if section.mode == "central":
        if secure is not None:
            raise ConfigError(
                "privacy.mode = 'central' clips each update on the coordinator, which secure "
                "aggregation hides from it: use mode = 'distributed' with [secagg], or turn "
                "secagg off"
            )
        wrapped = CentralPrivacy(
            inner=strategy,
            noise_multiplier=section.noise_multiplier,
            clip=section.clip,
            expected_clients=q * num_clients if section.sampling == "poisson" else per_round,
            adaptive_clip=section.adaptive_clip,
            target_quantile=section.target_quantile,
            clip_learning_rate=section.clip_learning_rate,
            clipped_count_stddev=section.clipped_count_stddev,
            sampling=section.sampling,
            noise=section.noise,
            seed=seed,
        )
    elif section.mode in ("local", "example"):
        wrapped = client_privacy(
            strategy,
            section.mode,
            section.clip,
            section.noise_multiplier,
            section.noise,
            section.delta,
        )
    else:
        # mode = "distributed": the noise is added inside secure aggregation (its settings
        # come with [secagg]); here the survivors are counted and ``distributed_event``
        # accounts for each round
        wrapped = CountedSum(inner=strategy)
    settings = PrivacySettings(
        mode=section.mode,
        noise_multiplier=section.noise_multiplier,
        delta=section.delta,
        accountant=section.accountant,
        sampling=section.sampling,
        rate=q,
        num_clients=num_clients,
        clients_per_round=per_round,
        worst_survivors=strategy.min_train_clients,
        budget=section.budget,
    )
    tracker = PrivacyTracker(settings, distributed_event)
    tracker.check_budget()
    return wrapped, tracker


def make_drift(
    section: DriftSection,
    secure: SecureAggregation | None,
    *,
    features: int = 0,
    classes: int = 0,
) -> SummarySpec | None:
    """The bins every client summarizes its data over (None when ``[drift]`` is off);
    ``features`` and ``classes`` stand in where the section leaves them 0 (a simulation's
    dataset). ConfigError under distributed DP, whose L2 clipping the summary would break."""
    if not section.enabled:
        return None
    if secure is not None and secure.noise is not None:
        raise ConfigError(
            "drift.enabled: data summaries cannot ride in the secure sum under distributed "
            "DP (they would break its L2 clipping); turn one of them off"
        )
    spec = SummarySpec(
        section.bins,
        section.low,
        section.high,
        section.features or features,
        section.classes or classes,
    )
    if secure is not None and not (spec.features and spec.classes):
        raise ConfigError(
            "drift under secure aggregation: set drift.features and drift.classes (the "
            "coordinator sizes the secure vector before any site answers)"
        )
    return spec
