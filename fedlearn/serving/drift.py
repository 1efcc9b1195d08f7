"""The endpoint's drift monitor: rolling statistics of each served version's inputs and
predicted classes, scored against the version's training reference distribution.

Each version's registry sidecar (:mod:`fedlearn.drift.reference`) holds the summed data
summary the version was trained on and its fixed bins. For every inference the monitor
counts the first input's rows (at most ``max_rows`` per request, evenly spaced through the
batch) into the same bins, and the predicted classes (the first output's argmax). Rows
are binned in blocks of :data:`FLUSH_VALUES` values by one vectorised pass and one
``bincount``. Memory is bounded: per version two generations of counts and less than one
block waiting; when the current generation reaches ``window`` rows it becomes the previous
one and a fresh one starts, so the scores cover the last ``window`` to about ``2 * window``
counted rows.

Scores, computed when read (a Prometheus scrape, a metadata request), per version:

- ``psi``: PSI of the inputs' bins against the reference, mean over features (and its
  max over features, ``psi_max``);
- ``ks_statistic`` / ``ks_pvalue``: the two-sample KS test per feature on the binned
  CDFs (:func:`fedlearn.drift.stats.ks`), the largest statistic and the smallest p-value;
- ``prediction_psi``: PSI of the predicted classes against the training labels;
- ``alert``: 1 when ``psi`` exceeds the threshold over at least ``min_rows`` rows.

A version without a reference (published before drift monitoring, or by a run without
it) is reported as unavailable, with the reason; its requests are served as always.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.drift.reference import Reference, load_reference
from fedlearn.drift.stats import bin_index, ks, label_psi, psi_per_feature
from fedlearn.errors import ConfigError, FedlearnError

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from fedlearn.serving.models import ServedModel

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.2
DEFAULT_WINDOW = 10_000
DEFAULT_MIN_ROWS = 100
FLUSH_VALUES = 1 << 13
"""Pending request values (rows x features) that are binned together; also the size of a
binned block (its float64 working set, 64 KiB, stays in a core's L2 cache)."""
DEFAULT_MAX_ROWS = 8
"""Rows of one request counted at most (evenly spaced through its batch)."""
RETRY_REFERENCE_S = 5.0
"""How often a version without a reference looks for one again (a sidecar written just
after the version appeared)."""


@dataclass(frozen=True)
class DriftScores:
    """One version's scores over its window (module docstring)."""

    rows: int
    psi: float
    psi_max: float
    ks_statistic: float
    ks_pvalue: float
    prediction_psi: float
    alert: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``/v2/models/{name}`` metadata)."""
        return {
            "rows": self.rows,
            "psi": self.psi,
            "psi_max": self.psi_max,
            "ks_statistic": self.ks_statistic,
            "ks_pvalue": self.ks_pvalue,
            "prediction_psi": self.prediction_psi,
            "alert": self.alert,
        }


class _Counts:
    """One generation of counts: feature bins, predicted classes, rows."""

    def __init__(self, features: int, width: int, classes: int) -> None:
        self.hist = np.zeros(features * width, dtype=np.int64)
        self.predicted = np.zeros(classes, dtype=np.int64)
        self.rows = 0


class VersionDrift:
    """Rolling statistics of one served version (thread-safe).

    A request copies its rows (at most ``max_rows`` of them, evenly spaced through its
    batch) and its predicted classes into a pending list; the request that brings the
    pending values to :data:`FLUSH_VALUES` bins them all, one vectorised pass and one
    ``bincount`` per block of that size, and reading the scores bins whatever still waits,
    so a read counts every sampled row. (A worker thread that binned off the request path
    cost more CPU per request, in GIL hand-offs, than the binning it moved:
    BENCHMARKS.md, "Drift statistics".)
    """

    def __init__(self, reference: Reference, window: int, max_rows: int) -> None:
        self.reference = reference
        self.window = window
        self.max_rows = max_rows
        spec = reference.spec
        self.features = reference.summary.features
        self.width = spec.bins + 2
        self.classes = int(reference.summary.labels.shape[0])
        self._offsets = np.arange(self.features, dtype=np.float64) * self.width
        self._offsets32 = self._offsets.astype(np.float32)  # bin_index falls back if inexact
        self._lock = threading.Lock()  # counts and the pending list
        self._flushing = threading.Lock()  # one flush at a time, so a read waits for it
        self._current = self._fresh()
        self._previous = self._fresh()
        self._pending: list[np.ndarray] = []
        self._pending_classes: list[np.ndarray] = []
        self._pending_rows = 0
        self._block = max(1, FLUSH_VALUES // max(self.features, 1))
        self._scratch = threading.local()

    def _fresh(self) -> _Counts:
        return _Counts(self.features, self.width, self.classes)

    def observe(self, x: np.ndarray, scores: np.ndarray | None) -> None:
        """Count a batch of rows (``x``: ``(n, ...)``) and, if given, its output scores
        (``(n, classes)``: the argmax is the predicted class)."""
        n = int(x.shape[0]) if x.ndim else 0
        if n == 0 or x.size != n * self.features:
            return  # nothing, or a size the reference cannot be compared with
        step = -(-n // self.max_rows)  # ceil: at most max_rows rows, evenly spaced
        rows = np.array(x.reshape(n, self.features)[::step])  # a copy: the buffer goes
        classes = None
        if scores is not None and scores.ndim == 2 and scores.shape == (n, self.classes):
            classes = scores[::step].argmax(axis=1)
        with self._lock:
            self._pending.append(rows)
            if classes is not None:
                self._pending_classes.append(classes)
            self._pending_rows += rows.shape[0]
            full = self._pending_rows * self.features >= FLUSH_VALUES
        if full:
            self.flush()

    @property
    def pending(self) -> bool:
        """Whether rows wait to be binned."""
        return self._pending_rows > 0

    def flush(self) -> None:
        """Bin every pending row into the current generation."""
        with self._flushing:
            with self._lock:
                pending, classes = self._pending, self._pending_classes
                n = self._pending_rows
                self._pending, self._pending_classes, self._pending_rows = [], [], 0
            if not pending:
                return
            rows = np.concatenate(pending) if len(pending) > 1 else pending[0]
            hist = self._bin(rows)
            predicted = (
                np.bincount(np.concatenate(classes), minlength=self.classes)[: self.classes]
                if classes
                else None
            )
            with self._lock:
                current = self._current
                current.hist += hist
                if predicted is not None:
                    current.predicted += predicted
                current.rows += n
                if current.rows >= self.window:
                    self._previous, self._current = current, self._fresh()

    def _bin(self, rows: np.ndarray) -> np.ndarray:
        """The bin counts of ``rows``, in blocks of about FLUSH_VALUES values through
        this thread's scratch buffers (no large temporaries)."""
        scratch = self._scratch.__dict__
        if "work" not in scratch:
            scratch["work32"] = np.empty(self._block * self.features, np.float32)
            scratch["work"] = np.empty(self._block * self.features, np.float64)
            scratch["idx"] = np.empty(self._block * self.features, np.intp)
        single = rows.dtype == np.float32
        work = scratch["work32"] if single else scratch["work"]
        offsets = self._offsets32 if single else self._offsets
        hist = np.zeros(self.features * self.width, dtype=np.int64)
        for start in range(0, rows.shape[0], self._block):
            block = rows[start : start + self._block]
            idx = bin_index(block, self.reference.spec, offsets, work=work, out=scratch["idx"])
            hist += np.bincount(idx.ravel(), minlength=hist.size)
        return hist

    def scores(self, threshold: float, min_rows: int) -> DriftScores:
        """The scores over the current window (every answered request counted)."""
        self.flush()
        with self._lock:
            hist = self._current.hist + self._previous.hist
            predicted = self._current.predicted + self._previous.predicted
            rows = self._current.rows + self._previous.rows
        if rows == 0:
            return DriftScores(0, 0.0, 0.0, 0.0, 1.0, 0.0, False)
        table = hist.reshape(self.features, self.width).astype(np.float64)
        per_feature = psi_per_feature(self.reference.summary.hist, table)
        test = ks(self.reference.summary.hist, table)
        psi = float(per_feature.mean()) if per_feature.size else 0.0
        return DriftScores(
            rows=rows,
            psi=psi,
            psi_max=float(per_feature.max()) if per_feature.size else 0.0,
            ks_statistic=test.max_statistic,
            ks_pvalue=test.min_pvalue,
            prediction_psi=label_psi(self.reference.summary.labels, predicted),
            alert=rows >= min_rows and psi > threshold,
        )


@dataclass
class _Entry:
    drift: VersionDrift | None
    reason: str | None
    checked: float


class DriftMonitor:
    """Drift statistics of every served version, by (model, version) (module docstring).

    ``threshold`` is the PSI above which ``fedlearn_serving_drift_alert`` is 1 (once
    ``min_rows`` rows are in the window); ``window`` bounds the rows a score covers.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        window: int = DEFAULT_WINDOW,
        min_rows: int = DEFAULT_MIN_ROWS,
        max_rows: int = DEFAULT_MAX_ROWS,
    ) -> None:
        if not threshold > 0:
            raise ConfigError(f"serve: the drift threshold must be > 0, got {threshold}")
        if window < 1 or min_rows < 0:
            raise ConfigError(f"serve: drift window must be >= 1 row, got {window}")
        if max_rows < 1:
            raise ConfigError(f"serve: drift rows per request must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.threshold = threshold
        self.window = window
        # scipy.stats takes seconds to import: not on the first scrape's clock
        threading.Thread(target=importlib.import_module, args=("scipy.stats",), daemon=True).start()
        self.min_rows = min_rows
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._lock = threading.Lock()

    def _entry(self, model: ServedModel) -> _Entry:
        key = (model.name, model.version)
        entry = self._entries.get(key)
        if entry is not None and entry.drift is not None:
            return entry  # the fast path of every monitored request
        now = time.monotonic()
        if entry is not None and now - entry.checked < RETRY_REFERENCE_S:
            return entry
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or (entry.drift is None and now - entry.checked >= RETRY_REFERENCE_S):
                entry = self._load(model, now)
                self._entries[key] = entry
        return entry

    def _load(self, model: ServedModel, now: float) -> _Entry:
        if model.info is None:
            return _Entry(None, "the version has no registry entry", now)
        try:
            reference = load_reference(model.info.path)
        except FedlearnError as exc:
            log.warning("%s v%d: drift reference unusable: %s", model.name, model.version, exc)
            return _Entry(None, f"the version's drift reference is unusable ({exc})", now)
        if reference is None:
            return _Entry(
                None, "the version was published without a training reference distribution", now
            )
        signature = model.signature.inputs
        if signature:
            shape = [d for d in signature[0].shape[1:]]
            known = all(d > 0 for d in shape)
            features = int(np.prod(shape)) if known else reference.summary.features
            if features != reference.summary.features:
                return _Entry(
                    None,
                    f"the reference has {reference.summary.features} features, the model's "
                    f"input {signature[0].name!r} has {features}",
                    now,
                )
        return _Entry(VersionDrift(reference, self.window, self.max_rows), None, now)

    def observe(
        self,
        model: ServedModel,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """Count one answered request's first input and first output."""
        drift = self._entry(model).drift
        if drift is None:
            return
        signature = model.signature
        x = inputs.get(signature.inputs[0].name) if signature.inputs else None
        if x is None:
            return
        y = outputs.get(signature.outputs[0].name) if signature.outputs else None
        drift.observe(np.asarray(x), None if y is None else np.asarray(y))

    def flush(self) -> None:
        """Bin every version's pending rows now."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            if entry.drift is not None:
                entry.drift.flush()

    def status(self, model: ServedModel) -> dict[str, Any]:
        """The ``drift`` object of ``/v2/models/{name}``: scores, or why there are none."""
        entry = self._entry(model)
        if entry.drift is None:
            return {"available": False, "reason": entry.reason, "threshold": self.threshold}
        scores = entry.drift.scores(self.threshold, self.min_rows)
        return {
            "available": True,
            "threshold": self.threshold,
            "window": self.window,
            "min_rows": self.min_rows,
            **scores.as_dict(),
        }

    def version_scores(self, model: ServedModel) -> DriftScores | str:
        """``model``'s scores over its window, or why it has none (a canary's live gate)."""
        entry = self._entry(model)
        if entry.drift is None:
            return entry.reason or "no drift statistics"
        return entry.drift.scores(self.threshold, self.min_rows)

    def collect(self) -> Iterator[Metric]:
        """Prometheus metrics of every version seen so far (a custom collector)."""
        from prometheus_client.core import GaugeMetricFamily

        labels = ["model", "version"]
        families = {
            name: GaugeMetricFamily(f"fedlearn_serving_drift_{name}", text, labels=labels)
            for name, text in _GAUGES.items()
        }
        with self._lock:
            entries = sorted(self._entries.items())
        for (name, version), entry in entries:
            values = [name, str(version)]
            families["available"].add_metric(values, float(entry.drift is not None))
            if entry.drift is None:
                continue
            s = entry.drift.scores(self.threshold, self.min_rows)
            families["psi"].add_metric(values, s.psi)
            families["psi_max"].add_metric(values, s.psi_max)
            families["ks_statistic"].add_metric(values, s.ks_statistic)
            families["ks_pvalue"].add_metric(values, s.ks_pvalue)
            families["prediction_psi"].add_metric(values, s.prediction_psi)
            families["window_rows"].add_metric(values, float(s.rows))
            families["alert"].add_metric(values, float(s.alert))
        yield from families.values()
        yield GaugeMetricFamily(
            "fedlearn_serving_drift_threshold",
            "The PSI above which fedlearn_serving_drift_alert is 1.",
            value=self.threshold,
        )


_GAUGES = {
    "available": "1 when the version has a training reference distribution to compare with.",
    "psi": "PSI of the inputs against the training reference, mean over features.",
    "psi_max": "PSI of the inputs against the training reference, the largest feature's.",
    "ks_statistic": "Two-sample KS statistic on the binned inputs, the largest feature's.",
    "ks_pvalue": "Two-sample KS p-value on the binned inputs, the smallest feature's.",
    "prediction_psi": "PSI of the predicted classes against the training labels.",
    "window_rows": "Input rows the drift scores cover.",
    "alert": "1 when the mean PSI is over the threshold (with enough rows in the window).",
}
