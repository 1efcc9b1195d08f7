"""The training side's drift rule: which site (or, under secure aggregation, the
population) moved between rounds.

Each site's summary of a round is compared with its own summary of the last round it
reported before; a site is flagged when the PSI over its feature histograms (mean over
features) exceeds ``psi_threshold``, or when some feature's mean moved by more than
``mean_shift_threshold`` pooled standard deviations, or when its label histogram's PSI
exceeds ``psi_threshold``. A site's first round has nothing to compare with and is never
flagged.

Under secure aggregation the coordinator holds one summary per round, the sum over the
round's survivors (:data:`POPULATION`): per-site flags are impossible by design, and the
population is flagged by the same rule instead. Its statistics also move when the round
samples other sites, so under partial participation a population flag says "the data
the round trained on moved", not which site moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedlearn.drift.stats import DataSummary, label_psi, mean_shift, psi
from fedlearn.errors import ConfigError

#: The key of the population's summary (secure aggregation: the sum over the survivors).
POPULATION = -1


@dataclass(frozen=True)
class DriftRule:
    """Thresholds of the rule (module docstring)."""

    psi_threshold: float = 0.2
    mean_shift_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in ("psi_threshold", "mean_shift_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ConfigError(f"drift.{name} must be a positive number, got {value!r}")

    def describe(self) -> str:
        """The rule in one line."""
        return (
            f"flag when PSI (mean over features, or of the labels) > {self.psi_threshold:g} "
            f"or a feature's mean moves > {self.mean_shift_threshold:g} pooled std, "
            "against the site's previous round"
        )


@dataclass(frozen=True)
class DriftScore:
    """One site's (or the population's) statistics in one round against its previous round."""

    round: int
    site: int
    """A client id, or :data:`POPULATION`."""
    previous_round: int
    rows: float
    psi: float
    label_psi: float
    mean_shift: float
    flagged: bool

    @property
    def population(self) -> bool:
        """Whether this is the population's score (secure aggregation)."""
        return self.site == POPULATION


def score_rounds(
    stats: Mapping[int, Mapping[int, DataSummary]], rule: DriftRule
) -> list[DriftScore]:
    """Scores of every (round, site) that has an earlier round to compare with, in round
    and site order. ``stats`` maps a round to ``{site: summary}``."""
    last: dict[int, tuple[int, DataSummary]] = {}
    out: list[DriftScore] = []
    for rnd in sorted(stats):
        for site in sorted(stats[rnd]):
            current = stats[rnd][site]
            before = last.get(site)
            last[site] = (rnd, current)
            if before is None or not before[1].same_shape(current):
                continue
            previous_round, reference = before
            p = psi(reference, current)
            lp = label_psi(reference.labels, current.labels)
            shift = mean_shift(reference, current)
            flagged = (
                p > rule.psi_threshold
                or lp > rule.psi_threshold
                or shift > rule.mean_shift_threshold
            )
            out.append(DriftScore(rnd, site, previous_round, current.count, p, lp, shift, flagged))
    return out
