"""How a :class:`DataSummary` travels: beside a plain training reply's arrays, appended to
the vector secure aggregation sums, and into the run store.

**Plain replies.** A client's summary rides in its training reply as extra arrays named
``drift/...`` (counts as ``uint32``, sums as ``float64``: about 57 KB for MNIST's 784
features at 12 bins), which the coordinator takes out before it checks the update
against the global model (:func:`split_reply`).

**Secure aggregation.** The summary is appended to the client's flat weighted update, so
the one secure sum of the round carries it and the coordinator learns only the sum over
the survivors (no second protocol run). The secure sum multiplies each coordinate by the
client's weight ``w`` (its ``num_examples``) and clips it to ``±clip``, so each statistic is
sent as a bounded fraction of the client's row count ``n``: bin and label counts as
``clip * count / n`` (in ``[0, clip]``), sums as ``clip * sum / (n * M)`` and sums of squares
as ``clip * sumsq / (n * M^2)`` with ``M`` the spec's largest ``|value|`` (winsorized values
keep them in range). The decoded weighted sum is then ``sum_i (w_i / n_i) * stat_i / ...``,
which is the population's statistic whenever ``w_i = n_i`` (a TorchClientApp reports its
training rows as ``num_examples``), up to the secure sum's quantization error
``survivors / 2^(s+1)`` per coordinate, scaled back by ``1 / clip`` (times ``M`` or ``M^2``).
"""

from __future__ import annotations

import numpy as np

from fedlearn.drift.stats import DataSummary, SummarySpec
from fedlearn.engine.records import Arrays, decode_arrays, encode_arrays
from fedlearn.errors import DataError

PREFIX = "drift/"
_FIELDS = ("count", "sums", "sumsq", "hist", "labels")


def to_reply_arrays(summary: DataSummary) -> Arrays:
    """A client's summary as reply arrays (integer counts as ``uint32``)."""
    if summary.count > np.iinfo(np.uint32).max:
        raise DataError("a client summary of more than 2^32 rows cannot be sent")
    return {
        PREFIX + "count": np.array([summary.count], dtype=np.uint32),
        PREFIX + "sums": summary.sums.astype(np.float64),
        PREFIX + "sumsq": summary.sumsq.astype(np.float64),
        PREFIX + "hist": summary.hist.astype(np.uint32),
        PREFIX + "labels": summary.labels.astype(np.uint32),
    }


def reply_bytes(spec: SummarySpec) -> int:
    """The bytes a client's summary adds to its reply (0 when its shape is not fixed:
    the reply's slack must then hold it)."""
    if not spec.features:
        return 0
    counts = 1 + spec.features * (spec.bins + 2) + spec.classes
    return 4 * counts + 8 * 2 * spec.features + 512  # and the names in the array header


def split_reply(arrays: Arrays, spec: SummarySpec) -> tuple[Arrays, DataSummary | None]:
    """The model's arrays and the client's summary (None if the reply carries none).

    DataError when the summary is malformed or does not fit ``spec``."""
    if not any(name.startswith(PREFIX) for name in arrays):
        return arrays, None
    model = {k: v for k, v in arrays.items() if not k.startswith(PREFIX)}
    parts = {k[len(PREFIX) :]: v for k, v in arrays.items() if k.startswith(PREFIX)}
    if set(parts) != set(_FIELDS):
        raise DataError(f"a data summary needs exactly {', '.join(_FIELDS)}; got {sorted(parts)}")
    for name in ("count", "hist", "labels"):
        if parts[name].dtype != np.uint32:
            raise DataError(f"data summary {name!r} must be uint32, got {parts[name].dtype}")
    for name in ("sums", "sumsq"):
        if parts[name].dtype != np.float64:
            raise DataError(f"data summary {name!r} must be float64, got {parts[name].dtype}")
    if parts["count"].shape != (1,):
        raise DataError("data summary 'count' must hold one value")
    summary = DataSummary(
        float(parts["count"][0]),
        np.asarray(parts["sums"], np.float64),
        np.asarray(parts["sumsq"], np.float64),
        np.asarray(parts["hist"], np.float64),
        np.asarray(parts["labels"], np.float64),
    )
    check_fits(summary, spec)
    return model, summary


def check_fits(summary: DataSummary, spec: SummarySpec) -> None:
    """DataError unless ``summary`` has the bins (and fixed sizes) ``spec`` asks for."""
    f, bins, classes = summary.shape
    if bins != spec.bins:
        raise DataError(f"data summary has {bins} bins, the drift settings {spec.bins}")
    if spec.features and f != spec.features:
        raise DataError(f"data summary has {f} features, the drift settings {spec.features}")
    if spec.classes and classes != spec.classes:
        raise DataError(f"data summary has {classes} classes, the drift settings {spec.classes}")
    if summary.hist.sum(axis=1).tolist() != [summary.count] * f:
        raise DataError("data summary histograms do not add up to its row count")


def to_bytes(summary: DataSummary) -> bytes:
    """For the run store: raw float64 arrays (never pickled)."""
    return encode_arrays(
        {
            "count": np.array([summary.count]),
            "sums": summary.sums,
            "sumsq": summary.sumsq,
            "hist": summary.hist,
            "labels": summary.labels,
        }
    )


def from_bytes(data: bytes) -> DataSummary:
    """The inverse of :func:`to_bytes`."""
    a = decode_arrays(data)
    if set(a) != set(_FIELDS) or a["count"].shape != (1,):
        raise DataError("a stored data summary is malformed")
    return DataSummary(
        float(a["count"][0]),
        *(np.array(a[k], dtype=np.float64) for k in ("sums", "sumsq", "hist", "labels")),
    )


# ------------------------------------------------------------------ secure aggregation


def secure_length(spec: SummarySpec) -> int:
    """How many coordinates a summary adds to the secure vector (needs fixed sizes)."""
    if not spec.features or not spec.classes:
        raise DataError("under secure aggregation drift.features and drift.classes must be set")
    return spec.features * (spec.bins + 4) + spec.classes


def pack_secure(summary: DataSummary, spec: SummarySpec, clip: float) -> np.ndarray:
    """The coordinates a client appends to its secure update (module docstring)."""
    check_fits(summary, spec)
    if summary.labels.shape != (spec.classes,):
        raise DataError(f"data summary has {summary.labels.size} classes, expected {spec.classes}")
    n = max(summary.count, 1.0)
    m = spec.bound
    out = np.concatenate(
        [
            summary.hist.ravel() / n,
            summary.labels / n,
            summary.sums / (n * m),
            summary.sumsq / (n * m * m),
        ]
    )
    out *= clip
    return out


def unpack_secure(
    weighted: np.ndarray, total_weight: float, spec: SummarySpec, clip: float
) -> DataSummary:
    """The population's summary from the decoded weighted sum of :func:`pack_secure`
    vectors and the round's total weight."""
    if weighted.shape != (secure_length(spec),):
        raise DataError("the secure sum's summary part has the wrong length")
    f, width, c = spec.features, spec.bins + 2, spec.classes
    v = np.asarray(weighted, dtype=np.float64) / clip
    hist = np.maximum(v[: f * width].reshape(f, width), 0.0)
    labels = np.maximum(v[f * width : f * width + c], 0.0)
    m = spec.bound
    sums = v[f * width + c : f * width + c + f] * m
    sumsq = np.maximum(v[f * width + c + f :] * m * m, 0.0)
    return DataSummary(float(total_weight), sums, sumsq, hist, labels)
