"""Strategy and secure-aggregation objects from config sections (simulation and coordinator)."""

from __future__ import annotations

from fedlearn.config.simulation import SecAggSection, StrategySection
from fedlearn.engine.references import resolve
from fedlearn.errors import ConfigError
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.strategy import Strategy, build_strategy


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
