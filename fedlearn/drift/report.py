"""The drift part of a run's report: the rule, every score, and what was flagged."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlearn.drift.rule import POPULATION, DriftRule, DriftScore, score_rounds
from fedlearn.drift.stats import DataSummary

SECURE_NOTE = (
    "secure aggregation: only the sum of the clients' data summaries reached the "
    "coordinator, so no site can be flagged (by design); the population is flagged instead"
)


@dataclass(frozen=True)
class DriftReport:
    """Drift scores of a run's data summaries under its rule (:mod:`fedlearn.drift.rule`)."""

    rule: str
    psi_threshold: float
    mean_shift_threshold: float
    secure: bool
    """Whether the summaries were the population's only (secure aggregation)."""
    note: str | None
    scores: tuple[DriftScore, ...]

    @property
    def flagged(self) -> tuple[DriftScore, ...]:
        """The scores over a threshold, in round order."""
        return tuple(s for s in self.scores if s.flagged)

    def flagged_in(self, round: int) -> tuple[int, ...]:
        """The sites flagged in ``round`` (``POPULATION`` for the population)."""
        return tuple(s.site for s in self.scores if s.round == round and s.flagged)

    def score(self, round: int, site: int) -> DriftScore | None:
        """One site's score in one round, if it had an earlier round to compare with."""
        return next((s for s in self.scores if s.round == round and s.site == site), None)


def site_name(site: int) -> str:
    """``#3`` for a client, ``population`` for the secure sum."""
    return "population" if site == POPULATION else f"#{site}"


def rule_from_config(config: Mapping[str, Any]) -> DriftRule:
    """The thresholds a run's stored config names (the defaults when it names none)."""
    section = config.get("drift") if isinstance(config, Mapping) else None
    if not isinstance(section, Mapping):
        return DriftRule()
    defaults = DriftRule()
    return DriftRule(
        float(section.get("psi_threshold", defaults.psi_threshold)),
        float(section.get("mean_shift_threshold", defaults.mean_shift_threshold)),
    )


def drift_report(
    stats: Mapping[int, Mapping[int, DataSummary]], config: Mapping[str, Any]
) -> DriftReport | None:
    """The drift report of a run's recorded summaries (None when it recorded none)."""
    if not stats:
        return None
    rule = rule_from_config(config)
    secure = all(set(sites) == {POPULATION} for sites in stats.values())
    return DriftReport(
        rule=rule.describe(),
        psi_threshold=rule.psi_threshold,
        mean_shift_threshold=rule.mean_shift_threshold,
        secure=secure,
        note=SECURE_NOTE if secure else None,
        scores=tuple(score_rounds(stats, rule)),
    )
