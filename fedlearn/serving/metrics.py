"""Prometheus metrics of the serving endpoint (exposed at REST ``/metrics``)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from fedlearn.serving.drift import DriftMonitor
    from fedlearn.serving.models import ServedModel

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
)


class ServingMetrics:
    """Requests, latency, errors and the version each model serves, per protocol.

    ``protocol`` is ``"rest"`` or ``"grpc"``; ``code`` is the HTTP status or gRPC status
    name of a failed request. Each instance owns its own collector registry, so several
    endpoints (or tests) in one process never share counters.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedlearn_serving_requests",
            "Inference requests answered, by protocol, model and outcome (ok or error).",
            ["protocol", "model", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedlearn_serving_request_seconds",
            "Inference request latency in seconds, by protocol and model.",
            ["protocol", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "fedlearn_serving_errors",
            "Failed requests of any kind, by protocol and status code.",
            ["protocol", "code"],
            registry=self.registry,
        )
        self.served_version = Gauge(
            "fedlearn_serving_model_version",
            "The version answering unversioned requests, per model.",
            ["model"],
            registry=self.registry,
        )
        self.drift: DriftMonitor | None = None
        """Drift statistics of the served versions (:meth:`monitor_drift`), or None."""
        self.swaps = Counter(
            "fedlearn_serving_swaps",
            "Hot swaps to a newly promoted or rolled-back version, per model.",
            ["model"],
            registry=self.registry,
        )

    @contextmanager
    def infer(self, protocol: str, model: str) -> Iterator[None]:
        """Time one inference; counts it as ``ok`` or ``error`` (then re-raises)."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.requests.labels(protocol, model, "error").inc()
            raise
        else:
            self.requests.labels(protocol, model, "ok").inc()
        finally:
            self.latency.labels(protocol, model).observe(time.perf_counter() - start)

    def monitor_drift(self, monitor: DriftMonitor) -> None:
        """Keep drift statistics of every answered request and export their scores here."""
        self.drift = monitor
        self.registry.register(monitor)  # a collector: its collect() yields the gauges

    def observed(
        self, model: ServedModel, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, Any]
    ) -> None:
        """One answered request's inputs and outputs (drift statistics, when monitored)."""
        if self.drift is not None:
            self.drift.observe(model, inputs, outputs)

    def error(self, protocol: str, code: int | str) -> None:
        """Count one failed request (any endpoint) with its status code."""
        self.errors.labels(protocol, str(code)).inc()

    def swapped(self, name: str, old: int | None, new: int) -> None:
        """Record that ``name`` now serves ``new`` (a ModelRepository swap listener)."""
        self.served_version.labels(name).set(new)
        if old is not None:
            self.swaps.labels(name).inc()

    def exposition(self) -> bytes:
        """The text exposition format for ``/metrics``."""
        return generate_latest(self.registry)
