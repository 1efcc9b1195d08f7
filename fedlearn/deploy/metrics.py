"""Prometheus metrics of the coordinator, served on ``/metrics``.

Each coordinator gets its own CollectorRegistry (several can live in one test process).
The metrics are fed by the round loop's Observer events, by the session registry, and
(payload bytes) by the servicer, which counts each task payload it has handed to gRPC and
each reply chunk it has read.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedlearn.deploy.sessions import ClientRegistry
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord


class CoordinatorMetrics:
    """Connected clients, rounds, round duration, client failures, bytes in and out."""

    def __init__(self, sessions: ClientRegistry) -> None:
        self.registry = CollectorRegistry()
        self.connected = Gauge(
            "fedlearn_connected_clients", "Sites with a live stream", registry=self.registry
        )
        self.connected.set_function(lambda: len(sessions.available()))
        self.rounds = Counter(
            "fedlearn_rounds", "Finished rounds by outcome", ["status"], registry=self.registry
        )
        self.round_seconds = Histogram(
            "fedlearn_round_duration_seconds",
            "Wall time of a round (training and evaluation)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.replies = Counter(
            "fedlearn_client_replies",
            "Client replies by stage and outcome",
            ["stage", "status"],
            registry=self.registry,
        )
        self.current_round = Gauge(
            "fedlearn_current_round", "Round in progress", registry=self.registry
        )
        self.bytes_sent = Counter(
            "fedlearn_payload_bytes_sent",
            "Task payload bytes (arrays and protocol messages) sent to sites",
            registry=self.registry,
        )
        self.bytes_received = Counter(
            "fedlearn_payload_bytes_received",
            "Reply payload bytes (arrays and protocol messages) received from sites",
            registry=self.registry,
        )

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` over HTTP until :meth:`close`; returns the bound port."""
        self._http, _ = start_http_server(port, addr=address, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop serving ``/metrics``."""
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()

    # Observer events -------------------------------------------------------------

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        """A stage began."""
        self.current_round.set(round)

    def reply_received(self, record: ClientRecord) -> None:
        """Count one reply by stage and outcome."""
        self.replies.labels(record.stage.value, "ok" if record.ok else "failed").inc()

    def round_finished(self, record: RoundRecord) -> None:
        """Count the round and observe its duration."""
        self.rounds.labels("ok" if record.ok else "failed").inc()
        self.round_seconds.observe(record.duration_s)
