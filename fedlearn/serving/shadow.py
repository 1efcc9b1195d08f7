"""Shadow comparisons of the serving endpoint, and the traffic policies' metrics.

A :class:`ShadowWorker` takes mirrored requests (inputs, the primary's answer, the
candidate version) from the request path and compares the candidate's answers with the
primary's off that path (:mod:`fedlearn.serving.traffic` says when, and how much it may
cost). The request path only appends to a bounded deque (a full one drops the mirror and
counts it); the worker thread wakes every ``linger_s``, runs the candidate once on the
stacked inputs of the mirrors waiting (mirror by mirror if that fails) within its CPU
budget, and records rows compared, rows disagreeing (:func:`compare_outputs`), errors and
latencies, per (model, primary, candidate) pair.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fedlearn.serving.models import ServedModel
from fedlearn.serving.repository import ModelRepository

log = logging.getLogger(__name__)

DEFAULT_SHADOW_QUEUE = 64
#: CPU the shadow worker may use, as a share of the rest of the endpoint's.
DEFAULT_SHADOW_BUDGET = 0.05
#: CPU the shadow worker may use in any case, as a share of one core (seconds per second).
SHADOW_FLOOR = 0.01
#: Most CPU seconds the shadow worker may save up while it has nothing to compare.
SHADOW_MAX_CREDIT = 0.05
#: Latencies kept per version and step for a canary's p95 (the most recent ones).
LATENCY_WINDOW = 4096
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)

Outputs = dict[str, np.ndarray]


def compare_outputs(
    primary: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], tolerance: float
) -> tuple[int, int, float]:
    """``(rows, disagreeing rows, largest absolute difference)`` of two answers to one
    request (module docstring: argmax for ``[batch, classes]`` floats, max-abs over
    ``tolerance`` otherwise, non-finite candidate values always disagree; outputs of
    different shapes disagree on every row)."""
    rows = 0
    for array in primary.values():
        rows = max(rows, int(array.shape[0]) if array.ndim else 1)
    if rows == 0:
        return 0, 0, 0.0
    disagree = np.zeros(rows, dtype=bool)
    largest = 0.0
    for name, a in primary.items():
        b = candidate.get(name)
        if b is None or b.shape != a.shape:
            return rows, rows, math.inf
        a2 = a.reshape(rows, -1) if a.ndim else a.reshape(1, 1)
        b2 = b.reshape(rows, -1) if b.ndim else b.reshape(1, 1)
        if a2.dtype.kind in "fc" or b2.dtype.kind in "fc":
            af, bf = a2.astype(np.float64), b2.astype(np.float64)
            bad = ~np.isfinite(bf).all(axis=1)
            diff = np.abs(af - bf)
            finite = diff[np.isfinite(diff)]
            if finite.size:
                largest = max(largest, float(finite.max()))
            if bad.any():
                largest = math.inf
            if a.ndim == 2 and a.shape[1] > 1 and a.dtype.kind == "f":
                row_bad = np.argmax(af, axis=1) != np.argmax(bf, axis=1)
            else:
                row_bad = ~(np.nan_to_num(diff, nan=np.inf) <= tolerance).all(axis=1)
            disagree |= row_bad | bad
        else:
            row_bad = (a2 != b2).any(axis=1)
            if row_bad.any():
                largest = max(largest, float(np.abs(a2.astype(np.float64) - b2).max()))
            disagree |= row_bad
    return rows, int(disagree.sum()), largest


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    return max((int(a.shape[0]) if a.ndim else 1 for a in arrays.values()), default=1)


def _group_key(mirror: Mirror) -> tuple[Any, ...]:
    """Mirrors with equal keys can run stacked: same pair, outputs, tolerance, statistics,
    and tensors that differ at most in their first dimension (none a scalar)."""
    if any(a.ndim == 0 for a in (*mirror.inputs.values(), *mirror.answer.values())):
        return (id(mirror),)
    return (
        mirror.name,
        mirror.primary,
        mirror.candidate,
        mirror.tolerance,
        None if mirror.outputs is None else tuple(mirror.outputs),
        tuple(id(s) for s in mirror.stats),
        tuple((k, a.dtype.str, a.shape[1:]) for k, a in mirror.inputs.items()),
        tuple((k, a.dtype.str, a.shape[1:]) for k, a in mirror.answer.items()),
    )


def finite(outputs: Mapping[str, np.ndarray]) -> bool:
    """Whether every float value of ``outputs`` is finite."""
    return all(a.dtype.kind not in "fc" or bool(np.isfinite(a).all()) for a in outputs.values())


class TrafficMetrics:
    """The router's Prometheus metrics (names: module docstring) on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        pair = ["model", "primary", "candidate"]
        self.routed = Counter(
            "fedlearn_serving_traffic_requests",
            "Requests for a model name answered under a traffic policy, by answering version.",
            ["model", "version", "policy"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "fedlearn_serving_traffic_fallbacks",
            "Requests a routed version failed (error or non-finite output) and the serving "
            "alias answered instead, by routed version.",
            ["model", "version"],
            registry=registry,
        )
        self.decisions = Counter(
            "fedlearn_serving_traffic_decisions",
            "Canary decisions taken by this endpoint (canary-step, canary-promote, "
            "canary-rollback, route-clear).",
            ["model", "action"],
            registry=registry,
        )
        self.canary_share = Gauge(
            "fedlearn_serving_canary_share",
            "The share of a model's requests its canary candidate answers now.",
            ["model", "candidate"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            "fedlearn_serving_shadow_requests",
            "Requests mirrored to a shadow candidate and compared.",
            pair,
            registry=registry,
        )
        self.shadow_rows = Counter(
            "fedlearn_serving_shadow_rows",
            "Rows (batch entries) compared between primary and shadow candidate.",
            pair,
            registry=registry,
        )
        self.shadow_disagreements = Counter(
            "fedlearn_serving_shadow_disagreements",
            "Rows on which the shadow candidate disagreed with the primary.",
            pair,
            registry=registry,
        )
        self.shadow_ratio = Gauge(
            "fedlearn_serving_shadow_disagreement_ratio",
            "Disagreeing rows / compared rows of a (primary, candidate) pair since start.",
            pair,
            registry=registry,
        )
        self.shadow_errors = Counter(
            "fedlearn_serving_shadow_errors",
            "Mirrored requests the shadow candidate failed on.",
            pair,
            registry=registry,
        )
        self.shadow_dropped = Counter(
            "fedlearn_serving_shadow_dropped",
            "Mirrors dropped because the shadow queue was full.",
            ["model"],
            registry=registry,
        )
        self.shadow_latency = Histogram(
            "fedlearn_serving_shadow_seconds",
            "Inference latency of the primary and the shadow candidate on mirrored requests.",
            [*pair, "side"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )


@dataclass
class PairStats:
    """What the shadow comparisons of one (primary, candidate) pair found."""

    requests: int = 0
    rows: int = 0
    disagreements: int = 0
    errors: int = 0
    largest_difference: float = 0.0
    primary_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    candidate_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    @property
    def rate(self) -> float | None:
        return None if self.rows == 0 else self.disagreements / self.rows

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "rows": self.rows,
            "disagreements": self.disagreements,
            "disagreement_rate": self.rate,
            "errors": self.errors,
            "max_abs_difference": None
            if self.requests == 0 or math.isinf(self.largest_difference)
            else self.largest_difference,
            "primary_p50_ms": percentile(self.primary_ms, 50),
            "candidate_p50_ms": percentile(self.candidate_ms, 50),
            "candidate_p95_ms": percentile(self.candidate_ms, 95),
        }


def percentile(values: Sequence[float] | deque[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q))


@dataclass(frozen=True)
class Mirror:
    name: str
    primary: int
    candidate: int
    tolerance: float
    inputs: Mapping[str, np.ndarray]
    outputs: Sequence[str] | None
    answer: Outputs
    stats: tuple[PairStats, ...]


class CpuBudget:
    """The shadow worker's CPU allowance (called from the worker thread only): ``earn``
    adds ``share`` of the CPU time the rest of the process used since the last look (and
    the floor), ``spend`` deducts what this thread used."""

    def __init__(self, share: float) -> None:
        self.share = share
        self.credit = SHADOW_MAX_CREDIT
        self.process = time.process_time()
        self.thread = time.thread_time()
        self.wall = time.monotonic()
        self.mine = 0.0

    def earn(self) -> None:
        process, wall = time.process_time(), time.monotonic()
        others = max(0.0, process - self.process - self.mine)
        gained = self.share * others + SHADOW_FLOOR * (wall - self.wall)
        self.credit = min(SHADOW_MAX_CREDIT, self.credit + gained)
        self.process, self.wall, self.mine = process, wall, 0.0

    def left(self) -> bool:
        return self.credit > 0

    def spend(self) -> None:
        now = time.thread_time()
        used = now - self.thread
        self.thread = now
        self.credit -= used
        self.mine += used


class ShadowWorker:
    """Compares shadow candidates with their primaries in one thread (module docstring).

    ``capacity``: mirrors waiting at most. ``nice``: how much lower the worker's CPU
    priority is (Linux: per thread; 0 by default: a thread preempted for long while it
    holds the GIL would stall the request path instead). ``budget``: the CPU time the
    worker may use, as a share of the CPU time the rest of the process uses (plus
    ``SHADOW_FLOOR`` of a core, so that a quiet endpoint compares everything).
    """

    def __init__(
        self,
        repository: ModelRepository,
        metrics: TrafficMetrics,
        *,
        capacity: int = DEFAULT_SHADOW_QUEUE,
        nice: int = 0,
        linger_s: float = 0.02,
        batch_rows: int = 256,
        budget: float = DEFAULT_SHADOW_BUDGET,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.capacity = capacity
        self.shadow_nice = nice
        self.shadow_linger_s = linger_s
        self.shadow_batch_rows = batch_rows
        self.shadow_budget = budget
        self._pairs: dict[tuple[str, int, int], PairStats] = {}
        self._pairs_lock = threading.Lock()
        # appended by request threads, taken in batches by the worker when it wakes, so
        # a request wakes nobody
        self._mirrors: deque[Mirror] = deque()
        self._comparing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._shadow_worker, name="fedlearn-shadow", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop the worker (mirrors still waiting are dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(
        self,
        primary: ServedModel,
        candidate: int,
        tolerance: float,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        answer: Outputs,
        *extra: PairStats,
    ) -> None:
        """Queue one mirrored request (or drop it, counted, when the queue is full);
        ``extra`` statistics are updated along with the pair's."""
        if len(self._mirrors) >= self.capacity:
            self.metrics.shadow_dropped.labels(primary.name).inc()
            return
        pair = self.pair(primary.name, primary.version, candidate)
        mirror = Mirror(
            primary.name,
            primary.version,
            candidate,
            tolerance,
            inputs,
            outputs,
            answer,
            (pair, *extra),
        )
        self._mirrors.append(mirror)  # deque appends are atomic: no lock on the request path

    def pair(self, name: str, primary: int, candidate: int) -> PairStats:
        """The statistics of one (primary, candidate) pair of ``name``."""
        key = (name, primary, candidate)
        stats = self._pairs.get(key)
        if stats is None:
            with self._pairs_lock:
                stats = self._pairs.setdefault(key, PairStats())
        return stats

    def pairs(self, name: str) -> dict[str, dict[str, Any]]:
        """``{"v2->v3": summary}`` of every pair of ``name`` seen since start."""
        return {
            f"v{primary}->v{candidate}": stats.summary()
            for (model, primary, candidate), stats in list(self._pairs.items())
            if model == name
        }

    def _shadow_worker(self) -> None:
        if self.shadow_nice and hasattr(os, "setpriority"):
            # Linux: the nice value is per thread, so this one alone yields the CPU
            with contextlib.suppress(OSError):
                tid = threading.get_native_id()
                nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.shadow_nice)
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        budget = CpuBudget(self.shadow_budget)
        while not self._stop.wait(self.shadow_linger_s):
            budget.earn()
            while self._mirrors and budget.left() and not self._stop.is_set():
                self._comparing = True
                try:
                    self.run_mirrors(self._take())
                except Exception:  # the worker outlives any one batch
                    log.exception("shadow comparison failed")
                finally:
                    self._comparing = False
                    budget.spend()

    def _take(self) -> list[Mirror]:
        """The oldest waiting mirrors, up to ``shadow_batch_rows`` rows (at least one)."""
        batch: list[Mirror] = []
        rows = 0
        while self._mirrors and (not batch or rows < self.shadow_batch_rows):
            mirror = self._mirrors.popleft()
            batch.append(mirror)
            rows += _rows(mirror.inputs)
        return batch

    def run_mirrors(self, mirrors: Sequence[Mirror]) -> None:
        """Run the candidate on mirrored requests and record the comparisons: requests of
        one pair whose tensors stack along the batch axis run as one batch (the Python
        cost of a call paid once for all of them), the others one by one."""
        groups: dict[tuple[Any, ...], list[Mirror]] = {}
        for mirror in mirrors:
            groups.setdefault(_group_key(mirror), []).append(mirror)
        for group in groups.values():
            if len(group) == 1 or not self._run_stacked(group):
                for mirror in group:
                    self.run_mirror(mirror)

    def _run_stacked(self, group: list[Mirror]) -> bool:
        """One candidate call on the stacked inputs of ``group``; False (nothing recorded)
        if it fails, so that each request is tried alone."""
        first = group[0]
        try:
            model = self.repository.get(first.name, first.candidate)
            inputs = {k: np.concatenate([m.inputs[k] for m in group]) for k in first.inputs}
            primary = {k: np.concatenate([m.answer[k] for m in group]) for k in first.answer}
            start = time.perf_counter()
            answer = model.infer(inputs, first.outputs)
            elapsed = time.perf_counter() - start
        except Exception as exc:  # e.g. a candidate limited to smaller batches
            log.debug("shadow %s v%d: stacked batch failed: %s", first.name, first.candidate, exc)
            return False
        rows, disagreements, largest = compare_outputs(primary, answer, first.tolerance)
        self._record(first, len(group), rows, disagreements, largest, elapsed)
        return True

    def run_mirror(self, mirror: Mirror) -> None:
        """Run the candidate on one mirrored request and record the comparison."""
        try:
            model = self.repository.get(mirror.name, mirror.candidate)
            start = time.perf_counter()
            answer = model.infer(mirror.inputs, mirror.outputs)
            elapsed = time.perf_counter() - start
        except Exception as exc:
            log.debug("shadow %s v%d failed: %s", mirror.name, mirror.candidate, exc)
            labels = (mirror.name, str(mirror.primary), str(mirror.candidate))
            self.metrics.shadow_errors.labels(*labels).inc()
            for stats in mirror.stats:
                stats.errors += 1
            return
        rows, disagreements, largest = compare_outputs(mirror.answer, answer, mirror.tolerance)
        self._record(mirror, 1, rows, disagreements, largest, elapsed)

    def _record(
        self,
        mirror: Mirror,
        requests: int,
        rows: int,
        disagreements: int,
        largest: float,
        elapsed: float,
    ) -> None:
        """Count ``requests`` compared requests of ``mirror``'s pair (``elapsed``: the
        candidate's time to answer them, each)."""
        labels = (mirror.name, str(mirror.primary), str(mirror.candidate))
        self.metrics.shadow_requests.labels(*labels).inc(requests)
        self.metrics.shadow_rows.labels(*labels).inc(rows)
        self.metrics.shadow_disagreements.labels(*labels).inc(disagreements)
        latency = self.metrics.shadow_latency.labels(*labels, "candidate")
        for _ in range(requests):
            latency.observe(elapsed)
        for stats in mirror.stats:
            stats.requests += requests
            stats.rows += rows
            stats.disagreements += disagreements
            stats.largest_difference = max(stats.largest_difference, largest)
            stats.candidate_ms.extend([elapsed * 1e3] * requests)
        pair = mirror.stats[0]
        if pair.rate is not None:
            self.metrics.shadow_ratio.labels(*labels).set(pair.rate)

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued mirror has been compared (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while self._mirrors or self._comparing:
            if time.monotonic() > deadline:
                raise TimeoutError("the shadow queue did not drain")
            time.sleep(0.005)
