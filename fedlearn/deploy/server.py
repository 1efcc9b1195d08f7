"""The coordinator daemon: serve gRPC, admit enrolled sites, run rounds, keep durable state.

``run_coordinator`` builds the pieces (allowlist, authenticator, session registry, gRPC
transport, SQLite run store) and drives the same :class:`Coordinator` loop as simulations.
Every round commits the model and strategy state atomically; the same command after a
crash resumes after the last committed round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from fedlearn.config.deployment import CoordinatorConfig, ServerSection
from fedlearn.deploy.metrics import CoordinatorMetrics
from fedlearn.deploy.servicer import CoordinatorServicer
from fedlearn.deploy.sessions import ClientRegistry
from fedlearn.deploy.transport import GrpcTransport
from fedlearn.engine.coordinator import Coordinator, Observer, Observers, RoundSink
from fedlearn.engine.records import Arrays
from fedlearn.engine.references import resolve
from fedlearn.engine.results import RunResult
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights, save_weights
from fedlearn.errors import ConfigError, RoundFailed
from fedlearn.run.builders import make_secure, make_strategy
from fedlearn.security.auth import Authenticator
from fedlearn.security.certs import load_server_pem
from fedlearn.security.keys import load_allowlist
from fedlearn.wire import fedlearn_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from fedlearn.registry.publish import Publisher

log = logging.getLogger("fedlearn.server")

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
]


def start_server(
    section: ServerSection, servicer: CoordinatorServicer, max_workers: int
) -> tuple[grpc.Server, int]:
    """Bind and start the gRPC server (TLS unless ``insecure``); returns it and its port."""
    server = grpc.server(ThreadPoolExecutor(max_workers=max_workers), options=GRPC_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    if section.insecure:
        port = server.add_insecure_port(section.address)
    else:
        assert section.cert is not None and section.key is not None
        pem = load_server_pem(section.cert, section.key)
        creds = grpc.ssl_server_credentials([(pem.private_key, pem.certificate_chain)])
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
) -> RunResult:
    """Serve, wait for sites, run (or resume) the configured run, then say goodbye."""
    allowlist = load_allowlist(config.server.allowlist)
    authenticator = Authenticator(allowlist, config.server.server_id)
    registry = ClientRegistry()
    plaintext = config.server.insecure
    transport = GrpcTransport(
        registry,
        config.run.stage_timeout_s,
        digest=plaintext or config.server.payload_digest == "always",
    )
    servicer = CoordinatorServicer(
        registry,
        authenticator,
        config.server.max_payload_mb << 20,
        handshake_timeout_s=config.server.handshake_timeout_s,
        require_digest=plaintext,
    )
    strategy = make_strategy(config.strategy)
    state_dir = Path(config.server.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(state_dir / "run.db", run_id=config.run.name, checkpoint=True)
    publisher: Publisher | None = None
    sink: RoundSink = store
    if config.publish.enabled:  # imported only then: the registry and its dependencies
        from fedlearn.registry.publish import Publisher, PublishingSink, serving_spec

        publisher = Publisher(
            config.publish,
            config.run.name,
            serving_spec(config.publish, None),
            Path(config.publish.registry or state_dir / "registry"),
        )
        sink = PublishingSink(store, publisher, config.publish.every)
    metrics = CoordinatorMetrics(registry)
    server, port = start_server(config.server, servicer, max_workers=2 * len(allowlist) + 8)
    log.info("coordinator listening on port %d", port)
    if config.server.metrics_port is not None:
        metrics_port = metrics.serve(config.server.metrics_port)
        log.info("metrics on http://127.0.0.1:%d/metrics", metrics_port)
    if on_ready is not None:
        on_ready(port)
    try:
        checkpoint = store.resume_run(config.run.seed, config.model_dump())
        if checkpoint is None:
            start, arrays, state = 1, initial_arrays(config), None
        else:
            start, arrays, state = checkpoint[0] + 1, checkpoint[1], checkpoint[2]
            log.info("resuming after committed round %d", checkpoint[0])

        def before_round(rnd: int) -> None:
            if stop is not None and stop.is_set():
                raise RoundFailed("coordinator stopping")
            if not registry.wait_for(config.run.min_clients, config.run.join_timeout_s):
                raise RoundFailed(
                    f"round {rnd}: fewer than {config.run.min_clients} sites connected "
                    f"within {config.run.join_timeout_s} s"
                )

        coordinator = Coordinator(
            strategy,
            transport,
            list(range(len(allowlist))),
            config.run.rounds,
            seed=config.run.seed,
            evaluate_every=config.run.evaluate_every,
            sink=sink,
            observer=Observers(metrics, observer),
            available=registry.available,
            before_round=before_round,
            secure=make_secure(config.secagg),
            hold_bytes=config.server.hold_replies_mb << 20,
        )
        # handed over, not copied: one copy of the model fewer for the whole run
        result = coordinator.run(arrays, state, start, copy=False)
        save_weights(result.arrays, state_dir / "model.safetensors", {"run": config.run.name})
        if publisher is not None:
            publisher.publish_final(result.arrays, result.rounds, result.clients)
        store.finish_run("finished")
        registry.close_all("run finished")
        return result
    finally:
        server.stop(grace=2).wait()
        metrics.close()
        store.close()
