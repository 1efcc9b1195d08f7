"""``fedlearn serve``: one repository, served over OIP v2 REST and gRPC side by side.

Requests for a model's name follow its traffic policy (A/B split, shadow, canary; see
:mod:`fedlearn.serving.traffic`), read from the registry like the ``production`` alias.
Plaintext is allowed on loopback only; any other address needs a certificate and key
(TLS on both protocols) or an explicit ``insecure``. Prometheus metrics are at REST
``/metrics``.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedlearn.errors import ConfigError
from fedlearn.registry.builders import add_import_paths
from fedlearn.registry.model_registry import DEFAULT_FACTORY_PREFIXES, PRODUCTION
from fedlearn.serving.drift import (
    DEFAULT_MAX_ROWS,
    DEFAULT_THRESHOLD,
    DEFAULT_WINDOW,
    DriftMonitor,
)
from fedlearn.serving.grpc_service import start_grpc_server
from fedlearn.serving.metrics import ServingMetrics
from fedlearn.serving.repository import ModelRepository, RepositorySettings
from fedlearn.serving.rest import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_INFLIGHT, create_app
from fedlearn.serving.shadow import DEFAULT_SHADOW_BUDGET, DEFAULT_SHADOW_QUEUE
from fedlearn.serving.threaded import RestServer, serve_rest
from fedlearn.serving.traffic import TrafficRouter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EndpointSettings:
    """Where and what ``fedlearn serve`` serves."""

    registry: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    alias: str = PRODUCTION
    models: tuple[str, ...] | None = None
    allowed_factories: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES
    #: directories put at the front of ``sys.path`` for model builders (``--path``)
    paths: tuple[Path, ...] = ()
    poll_interval_s: float = 0.5
    max_request_mb: int = 64
    #: seconds a REST request's body may take to arrive (408 after that)
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False
    grpc_workers: int = 8
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    """Inference calls answered or queued at once, per protocol; more get 503 with
    Retry-After (REST) or RESOURCE_EXHAUSTED (gRPC) instead of a thread or a queue slot."""
    #: mirrored requests waiting for the shadow worker; more are dropped (and counted)
    shadow_queue: int = DEFAULT_SHADOW_QUEUE
    #: whether this endpoint takes canary decisions (one of several sharing a registry
    #: may leave them to another)
    canary_decisions: bool = True
    #: how much lower the shadow worker's CPU priority (nice value) is than the request
    #: path's (Linux: per thread; 0: the same)
    shadow_nice: int = 0
    #: CPU the shadow worker may use, as a share of the rest of the endpoint's; mirrors
    #: beyond wait, and are dropped when the queue is full
    shadow_budget: float = DEFAULT_SHADOW_BUDGET
    drift: bool = True
    """Keep drift statistics of the inputs per version (:mod:`fedlearn.serving.drift`)."""
    drift_threshold: float = DEFAULT_THRESHOLD
    drift_window: int = DEFAULT_WINDOW
    drift_rows: int = DEFAULT_MAX_ROWS
    """Rows of one request the drift statistics count at most (evenly spaced)."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("serve: give both --cert and --key, or neither")
        if self.cert is None and not self.insecure and not _loopback(self.host):
            raise ConfigError(
                f"serve: {self.host} is not a loopback address; give --cert and --key "
                "(TLS) or --insecure"
            )
        if not self.body_timeout_s > 0:
            raise ConfigError(f"serve: body timeout must be > 0 s, got {self.body_timeout_s}")
        if self.max_request_mb < 1:
            raise ConfigError(
                f"serve: max request size must be >= 1 MiB, got {self.max_request_mb}"
            )
        if self.shadow_queue < 1:
            raise ConfigError(
                f"serve: --shadow-queue must be >= 1 request, got {self.shadow_queue}"
            )
        if not 0 < self.shadow_budget <= 10:
            raise ConfigError(
                f"serve: --shadow-budget must be in (0, 10], got {self.shadow_budget}"
            )
        if not 0 <= self.shadow_nice <= 19:
            raise ConfigError(f"serve: --shadow-nice must be in 0..19, got {self.shadow_nice}")
        if self.max_inflight < 1:
            raise ConfigError(
                f"serve: --max-inflight must be >= 1 request, got {self.max_inflight}"
            )

    @property
    def tls(self) -> bool:
        """Whether both protocols use TLS."""
        return self.cert is not None


@dataclass
class ServingEndpoint:
    """A started endpoint; ``close()`` stops both servers and the registry watcher."""

    settings: EndpointSettings
    repository: ModelRepository
    metrics: ServingMetrics
    rest: RestServer
    grpc_server: grpc.Server
    grpc_port: int
    traffic: TrafficRouter | None = None
    _closed: bool = field(default=False, repr=False)

    @property
    def http_url(self) -> str:
        """Base URL of the REST endpoint."""
        return self.rest.url

    @property
    def grpc_address(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        host = self.settings.host
        return f"[{host}]:{self.grpc_port}" if ":" in host else f"{host}:{self.grpc_port}"

    def close(self) -> None:
        """Stop serving (in-flight gRPC calls get a short grace period)."""
        if self._closed:
            return
        self._closed = True
        self.grpc_server.stop(grace=2).wait()
        self.rest.stop()
        if self.traffic is not None:
            self.traffic.close()
        self.repository.close()

    def __enter__(self) -> ServingEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_endpoint(settings: EndpointSettings) -> ServingEndpoint:
    """Open the registry, load what the alias points at, start REST and gRPC."""
    if settings.paths:
        add_import_paths(settings.paths)
    repository = ModelRepository(
        settings.registry,
        RepositorySettings(
            alias=settings.alias,
            models=settings.models,
            allowed_factories=settings.allowed_factories,
            poll_interval_s=settings.poll_interval_s,
        ),
    )
    metrics = ServingMetrics()
    if settings.drift:
        metrics.monitor_drift(
            DriftMonitor(
                settings.drift_threshold, settings.drift_window, max_rows=settings.drift_rows
            )
        )
    repository.on_swap(metrics.swapped)
    repository.start()
    limit = settings.max_request_mb << 20
    rest: RestServer | None = None
    traffic: TrafficRouter | None = None
    try:
        traffic = TrafficRouter(
            settings.registry,
            repository,
            metrics.registry,
            poll_interval_s=settings.poll_interval_s,
            shadow_queue=settings.shadow_queue,
            decide=settings.canary_decisions,
            shadow_nice=settings.shadow_nice,
            shadow_budget=settings.shadow_budget,
            drift=metrics.drift,
        )
        traffic.start()
        rest = serve_rest(
            create_app(
                repository,
                metrics,
                max_body_bytes=limit,
                body_timeout_s=settings.body_timeout_s,
                max_inflight=settings.max_inflight,
                traffic=traffic,
            ),
            settings.host,
            settings.http_port,
            ssl_certfile=None if settings.cert is None else str(settings.cert),
            ssl_keyfile=None if settings.key is None else str(settings.key),
        )
        credentials = None
        if settings.cert is not None and settings.key is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.key.read_bytes(), settings.cert.read_bytes())]
            )
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        server, port = start_grpc_server(
            repository,
            metrics,
            f"{host}:{settings.grpc_port}",
            max_message_bytes=limit,
            credentials=credentials,
            workers=settings.grpc_workers,
            max_inflight=settings.max_inflight,
            traffic=traffic,
        )
    except BaseException:
        if rest is not None:
            rest.stop()
        if traffic is not None:
            traffic.close()
        repository.close()
        raise
    log.info("serving %s: REST %s, gRPC port %d", settings.registry, rest.url, port)
    return ServingEndpoint(settings, repository, metrics, rest, server, port, traffic)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
