"""Summary statistics of a data set that add up across sites, and drift scores between two.

A :class:`DataSummary` holds, for ``F`` features over fixed bins (:class:`SummarySpec`:
``bins`` equal-width bins between ``low`` and ``high`` plus an underflow and an overflow
bin), the row count, each feature's histogram, the sum and sum of squares of each
feature (winsorized to ``[low, high]``: a value outside counts at the nearer edge, which
keeps every statistic bounded, as secure aggregation needs) and the label histogram.
Every field is a sum over rows, so the summary of a union of data sets is the sum of
their summaries (``a + b``) exactly: sites' summaries add up to the population's.

Scores between a reference and a current summary:

- :func:`psi`: the population stability index ``sum_b (c_b - r_b) ln(c_b / r_b)`` over
  each feature's bin proportions (each proportion floored at :data:`PSI_FLOOR`), averaged
  over features; 0.1 is commonly read as a moderate and 0.25 as a large shift.
- :func:`mean_shift`: the largest ``|mean_c - mean_r| / sqrt((var_c + var_r) / 2)`` over
  features (standardized mean difference).
- :func:`ks`: the two-sample Kolmogorov-Smirnov statistic of each feature, evaluated at
  the bin edges (the largest gap between the two binned CDFs), with its asymptotic
  p-value from :func:`scipy.stats.kstwo` at the effective size ``n m / (n + m)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.engine.records import Config
from fedlearn.errors import ConfigError, DataError

#: Smallest bin proportion PSI uses (an empty bin would make the index infinite).
PSI_FLOOR = 1e-4
#: Task config keys carrying a :class:`SummarySpec` to the clients.
CONFIG_KEYS = ("drift.bins", "drift.low", "drift.high", "drift.features", "drift.classes")


@dataclass(frozen=True)
class SummarySpec:
    """Fixed bins every site uses, so that histograms add up across sites.

    ``features`` and ``classes`` fix the summary's shape (0: whatever the data has; secure
    aggregation needs them set, since the coordinator sizes the masked vector before any
    client answers).
    """

    bins: int = 12
    low: float = -3.0
    high: float = 3.0
    features: int = 0
    classes: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or self.bins < 1:
            raise ConfigError(f"drift.bins must be an int >= 1, got {self.bins!r}")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ConfigError(f"drift.low < drift.high must hold, got {self.low}, {self.high}")
        for name in ("features", "classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"drift.{name} must be an int >= 0, got {value!r}")

    @property
    def width(self) -> float:
        """Width of one inner bin."""
        return (self.high - self.low) / self.bins

    @property
    def edges(self) -> np.ndarray:
        """The ``bins + 1`` inner bin edges (underflow below the first, overflow above the last)."""
        return np.linspace(self.low, self.high, self.bins + 1)

    @property
    def bound(self) -> float:
        """The largest ``|value|`` a winsorized feature can take."""
        return max(abs(self.low), abs(self.high))

    def to_config(self) -> Config:
        """The task config keys that carry this spec."""
        return dict(zip(CONFIG_KEYS, self._values(), strict=True))

    def _values(self) -> tuple[int, float, float, int, int]:
        return (self.bins, float(self.low), float(self.high), self.features, self.classes)

    @classmethod
    def from_config(cls, config: Config) -> SummarySpec | None:
        """The spec a task config carries, or None when it asks for no summary."""
        if CONFIG_KEYS[0] not in config:
            return None
        try:
            bins, low, high, features, classes = (config[k] for k in CONFIG_KEYS)
            return cls(int(bins), float(low), float(high), int(features), int(classes))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"a task's drift settings are incomplete: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        """As a JSON object (sidecar metadata)."""
        return dict(
            zip(("bins", "low", "high", "features", "classes"), self._values(), strict=True)
        )

    @classmethod
    def from_json(cls, raw: Any) -> SummarySpec:
        """The inverse of :meth:`to_json`."""
        if not isinstance(raw, dict):
            raise DataError("a summary spec must be a JSON object")
        try:
            return cls(
                int(raw["bins"]),
                float(raw["low"]),
                float(raw["high"]),
                int(raw.get("features", 0)),
                int(raw.get("classes", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"bad summary spec: {exc}") from None


@dataclass(frozen=True, eq=False)
class DataSummary:
    """Additive statistics of a data set (see the module docstring); float64 throughout."""

    count: float
    sums: np.ndarray
    """Per feature: the sum of the winsorized values, shape ``(F,)``."""
    sumsq: np.ndarray
    """Per feature: the sum of the squared winsorized values, shape ``(F,)``."""
    hist: np.ndarray
    """Per feature: counts in ``[underflow, bin 1..bins, overflow]``, shape ``(F, bins + 2)``."""
    labels: np.ndarray
    """Count of each label, shape ``(C,)``."""

    def __post_init__(self) -> None:
        f = self.sums.shape[0] if self.sums.ndim == 1 else -1
        if (
            f < 0
            or self.sumsq.shape != (f,)
            or self.hist.ndim != 2
            or self.hist.shape[0] != f
            or self.hist.shape[1] < 3
            or self.labels.ndim != 1
        ):
            raise DataError(
                "inconsistent data summary shapes: "
                f"sums {self.sums.shape}, sumsq {self.sumsq.shape}, hist {self.hist.shape}, "
                f"labels {self.labels.shape}"
            )
        every = (self.sums, self.sumsq, self.hist, self.labels)
        if not (math.isfinite(self.count) and all(np.isfinite(a).all() for a in every)):
            raise DataError("a data summary holds NaN or infinite values")

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray | None, spec: SummarySpec) -> DataSummary:
        """The summary of rows ``x`` and labels ``y`` over ``spec``'s bins
        (:func:`summarize`): what a ClientApp's ``data_summary(spec, ctx)`` returns."""
        return summarize(x, y, spec)

    @property
    def features(self) -> int:
        """Number of features ``F``."""
        return int(self.sums.shape[0])

    @property
    def bins(self) -> int:
        """Number of inner bins (the histogram has two more)."""
        return int(self.hist.shape[1]) - 2

    def __add__(self, other: DataSummary) -> DataSummary:
        """The summary of the union of both data sets."""
        if not self.same_shape(other):
            raise DataError(
                f"data summaries of different shapes cannot be added: {self.shape} and "
                f"{other.shape}"
            )
        return DataSummary(
            self.count + other.count,
            self.sums + other.sums,
            self.sumsq + other.sumsq,
            self.hist + other.hist,
            self.labels + other.labels,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(features, inner bins, classes)."""
        return self.features, self.bins, int(self.labels.shape[0])

    def same_shape(self, other: DataSummary) -> bool:
        """Whether both summaries have the same features, bins and classes."""
        return self.shape == other.shape

    def mean(self) -> np.ndarray:
        """Per-feature mean of the winsorized values."""
        return self.sums / max(self.count, 1.0)

    def var(self) -> np.ndarray:
        """Per-feature (population) variance of the winsorized values."""
        m = self.mean()
        out: np.ndarray = np.maximum(self.sumsq / max(self.count, 1.0) - m * m, 0.0)
        return out

    def proportions(self) -> np.ndarray:
        """Each feature's bin proportions, shape ``(F, bins + 2)``."""
        totals = self.hist.sum(axis=1, keepdims=True)
        return self.hist / np.where(totals > 0, totals, 1.0)


def empty_summary(features: int, bins: int, classes: int) -> DataSummary:
    """The summary of no data."""
    return DataSummary(
        0.0,
        np.zeros(features),
        np.zeros(features),
        np.zeros((features, bins + 2)),
        np.zeros(classes),
    )


def bin_index(
    x: np.ndarray,
    spec: SummarySpec,
    offsets: np.ndarray | None = None,
    *,
    work: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Each value's bin as ``intp``: 0 for underflow (below ``low``, and NaN), ``1..bins``
    for ``[low + (i-1) w, low + i w)``, ``bins + 1`` for overflow (``high`` and above); plus
    ``offsets`` (whole numbers broadcast against ``x``: each feature's first slot in a flat
    table).

    Computed in the input's own float type (float32 or float64; anything else as
    float64): the clients summarize their training arrays as they hold them and the
    endpoint receives the same type, so the same value lands in the same bin on both
    sides, and float32 requests are binned at float32 speed. ``work`` (flat, of that float
    type) and ``out`` (flat ``intp``), when at least ``x.size`` long, are used instead of
    fresh temporaries."""
    a = np.asarray(x)
    dtype = a.dtype if a.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    if offsets is not None and offsets.size and float(offsets.max()) + spec.bins + 2 > 2**24:
        dtype = np.dtype(np.float64)  # float32 holds whole numbers exactly only up to 2^24
    kind = dtype.type
    if work is not None and work.dtype == dtype and work.size >= a.size:
        scaled = work[: a.size].reshape(a.shape)
    else:
        scaled = np.empty(a.shape, dtype)
    np.multiply(a, kind(1.0 / spec.width), out=scaled)
    scaled += kind(1.0 - spec.low / spec.width)
    np.fmax(scaled, kind(0.0), out=scaled)  # NaN -> 0 (fmax ignores NaN)
    np.fmin(scaled, kind(spec.bins + 1), out=scaled)
    if offsets is not None:
        scaled += offsets.astype(dtype, copy=False)  # whole numbers: truncation unchanged
    if out is not None and out.dtype == np.intp and out.size >= a.size:
        idx = out[: a.size].reshape(a.shape)
    else:
        idx = np.empty(a.shape, np.intp)
    np.copyto(idx, scaled, casting="unsafe")  # truncation is floor on [0, bins + 1 + offsets]
    return idx


def feature_histograms(rows: np.ndarray, spec: SummarySpec) -> np.ndarray:
    """``(F, bins + 2)`` counts of a ``(n, F)`` block, by one ``bincount``."""
    f = rows.shape[1]
    width = spec.bins + 2
    idx = bin_index(rows, spec, np.arange(f, dtype=np.float64) * width)
    return np.bincount(idx.ravel(), minlength=f * width).reshape(f, width).astype(np.float64)


def summarize(x: np.ndarray, y: np.ndarray | None, spec: SummarySpec) -> DataSummary:
    """The summary of ``n`` rows ``x`` (any shape ``(n, ...)``: flattened to ``(n, F)``)
    and their integer labels ``y`` (None: no labels)."""
    rows = np.asarray(x).reshape(len(x), -1) if len(x) else np.zeros((0, spec.features))
    n, f = rows.shape
    if spec.features and f != spec.features:
        raise DataError(f"the data has {f} features, the drift settings expect {spec.features}")
    clipped = np.clip(np.nan_to_num(rows.astype(np.float64), nan=spec.low), spec.low, spec.high)
    classes = spec.classes
    labels = np.zeros(classes)
    if y is not None and len(y):
        ints = np.asarray(y).astype(np.int64).ravel()
        if ints.min() < 0 or (classes and ints.max() >= classes):
            raise DataError(f"labels must lie in [0, {classes or 'classes'}), got {ints.min()}..")
        labels = np.bincount(ints, minlength=classes).astype(np.float64)
    return DataSummary(
        float(n),
        clipped.sum(axis=0),
        np.square(clipped).sum(axis=0),
        feature_histograms(rows, spec) if n else np.zeros((f, spec.bins + 2)),
        labels,
    )


def psi_per_feature(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """PSI of each row of two ``(F, B)`` count (or proportion) tables."""
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    cur = np.atleast_2d(np.asarray(current, dtype=np.float64))
    if ref.shape != cur.shape:
        raise DataError(f"PSI needs tables of one shape, got {ref.shape} and {cur.shape}")
    r = ref / np.maximum(ref.sum(axis=1, keepdims=True), 1e-300)
    c = cur / np.maximum(cur.sum(axis=1, keepdims=True), 1e-300)
    r = np.maximum(r, PSI_FLOOR)
    c = np.maximum(c, PSI_FLOOR)
    out: np.ndarray = ((c - r) * np.log(c / r)).sum(axis=1)
    return out


def psi(reference: DataSummary, current: DataSummary) -> float:
    """PSI between two summaries' feature histograms, averaged over features."""
    _check_pair(reference, current)
    if reference.features == 0:
        return 0.0
    return float(psi_per_feature(reference.hist, current.hist).mean())


def label_psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI between two label (or predicted class) histograms; 0 when either is empty."""
    ref, cur = np.asarray(reference, np.float64), np.asarray(current, np.float64)
    if ref.size == 0 or ref.sum() <= 0 or cur.sum() <= 0 or ref.shape != cur.shape:
        return 0.0
    return float(psi_per_feature(ref, cur)[0])


def mean_shift(reference: DataSummary, current: DataSummary) -> float:
    """The largest standardized mean difference over features (0 when a feature is
    constant and equal in both; a constant feature that moved counts as infinite)."""
    _check_pair(reference, current)
    if reference.features == 0 or reference.count <= 0 or current.count <= 0:
        return 0.0
    diff = np.abs(current.mean() - reference.mean())
    scale = np.sqrt((current.var() + reference.var()) / 2.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > 1e-12, diff / scale, np.where(diff > 1e-12, np.inf, 0.0))
    return float(z.max())


@dataclass(frozen=True)
class KSResult:
    """Per-feature two-sample KS statistics (at the bin edges) and their effective sizes
    ``round(n m / (n + m))``; p-values are computed when asked for."""

    statistic: np.ndarray
    effective_n: np.ndarray

    @property
    def pvalue(self) -> np.ndarray:
        """Each feature's asymptotic p-value (``scipy.stats.kstwo.sf(D, en)``)."""
        from scipy import stats

        p = np.ones_like(self.statistic)
        ok = self.effective_n >= 1
        p[ok] = stats.kstwo.sf(self.statistic[ok], self.effective_n[ok])
        out: np.ndarray = np.clip(p, 0.0, 1.0)
        return out

    @property
    def max_statistic(self) -> float:
        """The largest statistic over features."""
        return float(self.statistic.max()) if self.statistic.size else 0.0

    @property
    def min_pvalue(self) -> float:
        """The smallest p-value over features. The p-value falls as the statistic grows
        at a given size, so only the largest statistic of each size is evaluated (one
        ``kstwo.sf`` call when, as at the endpoint, every feature counts the same rows)."""
        from scipy import stats

        best = 1.0
        for en in np.unique(self.effective_n):
            if en >= 1:
                d = float(self.statistic[self.effective_n == en].max())
                best = min(best, float(stats.kstwo.sf(d, en)))
        return max(best, 0.0)


def ks(reference: np.ndarray, current: np.ndarray) -> KSResult:
    """Two-sample KS test of each row of two ``(F, B)`` histogram count tables.

    The statistic is ``max_b |R_b - C_b|`` over the binned CDFs, which equals the exact
    two-sample statistic when no bin holds values of both samples that interleave (and is
    a lower bound otherwise); the p-value is the asymptotic one
    (``scipy.stats.kstwo.sf(D, round(n m / (n + m)))``, as ``scipy.stats.ks_2samp`` with
    ``method="asymp"``).
    """
    ref = np.atleast_2d(np.asarray(reference, dtype=np.float64))
    cur = np.atleast_2d(np.asarray(current, dtype=np.float64))
    if ref.shape != cur.shape:
        raise DataError(f"KS needs tables of one shape, got {ref.shape} and {cur.shape}")
    n = ref.sum(axis=1)
    m = cur.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rc = np.cumsum(ref, axis=1) / n[:, None]
        cc = np.cumsum(cur, axis=1) / m[:, None]
        d = np.nan_to_num(np.abs(rc - cc).max(axis=1), nan=0.0)
        en = np.round(np.where(n + m > 0, n * m / np.maximum(n + m, 1e-300), 0.0))
    return KSResult(d, en)


def _check_pair(reference: DataSummary, current: DataSummary) -> None:
    if not reference.same_shape(current):
        raise DataError(
            f"cannot compare data summaries of shapes {reference.shape} and {current.shape}"
        )
