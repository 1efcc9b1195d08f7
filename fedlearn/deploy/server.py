"""The coordinator daemon: serve gRPC, admit enrolled sites, run rounds, keep durable state.

``run_coordinator`` builds the deployment's pieces (the live allowlist, authenticator,
session registry, gRPC transport) and drives the same :class:`Coordinator` loop as simulations,
through the same run lifecycle (:mod:`fedlearn.run.lifecycle`): every round commits
atomically, the same command after a crash resumes after the last committed round, and
the run ends with its true status, its report and its final publication.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fedlearn.config.deployment import CoordinatorConfig, ServerSection
from fedlearn.deploy.admission import JoinLimits
from fedlearn.deploy.enrollment import IDS_FILE, Enrollment
from fedlearn.deploy.metrics import CoordinatorMetrics
from fedlearn.deploy.servicer import CoordinatorServicer
from fedlearn.deploy.sessions import ClientRegistry
from fedlearn.deploy.transport import GrpcTransport
from fedlearn.engine.coordinator import Coordinator, Observer, Observers
from fedlearn.engine.records import Arrays
from fedlearn.engine.references import resolve
from fedlearn.engine.results import RunResult
from fedlearn.engine.weights import load_weights
from fedlearn.errors import ConfigError, RoundFailed, RunInterrupted
from fedlearn.run.builders import (
    make_distributed,
    make_drift,
    make_privacy,
    make_secure,
    make_strategy,
)
from fedlearn.run.lifecycle import RunOutcome, RunSpec, Start, open_run
from fedlearn.security.auth import Authenticator
from fedlearn.security.certs import leaf_sha256, load_pem, load_server_pem
from fedlearn.security.keys import load_allowlist
from fedlearn.ui.events import EventBus
from fedlearn.wire import fedlearn_pb2_grpc as pb_grpc

log = logging.getLogger("fedlearn.server")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


def server_credentials(section: ServerSection) -> grpc.ServerCredentials | None:
    """TLS credentials for ``[server]`` (None: plaintext). With ``client_ca`` every site
    must present a certificate signed by it (mutual TLS): one without is refused during
    the TLS handshake."""
    if section.insecure:
        return None
    assert section.cert is not None and section.key is not None
    pem = load_server_pem(section.cert, section.key)
    if section.client_ca is None:
        return grpc.ssl_server_credentials([(pem.private_key, pem.certificate_chain)])
    return grpc.ssl_server_credentials(
        [(pem.private_key, pem.certificate_chain)],
        root_certificates=load_pem(section.client_ca),
        require_client_auth=True,
    )


def page_exposure(section: ServerSection) -> dict[str, Any]:
    """Where the live page listens and with what TLS: loopback in plain HTTP by default;
    on ``ui_address`` beyond loopback over the coordinator's certificate, admitting only
    what the gRPC port admits (with ``client_ca``, a client certificate it signed)."""
    from fedlearn.config.deployment import is_loopback
    from fedlearn.ui.page import PageTls

    host = section.ui_address or "127.0.0.1"
    out: dict[str, Any] = {"host": host, "port": section.ui_port or 0}
    if not is_loopback(host):
        if section.insecure or section.cert is None or section.key is None:
            raise ConfigError(f"server.ui_address {host!r} beyond loopback needs TLS")
        client_ca = None if section.client_ca is None else Path(section.client_ca)
        out["tls"] = PageTls(Path(section.cert), Path(section.key), client_ca)
    return out


def certificate_sha256(section: ServerSection) -> bytes | None:
    """The SHA-256 of the coordinator's own certificate: what a site's proof covers."""
    if section.insecure:
        return None
    assert section.cert is not None
    return leaf_sha256(load_pem(section.cert))


def start_server(
    section: ServerSection, servicer: CoordinatorServicer, max_workers: int
) -> tuple[grpc.Server, int]:
    """Bind and start the gRPC server (TLS unless ``insecure``); returns it and its port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    creds = server_credentials(section)
    if creds is None:
        port = server.add_insecure_port(section.address)
    else:
        port = server.add_secure_port(section.address, creds)
    if port == 0:
        raise ConfigError(f"server.address: cannot listen on {section.address}")
    server.start()
    return server, port


def initial_arrays(config: CoordinatorConfig) -> Arrays:
    """The initial global model named by ``[model]``."""
    if config.model.weights is not None:
        return load_weights(config.model.weights)
    assert config.model.factory is not None
    factory: Callable[[int], Arrays] = resolve(config.model.factory, "model.factory")
    return factory(config.run.seed)


def run_coordinator(
    config: CoordinatorConfig,
    *,
    stop: threading.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
    observer: Observer | None = None,
    events: EventBus | None = None,
    new_run: bool = False,
    resume_command: str = "the same fedlearn server command",
) -> RunOutcome:
    """Serve, wait for sites, run (or resume) the configured run, then say goodbye.

    The state directory's run continues after its last committed round, under the rules
    of :mod:`fedlearn.run.lifecycle` (``new_run`` moves a previous run aside instead).
    Setting ``stop`` (or SIGTERM / Ctrl-C in the main thread) stops before the next round
    with :class:`RunInterrupted`. The allowlist is re-read when its file changes (and on
    SIGHUP in the main thread): see :mod:`fedlearn.deploy.enrollment`. ``events`` receives
    the run's events; with ``[server] ui_port`` the live page follows them (a bus is made
    if none is given).
    """
    allowlist = load_allowlist(config.server.allowlist)
    authenticator = Authenticator(
        allowlist, config.server.server_id, server_cert_sha256=certificate_sha256(config.server)
    )
    server_credentials(config.server)  # every TLS file is checked before the run opens
    strategy = make_strategy(config.strategy)
    # the population a round samples from: the enrolled sites when the run starts
    population = max(len(allowlist), 1)
    secure, distributed_event = make_distributed(
        config.privacy,
        config.secagg,
        make_secure(config.secagg),
        clients_per_round=strategy.train_clients_per_round(population),
        num_params=lambda: sum(int(a.size) for a in initial_arrays(config).values()),
        seed=config.run.seed,
    )
    strategy, privacy = make_privacy(
        config.privacy,
        strategy,
        num_clients=population,
        seed=config.run.seed,
        secure=secure,
        distributed_event=distributed_event,
    )
    data_stats = make_drift(config.drift, secure)
    state_dir = Path(config.server.state_dir)
    registry_root = Path(config.publish.registry or state_dir / "registry")
    spec = RunSpec(
        directory=state_dir,
        name=config.run.name,
        seed=config.run.seed,
        rounds=config.run.rounds,
        config=config,
        resume_command=resume_command,
        keep=(registry_root,),
    )
    lifecycle = open_run(spec, Start.NEW if new_run else Start.AUTO, new_run)
    if privacy is not None:
        lifecycle.account_privacy(privacy)
    if events is None and config.server.ui_port is not None:
        events = EventBus()
    lifecycle.events = events
    if config.publish.enabled:  # imported only then: the registry and its dependencies
        from fedlearn.registry.publish import Publisher, serving_spec

        lifecycle.publisher = Publisher(
            config.publish, config.run.name, serving_spec(config.publish, None), registry_root
        )
        lifecycle.publish_every = config.publish.every
        lifecycle.publisher.drift_spec = data_stats
    if lifecycle.already_finished:
        return lifecycle.leave()
    page = None
    try:
        if config.server.ui_port is not None:
            from fedlearn.ui.page import start_live_page

            page = start_live_page(
                state_dir,
                config.run.name,
                events,
                registry=registry_root,
                endpoint=config.server.ui_endpoint,
                **page_exposure(config.server),
            )
            log.info("live page on %s", page.url)
        with serve_sites(config, authenticator, on_ready, events) as service:
            registry = service.registry

            def before_round(rnd: int) -> None:
                if stop is not None and stop.is_set():
                    raise RunInterrupted(rnd - 1, resume_command)
                if not registry.wait_for(config.run.min_clients, config.run.join_timeout_s):
                    raise RoundFailed(
                        f"round {rnd}: fewer than {config.run.min_clients} sites connected "
                        f"within {config.run.join_timeout_s} s"
                    )

            def run(arrays: Arrays, state: Arrays | None, start_round: int) -> RunResult:
                coordinator = Coordinator(
                    strategy,
                    service.transport,
                    service.enrollment.ids,  # follows the allowlist as it changes
                    config.run.rounds,
                    seed=config.run.seed,
                    evaluate_every=config.run.evaluate_every,
                    sink=lifecycle,
                    observer=Observers(service.metrics, observer, events),
                    available=registry.available,
                    before_round=before_round,
                    secure=secure,
                    stop_before=lifecycle.stop_before,
                    hold_bytes=config.server.hold_replies_mb << 20,
                    data_stats=data_stats,
                )
                # handed over, not copied: one copy of the model fewer for the whole run
                return coordinator.run(arrays, state, start_round, copy=False)

            outcome = lifecycle.drive(lambda: initial_arrays(config), run)
            registry.close_all("run finished")
            return outcome
    finally:
        lifecycle.close()  # idempotent: drive() has closed it unless serving never started
        if page is not None:
            page.stop()


@dataclass(frozen=True)
class SiteService:
    """A coordinator's gRPC service and the sites connected to it: what a run drives."""

    registry: ClientRegistry
    transport: GrpcTransport
    enrollment: Enrollment
    metrics: CoordinatorMetrics
    port: int


@contextlib.contextmanager
def serve_sites(
    config: CoordinatorConfig,
    authenticator: Authenticator,
    on_ready: Callable[[int], None] | None = None,
    events: EventBus | None = None,
) -> Iterator[SiteService]:
    """Serve ``config``'s gRPC endpoint and admit its enrolled sites until the block
    ends (a training run, or a cross-site evaluation's evaluate-only run). Sites keep the
    client ids of the state directory's earlier processes; ``events`` hears them join
    and leave."""
    state_dir = Path(config.server.state_dir)
    allowlist_size = len(load_allowlist(config.server.allowlist))
    enrollment = Enrollment(authenticator, config.server.allowlist, ids_file=state_dir / IDS_FILE)
    registry = ClientRegistry()
    if events is not None:
        bus = events
        registry.on_join = lambda s: bus.site_connected(s.client_id, s.site)
        registry.on_leave = lambda s, why: bus.site_disconnected(s.client_id, s.site, why)
    enrollment.on_revoke = lambda name, client_id, reason: registry.revoke(client_id, reason)
    plaintext = config.server.insecure
    transport = GrpcTransport(
        registry,
        config.run.stage_timeout_s,
        digest=plaintext or config.server.payload_digest == "always",
    )
    metrics = CoordinatorMetrics(registry)
    limits = JoinLimits(
        per_peer=config.server.max_joins_per_peer,
        total=config.server.max_joins,
        rate_per_s=config.server.joins_per_peer_per_s,
        burst=config.server.join_burst_per_peer,
    )
    servicer = CoordinatorServicer(
        registry,
        authenticator,
        config.server.max_payload_mb << 20,
        handshake_timeout_s=config.server.handshake_timeout_s,
        require_digest=plaintext,
        payload_sent=metrics.bytes_sent.inc,
        payload_received=metrics.bytes_received.inc,
        upload_budget=config.server.max_inflight_upload_mb << 20,
        client_id=enrollment.client_id,
        join_limits=limits,
        refresh=enrollment.refresh,
    )
    # A worker per stream: two per site (a reconnect overlaps its old stream for a while),
    # every join the limits let be in progress, and room for as many sites again enrolled
    # while it runs (threads start only when needed).
    workers = 4 * max(allowlist_size, 16) + limits.total + 8
    try:
        server, port = start_server(config.server, servicer, max_workers=workers)
    except BaseException:
        enrollment.close()
        metrics.close()
        raise
    log.info("coordinator listening on port %d", port)
    enrollment.watch(config.server.allowlist_poll_s)
    restore_sighup = _reload_on_sighup(enrollment)
    try:
        if config.server.metrics_port is not None:
            metrics_address = config.server.metrics_address or "127.0.0.1"
            metrics_port = metrics.serve(config.server.metrics_port, metrics_address)
            log.info("metrics on http://%s:%d/metrics", metrics_address, metrics_port)
        if on_ready is not None:
            on_ready(port)
        yield SiteService(registry, transport, enrollment, metrics, port)
    finally:
        restore_sighup()
        enrollment.close()
        server.stop(grace=2).wait()
        metrics.close()


def _reload_on_sighup(enrollment: Enrollment) -> Callable[[], None]:
    """In the main thread, make SIGHUP re-read the allowlist now; returns what puts the
    previous handler back (nothing to do outside the main thread, where Python handles
    no signals)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGHUP)
    signal.signal(signal.SIGHUP, lambda signum, frame: enrollment.poke())

    def restore() -> None:
        signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)

    return restore
