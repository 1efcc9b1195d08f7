"""Drift monitoring: additive data summaries, drift scores, the training side's rule and
the serving side's reference distribution."""

from fedlearn.drift.rule import POPULATION, DriftRule, DriftScore, score_rounds
from fedlearn.drift.stats import DataSummary, SummarySpec, ks, mean_shift, psi, summarize

__all__ = [
    "POPULATION",
    "DataSummary",
    "DriftRule",
    "DriftScore",
    "SummarySpec",
    "ks",
    "mean_shift",
    "psi",
    "score_rounds",
    "summarize",
]
