"""A registry version's training reference distribution: a sidecar file beside its weights.

``<registry>/<model>/v<N>.safetensors`` gets ``v<N>.drift.safetensors`` holding the
summed data summary of the round the version was published from (all of that round's
clients, or under secure aggregation the population's sum: the same numbers either way)
and the bins it was computed over. Raw arrays in safetensors, never pickled. A version
published without drift monitoring, or before it existed, has no sidecar:
:func:`load_reference` returns None and drift is reported as unavailable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlearn.drift.stats import DataSummary, SummarySpec
from fedlearn.engine.weights import load_weights, save_weights_atomically
from fedlearn.errors import DataError, FedlearnError

SUFFIX = ".drift.safetensors"


@dataclass(frozen=True)
class Reference:
    """The distribution a version was trained on, and the bins it is counted in."""

    spec: SummarySpec
    summary: DataSummary


def reference_path(model_path: Path) -> Path:
    """Where the reference of the version stored at ``model_path`` lives."""
    return model_path.with_name(model_path.name.removesuffix(".safetensors") + SUFFIX)


def combined(summaries: Mapping[int, DataSummary]) -> DataSummary | None:
    """The sum of one round's summaries (None if there are none)."""
    total: DataSummary | None = None
    for site in sorted(summaries):
        total = summaries[site] if total is None else total + summaries[site]
    return total


def save_reference(model_path: Path, reference: Reference) -> Path:
    """Write the sidecar of the version at ``model_path`` atomically; returns its path."""
    s, spec = reference.summary, reference.spec
    arrays = {
        "spec": np.array(
            [spec.bins, spec.low, spec.high, spec.features, spec.classes], dtype=np.float64
        ),
        "count": np.array([s.count]),
        "sums": s.sums,
        "sumsq": s.sumsq,
        "hist": s.hist,
        "labels": s.labels,
    }
    path = reference_path(model_path)
    save_weights_atomically(arrays, path)
    return path


def load_reference(model_path: Path) -> Reference | None:
    """The reference of the version at ``model_path``; None when it has none.
    DataError when the sidecar is there but unreadable or inconsistent."""
    path = reference_path(model_path)
    if not path.is_file():
        return None
    try:
        a = load_weights(path)
    except FedlearnError as exc:
        raise DataError(f"{path.name}: unreadable drift reference ({exc})") from exc
    if {"spec", "count", "sums", "sumsq", "hist", "labels"} != set(a) or a["spec"].shape != (5,):
        raise DataError(f"{path.name}: not a drift reference")
    bins, low, high, features, classes = (float(v) for v in a["spec"])
    spec = SummarySpec(int(bins), low, high, int(features), int(classes))
    summary = DataSummary(
        float(a["count"][0]),
        *(np.array(a[k], dtype=np.float64) for k in ("sums", "sumsq", "hist", "labels")),
    )
    if summary.bins != spec.bins:
        raise DataError(f"{path.name}: its histograms do not have the bins its spec names")
    return Reference(spec, summary)
