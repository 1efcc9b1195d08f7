"""Builds a real deployment on loopback for tests: PKI, site keys, allowlist, configs."""

from __future__ import annotations

import functools
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
from fedlearn.config.loading import load_toml
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.deploy.launch import build_site
from fedlearn.deploy.server import run_coordinator
from fedlearn.deploy.servicer import CoordinatorServicer
from fedlearn.deploy.sessions import ClientRegistry, Session
from fedlearn.deploy.site import SiteClient
from fedlearn.deploy.transport import GrpcTransport
from fedlearn.engine.messages import Reply
from fedlearn.engine.records import Arrays, decode_arrays, encode_arrays
from fedlearn.engine.references import resolve
from fedlearn.engine.results import RunResult
from fedlearn.engine.runtime import ClientRuntime
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import save_weights
from fedlearn.security.auth import sign_challenge
from fedlearn.security.certs import (
    SiteCertPaths,
    leaf_sha256,
    load_pem,
    write_dev_pki,
    write_site_cert,
)
from fedlearn.security.keys import (
    allowlist_entry_toml,
    generate_site_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
)
from fedlearn.wire import PROTOCOL_VERSION
from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire.chunks import MAX_CHUNK, Assembler, split
from fedlearn.wire.convert import reply_to_proto, task_from_proto

ROOT = Path(__file__).resolve().parents[1]
APP = "clients.tabular:make_app"
PARAMS = {"epochs": 1, "batch_size": 16, "lr": 0.1}
DATA = {"dataset": "breast_cancer", "partitioner": "iid"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _table(values: dict[str, object]) -> str:
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in values.items()) + " }"


def simulated_data(num_sites: int, seed: int = 0):  # type: ignore[no-untyped-def]
    return partition_dataset(load_dataset(DATA["dataset"]), DATA["partitioner"], num_sites, seed)


@dataclass
class Deployment:
    root: Path
    num_sites: int = 3
    rounds: int = 3
    seed: int = 0
    strategy: str = "fedavg"
    stage_timeout_s: float = 60.0
    min_clients: int | None = None
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    app: str = APP  # the sites' client.app ("module:factory")
    params: dict[str, object] = field(default_factory=lambda: dict(PARAMS))  # client.params
    strategy_params: dict[str, object] = field(default_factory=lambda: {"min_train_clients": 1})
    mtls: bool = False
    """Mutual TLS: the coordinator requires client certificates from the harness CA, and
    each site's config names its own (``site_tls``)."""

    def __post_init__(self) -> None:
        self.pki = write_dev_pki(
            self.root / "pki", ["localhost", "127.0.0.1", "::1"], keep_ca_key=True
        )
        entries = []
        for i in range(self.num_sites):
            key = generate_site_key()
            save_private_key(self.root / f"site-{i}.key", key)
            entries.append(allowlist_entry_toml(f"site-{i}", public_key_bytes(key)))
        (self.root / "sites.toml").write_text("\n".join(entries))
        make_app = resolve(self.app, "client.app")
        app = make_app(simulated_data(self.num_sites, self.seed), **self.params)
        self.initial = app.initial_arrays(self.seed)
        save_weights(self.initial, self.root / "init.safetensors")
        self.write_coordinator_config()
        for i in range(self.num_sites):
            self.write_site_config(i)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def site_tls(self, i: int) -> SiteCertPaths:
        """Site ``i``'s client certificate and key from the harness CA (made once)."""
        paths = SiteCertPaths(
            self.root / "pki" / f"site-{i}-tls.pem", self.root / "pki" / f"site-{i}-tls.key"
        )
        if not paths.cert.exists():
            write_site_cert(self.root / "pki", f"site-{i}", self.root / "pki")
        return paths

    def write_coordinator_config(self, **run: object) -> Path:
        settings: dict[str, object] = {
            "seed": self.seed,
            "rounds": self.rounds,
            "min_clients": self.min_clients or self.num_sites,
            "join_timeout_s": 60,
            "stage_timeout_s": self.stage_timeout_s,
        }
        settings.update(run)
        path = self.root / "coordinator.toml"
        path.write_text(
            f"""
[server]
address = "127.0.0.1:{self.port}"
cert = "{self.pki.server_cert}"
key = "{self.pki.server_key}"
{f'client_ca = "{self.pki.ca_cert}"' if self.mtls else ""}
allowlist = "{self.root / "sites.toml"}"
state_dir = "{self.state_dir}"

[run]
{chr(10).join(f"{k} = {_toml_value(v)}" for k, v in settings.items())}

[model]
weights = "{self.root / "init.safetensors"}"

[strategy]
name = "{self.strategy}"
params = {_table(self.strategy_params)}
"""
        )
        return path

    def write_site_config(self, i: int, key: Path | None = None, **extra: object) -> Path:
        path = self.root / f"site-{i}.toml"
        tls = self.site_tls(i) if self.mtls else None
        client_cert = "" if tls is None else f'cert = "{tls.cert}"\nkey = "{tls.key}"'
        path.write_text(
            f"""
[coordinator]
address = "127.0.0.1:{self.port}"
ca = "{self.pki.ca_cert}"
{client_cert}
backoff_initial_s = 0.2
backoff_max_s = 1.0
exit_when_finished = true

[site]
name = "site-{i}"
key = "{key or self.root / f"site-{i}.key"}"

[data]
num_clients = {self.num_sites}
seed = {self.seed}
simulated = {_table(DATA)}

[client]
app = "{self.app}"
params = {_table(self.params | dict(extra))}
"""
        )
        return path

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        # tests/ too, so a site can name a test app ("fault_apps:make_app")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlearn.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(proc)
        return proc

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        return self._spawn("server", "--config", str(self.root / "coordinator.toml"))

    def start_site(self, i: int) -> subprocess.Popen[bytes]:
        return self._spawn("client", "--config", str(self.root / f"site-{i}.toml"))

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace")

    def wait_for_port(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"coordinator did not listen on {self.port}")

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


# ------------------------------------------------------------------ in-process coordinator
#
# For fault tests: ``run_coordinator`` in a thread (TLS, the harness's configs), with its
# session registry, transport and servicer at hand, and raw gRPC streams that can send
# anything a misbehaving site might.

FAULT_APP = "fault_apps:make_app"
FAULT_PARAMS: dict[str, object] = {"lr": 0.5}


@dataclass
class Running:
    """A coordinator running in a thread of this process."""

    deployment: Deployment
    thread: threading.Thread
    stop: threading.Event
    port: int = 0
    registry: ClientRegistry | None = None
    transport: GrpcTransport | None = None
    servicer: CoordinatorServicer | None = None
    result: RunResult | None = None
    error: BaseException | None = None
    sites: list[tuple[SiteClient, threading.Thread, threading.Event]] = field(default_factory=list)

    def wait(self, timeout: float = 60) -> RunResult:
        """The run's result (re-raising what it raised)."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the coordinator did not finish in time"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def channel(self) -> TlsChannel:
        """A TLS channel to the coordinator, trusting the harness CA (with the harness
        site certificate of site ``0`` under mutual TLS)."""
        d = self.deployment
        client = d.site_tls(0) if d.mtls else None
        creds = grpc.ssl_channel_credentials(
            root_certificates=load_pem(d.pki.ca_cert),
            private_key=None if client is None else client.key.read_bytes(),
            certificate_chain=None if client is None else client.cert.read_bytes(),
        )
        return TlsChannel(
            grpc.secure_channel(f"127.0.0.1:{self.port}", creds),
            leaf_sha256(load_pem(d.pki.server_cert)),
        )

    def start_site(self, i: int, **params: object) -> SiteClient:
        """Run site ``i`` as a SiteClient thread (``params``: extra client params)."""
        d = self.deployment
        path = d.write_site_config(i, **params) if params else d.root / f"site-{i}.toml"
        site = build_site(load_toml(SiteConfig, path))
        stop = threading.Event()
        thread = threading.Thread(target=site.run, args=(stop,), daemon=True, name=f"site-{i}")
        thread.start()
        self.sites.append((site, thread, stop))
        return site

    def wait_joined(
        self, client_id: int, other_than: Session | None = None, timeout: float = 20.0
    ) -> Session:
        """The live session of ``client_id`` once there is one (other than ``other_than``)."""
        assert self.registry is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            session = self.registry.get(client_id)
            if session is not None and session is not other_than:
                return session
            time.sleep(0.01)
        raise TimeoutError(f"client {client_id} did not join")

    def store(self) -> RunStore:
        return RunStore(self.deployment.state_dir / "run.db", run_id="run")


@contextmanager
def in_process_coordinator(
    d: Deployment,
    overrides: dict[str, Any] | None = None,
    observer: Any = None,
    handshake_timeout_s: float | None = None,
) -> Iterator[Running]:
    """Start ``run_coordinator`` on ``d``'s coordinator.toml (plus ``overrides``)."""
    import fedlearn.deploy.server as server_mod

    config = load_toml(CoordinatorConfig, d.root / "coordinator.toml", overrides)
    stopping = threading.Event()
    running = Running(d, threading.Thread(), threading.Event())
    ready = threading.Event()

    class Registry(ClientRegistry):
        def __init__(self) -> None:
            super().__init__()
            running.registry = self

        def wait_for(self, count: int, timeout: float | None) -> bool:
            deadline = time.monotonic() + (timeout or 3600.0)
            while not stopping.is_set() and time.monotonic() < deadline:
                if super().wait_for(count, 0.05):
                    return True
            return False

    class Transport(GrpcTransport):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            running.transport = self

    class Servicer(CoordinatorServicer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            if handshake_timeout_s is not None:
                kwargs["handshake_timeout_s"] = handshake_timeout_s
            super().__init__(*args, **kwargs)
            running.servicer = self

    def on_ready(port: int) -> None:
        running.port = port
        ready.set()

    def target() -> None:
        try:
            running.result = run_coordinator(
                config, stop=running.stop, on_ready=on_ready, observer=observer
            ).result
        except BaseException as exc:
            running.error = exc
        finally:
            ready.set()

    saved = (server_mod.ClientRegistry, server_mod.GrpcTransport, server_mod.CoordinatorServicer)
    server_mod.ClientRegistry, server_mod.GrpcTransport, server_mod.CoordinatorServicer = (  # type: ignore[misc]
        Registry,
        Transport,
        Servicer,
    )
    try:
        running.thread = threading.Thread(target=target, daemon=True, name="coordinator")
        running.thread.start()
        assert ready.wait(30), "the coordinator did not start"
    finally:
        server_mod.ClientRegistry, server_mod.GrpcTransport, server_mod.CoordinatorServicer = (  # type: ignore[misc]
            saved
        )
    if running.error is not None:
        raise running.error
    try:
        yield running
    finally:
        running.stop.set()
        stopping.set()
        for _, _, stop in running.sites:
            stop.set()
        for _, thread, _ in running.sites:
            thread.join(10)
        running.thread.join(30)


class TlsChannel:
    """A gRPC channel and the SHA-256 of the certificate its server presents, which a
    join proof on it must cover (what a SiteClient learns from its TLS probe)."""

    def __init__(self, channel: grpc.Channel, server_cert_sha256: bytes) -> None:
        self.channel = channel
        self.server_cert_sha256 = server_cert_sha256

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channel, name)

    def __enter__(self) -> TlsChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()


def _serialize(message: pb.ClientMessage | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


class RawStream:
    """One ``Connect`` stream driven by hand: any message, or any bytes, in any order."""

    def __init__(self, channel: grpc.Channel | TlsChannel, timeout: float = 30.0) -> None:
        self.server_cert_sha256: bytes | None = getattr(channel, "server_cert_sha256", None)
        """What a proof on this stream covers (None: a plaintext channel)."""
        self._out: queue.Queue[pb.ClientMessage | bytes | None] = queue.Queue()
        connect = channel.stream_stream(
            "/fedlearn.v1.Coordinator/Connect",
            request_serializer=_serialize,
            response_deserializer=pb.ServerMessage.FromString,
        )
        self.call = connect(self._requests(), timeout=timeout)
        self.cancels: list[pb.Cancel] = []

    def _requests(self) -> Iterator[pb.ClientMessage | bytes]:
        while True:
            item = self._out.get()
            if item is None:
                return
            yield item

    def send(self, *messages: pb.ClientMessage | bytes) -> None:
        for message in messages:
            self._out.put(message)

    def close(self) -> None:
        """Half-close: the site sends nothing more."""
        self._out.put(None)

    def recv(self) -> pb.ServerMessage:
        return next(self.call)  # type: ignore[no-any-return]

    def cancel(self) -> None:
        """Drop the stream at once, as a crashed site would."""
        self.call.cancel()
        self.close()

    def status(self, half_close: bool = True) -> tuple[grpc.StatusCode, str]:
        """Read to the end of the stream (first saying that the site has said all, unless
        ``half_close`` is False); its status code and details."""
        if half_close:
            self.close()
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as exc:
            return exc.code(), exc.details()  # type: ignore[attr-defined]
        finally:
            self.close()
        return self.call.code(), self.call.details()

    def recv_task(self) -> tuple[pb.TaskHeader, Arrays] | None:
        """The next task and its arrays (Cancels are collected); None when the run ends."""
        task = self.recv_task_message()
        return None if task is None else task[:2]

    def recv_task_message(self) -> tuple[pb.TaskHeader, Arrays, bytes] | None:
        """The next task, its arrays and its protocol message (secure aggregation's; b""
        for train and evaluate); Cancels are collected; None when the run ends."""
        while True:
            message = self.recv()
            kind = message.WhichOneof("kind")
            if kind == "cancel":
                if not message.cancel.task_id:
                    self.close()  # the run is over: say so, as a site does
                    return None
                self.cancels.append(message.cancel)
            elif kind == "task_header":
                header = message.task_header
                assembler = Assembler(
                    header.task_id, header.payload_size, 1 << 30, require_digest=False
                )  # TLS: the coordinator sends no digest
                while not assembler.complete:
                    assembler.add(self.recv().chunk)
                payload = assembler.finish()
                split_at = header.payload_size - header.message_size
                return header, decode_arrays(payload[:split_at]), bytes(payload[split_at:])

    def recv_cancel(self) -> pb.Cancel:
        """The next Cancel of a task."""
        while True:
            message = self.recv()
            if message.WhichOneof("kind") == "cancel":
                self.cancels.append(message.cancel)
                return message.cancel

    def send_upload(self, header: pb.ReplyHeader, chunks: list[pb.Chunk]) -> None:
        self.send(pb.ClientMessage(reply_header=header))
        self.send(*(pb.ClientMessage(chunk=c) for c in chunks))

    def reply(self, task_id: str, reply: Reply, chunk_size: int = MAX_CHUNK) -> None:
        """Send ``reply`` to ``task_id`` as a well-formed upload."""
        self.send_upload(*upload(task_id, reply, chunk_size))


def upload(
    task_id: str, reply: Reply, chunk_size: int = MAX_CHUNK
) -> tuple[pb.ReplyHeader, list[pb.Chunk]]:
    """The header and chunks a well-behaved site sends for ``reply`` (to tamper with)."""
    arrays = encode_arrays(reply.arrays) if reply.arrays is not None else b""
    payload = arrays + reply.payload  # a protocol message (secure aggregation) follows
    header = reply_to_proto(
        reply,
        task_id=task_id,
        payload_size=len(payload),
        message_size=len(reply.payload),
    )
    return header, list(split(payload, task_id, chunk_size))


def hello(key: Ed25519PrivateKey, version: int = PROTOCOL_VERSION) -> pb.ClientMessage:
    return pb.ClientMessage(
        hello=pb.Hello(protocol_version=version, public_key=public_key_bytes(key), site_name="x")
    )


def proof(signature: bytes) -> pb.ClientMessage:
    return pb.ClientMessage(proof=pb.Proof(signature=signature))


def sign(stream: RawStream, key: Ed25519PrivateKey, challenge: pb.Challenge) -> bytes:
    """The proof an honest site sends on ``stream`` to answer ``challenge``."""
    return sign_challenge(
        key, challenge.server_id, bytes(challenge.nonce), stream.server_cert_sha256
    )


def join(stream: RawStream, key: Ed25519PrivateKey) -> tuple[pb.Welcome, bytes]:
    """Hello, Challenge, Proof, Welcome; returns the Welcome and the signature sent."""
    stream.send(hello(key))
    challenge = stream.recv().challenge
    signature = sign(stream, key, challenge)
    stream.send(proof(signature))
    message = stream.recv()
    assert message.WhichOneof("kind") == "welcome", message
    return message.welcome, signature


@functools.cache
def _fault_runtime(num_sites: int, seed: int) -> ClientRuntime:
    make_app = resolve(FAULT_APP, "client.app")
    return ClientRuntime(make_app(simulated_data(num_sites, seed), **FAULT_PARAMS))


def genuine(
    d: Deployment,
    header: pb.TaskHeader,
    arrays: Arrays,
    client_id: int = 2,
    message: bytes = b"",
    runtime: ClientRuntime | None = None,
) -> Reply:
    """The reply an honest fault-app site ``client_id`` of ``d`` sends to this task (with
    its protocol ``message``; ``runtime``: one of the site's own, for secure rounds, where
    a runtime keeps each client's secrets between stages)."""
    task = replace(task_from_proto(header, client_id=client_id), payload=message)
    return (runtime or _fault_runtime(d.num_sites, d.seed)).handle(task, arrays)


def fault_runtime(d: Deployment) -> ClientRuntime:
    """A fresh runtime of the fault app on ``d``'s data (one per raw-stream site)."""
    make_app = resolve(FAULT_APP, "client.app")
    return ClientRuntime(make_app(simulated_data(d.num_sites, d.seed), **FAULT_PARAMS))


def site_key(d: Deployment, i: int) -> Ed25519PrivateKey:
    return load_private_key(d.root / f"site-{i}.key")


def reader_threads() -> int:
    """Live servicer reader threads (one per open stream)."""
    return sum(t.name == "fedlearn-reader" for t in threading.enumerate())
