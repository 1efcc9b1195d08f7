"""The site daemon: dials out to the coordinator, proves its identity, answers tasks.

It runs the site's ClientApp through the same ClientRuntime as every simulation, so the
same app gives the same update in both. Raw data never leaves: only the arrays the app
returns are sent. Tasks run one at a time while a reader thread keeps taking messages off
the stream, so a Cancel takes effect at once: a queued task it names is skipped and a
running one's reply is dropped. Connection faults are retried forever with exponential
backoff and full jitter; a refused join (unknown or revoked key, version mismatch) is fatal,
a lapsed challenge (ABORTED) or a coordinator busy with other joins (RESOURCE_EXHAUSTED)
is retried.

Before each join over TLS the site verifies the coordinator's certificate on a TLS
connection of its own (:mod:`fedlearn.deploy.probe`) and signs the join proof over that
certificate's SHA-256, so a proof made for one coordinator is refused by any other. A
coordinator that calls itself by another ``server_id`` than the one pinned in the site's
config gets no proof at all. A coordinator that cannot do TLS as configured (a plaintext
one, one with an untrusted certificate, one that wants a client certificate the site does
not have), or a TLS coordinator dialled by a plaintext site, stops the site with an error
that says what to change, instead of retrying forever.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlearn.deploy.probe import peer_certificate_sha256, speaks_tls
from fedlearn.engine.client_app import ClientApp
from fedlearn.engine.client_state import ClientStateStore
from fedlearn.engine.records import decode_arrays, encode_arrays_parts
from fedlearn.engine.runtime import ClientRuntime
from fedlearn.errors import AuthError, ConfigError, SerializationError
from fedlearn.privacy.local import LocalDPFloor
from fedlearn.security.auth import sign_challenge
from fedlearn.security.certs import load_server_pem
from fedlearn.security.keys import public_key_bytes
from fedlearn.wire import CAPABILITIES, PROTOCOL_VERSION
from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire import fedlearn_pb2_grpc as pb_grpc
from fedlearn.wire.chunks import (
    Assembler,
    ChunkLike,
    ChunkMessage,
    Digest,
    ReceiveBuffers,
    frames,
)
from fedlearn.wire.convert import reply_to_proto, task_from_proto

log = logging.getLogger("fedlearn.site")

Outbox = queue.Queue[pb.ClientMessage | Iterator[bytes] | None]
"""What the stream sends: messages, and serialized chunk messages (fedlearn.wire.codec)."""

FATAL = {
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
}


class _Unreachable(Exception):
    """The coordinator could not be reached for the TLS probe (retried with backoff)."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter: ``uniform(0, min(cap, initial * 2**attempt))``."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return rng.uniform(0, min(self.max_s, self.initial_s * 2.0 ** min(attempt, 32)))


class SiteClient:
    """A long-lived site: connect, authenticate, serve tasks, reconnect on faults."""

    def __init__(
        self,
        address: str,
        app: ClientApp,
        key: Ed25519PrivateKey,
        site_name: str,
        *,
        root_certificates: bytes | None,
        server_name: str | None = None,
        backoff: Backoff = Backoff(),
        exit_when_finished: bool = False,
        max_payload: int = 1 << 42,
        always_digest: bool = False,
        client_cert_files: tuple[str, str] | None = None,
        server_id: str | None = None,
        local_dp_floor: LocalDPFloor | None = None,
        states: ClientStateStore | None = None,
    ) -> None:
        self.address = address
        self.client_cert_files = client_cert_files
        """Mutual TLS: this site's client certificate and its key (PEM files)."""
        self.client_cert = (
            None if client_cert_files is None else load_server_pem(*client_cert_files)
        )
        self.server_id = server_id
        """The coordinator's expected server_id (None: whatever it says)."""
        self.server_cert_sha256: bytes | None = None
        """The certificate the coordinator presented to this connection's probe."""
        self.runtime = ClientRuntime(app, local_dp_floor=local_dp_floor, states=states)
        """Runs each task; with ``local_dp_floor`` (``[privacy]`` of site.toml) every update
        is clipped and noised here at least that much, whatever the coordinator asks. The
        app's own state (``ctx.state``) lives in ``states`` (default: this process)."""
        self.key = key
        self.site_name = site_name
        self.root_certificates = root_certificates
        self.server_name = server_name
        self.backoff = backoff
        self.exit_when_finished = exit_when_finished
        self.max_payload = max_payload
        # plaintext: every payload carries and needs a SHA-256; TLS authenticates each
        # record, so a digest is then sent only with always_digest and checked if present
        self.digest = root_certificates is None or always_digest
        self.require_digest = root_certificates is None
        self.client_id: int | None = None
        self.joined = False
        """Whether the current (or last) connection got past its join."""
        self.tasks_done = 0
        self.tasks_skipped = 0
        self.buffers = ReceiveBuffers()
        """Task payload buffers: reused once the app and the reply let go of the arrays."""
        self._rng = random.Random()

    def _channel(self) -> grpc.Channel:
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", 8 << 20)]
        if self.root_certificates is None:
            return grpc.insecure_channel(self.address, options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=None if self.client_cert is None else self.client_cert.private_key,
            certificate_chain=None
            if self.client_cert is None
            else self.client_cert.certificate_chain,
        )
        return grpc.secure_channel(self.address, creds, options)

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set (or the run ends, with ``exit_when_finished``)."""
        stop = stop or threading.Event()
        attempt = 0
        while not stop.is_set():
            try:
                finished = self.serve_once(stop)
                attempt = 0
                if finished and self.exit_when_finished:
                    return
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                if code in FATAL:
                    detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
                    if self.joined:  # say, revoked while connected
                        raise AuthError(
                            f"the coordinator ended this site's session: {detail}"
                        ) from exc
                    raise AuthError(f"coordinator refused the join: {detail}") from exc
                if (
                    code == grpc.StatusCode.UNAVAILABLE
                    and self.root_certificates is None
                    and speaks_tls(self.address)
                ):
                    raise ConfigError(
                        f"the coordinator at {self.address} speaks TLS, but this site is set "
                        "to plaintext (coordinator.insecure = true, or --insecure): remove "
                        "insecure and set coordinator.ca to the CA that signed its certificate"
                    ) from exc
                log.info("connection to %s lost (%s); retrying", self.address, code)
            except _Unreachable as exc:
                log.info("cannot reach %s (%s); retrying", self.address, exc)
            delay = self.backoff.delay(attempt, self._rng)
            attempt += 1
            stop.wait(delay)

    def serve_once(self, stop: threading.Event) -> bool:
        """One connection: returns True when the coordinator said the run is finished."""
        self.joined = False
        if self.root_certificates is not None:
            try:
                self.server_cert_sha256 = peer_certificate_sha256(
                    self.address,
                    self.root_certificates,
                    server_name=self.server_name,
                    client_cert_files=self.client_cert_files,
                )
            except OSError as exc:  # refused, reset, timed out: down for now, not misconfigured
                raise _Unreachable(str(exc) or type(exc).__name__) from exc
        outbox: Outbox = queue.Queue()
        outbox.put(
            pb.ClientMessage(
                hello=pb.Hello(
                    protocol_version=PROTOCOL_VERSION,
                    capabilities=list(CAPABILITIES),
                    public_key=public_key_bytes(self.key),
                    site_name=self.site_name,
                )
            )
        )

        def requests() -> Iterator[pb.ClientMessage | bytes]:
            while True:
                item = outbox.get()
                if item is None:
                    return
                if isinstance(item, pb.ClientMessage):
                    yield item
                else:
                    yield from item

        with self._channel() as channel:
            stub = pb_grpc.CoordinatorStub(channel)  # type: ignore[no-untyped-call]
            responses = stub.Connect(requests())
            done = threading.Event()
            stopper = threading.Thread(target=_cancel_on, args=(stop, done, responses), daemon=True)
            stopper.start()
            try:
                return self._serve(responses, outbox)
            finally:
                done.set()
                outbox.put(None)

    def _serve(self, responses: Iterator[pb.ServerMessage | ChunkMessage], outbox: Outbox) -> bool:
        # A reader thread takes messages off the stream while a task trains, so a Cancel
        # is seen at once: a task cancelled before it starts is skipped, and the reply of
        # one cancelled while it ran is not sent.
        inbox: queue.Queue[pb.ServerMessage | ChunkMessage | BaseException | None] = queue.Queue()
        cancelled: set[str] = set()
        reader = threading.Thread(
            target=_read_ahead, args=(responses, inbox, cancelled), daemon=True
        )
        reader.start()
        header: pb.TaskHeader | None = None
        assembler: Assembler | None = None
        while True:
            message = inbox.get()
            if message is None:
                return False
            if isinstance(message, BaseException):
                raise message
            kind = message.WhichOneof("kind")
            if kind == "chunk":  # a ChunkMessage (fedlearn.wire.codec), or protobuf's
                if (
                    header is not None
                    and assembler is not None
                    and self._on_chunk(header, assembler, message.chunk, outbox, cancelled)
                ):
                    header = assembler = None
                continue
            assert isinstance(message, pb.ServerMessage)  # every other kind is protobuf's
            if kind == "challenge":
                server_id = message.challenge.server_id
                if self.server_id is not None and server_id != self.server_id:
                    raise ConfigError(
                        f"the coordinator at {self.address} calls itself {server_id!r}, but "
                        f"this site expects {self.server_id!r} (coordinator.server_id): it is "
                        "another coordinator, or its server_id changed; the site did not sign "
                        "anything"
                    )
                signature = sign_challenge(
                    self.key,
                    server_id,
                    bytes(message.challenge.nonce),
                    self.server_cert_sha256,
                )
                outbox.put(pb.ClientMessage(proof=pb.Proof(signature=signature)))
            elif kind == "welcome":
                self.client_id = message.welcome.client_id
                self.joined = True
                log.info("joined as client %d", self.client_id)
            elif kind == "task_header":
                header, assembler = message.task_header, None
                try:
                    assembler = Assembler(
                        header.task_id,
                        header.payload_size,
                        self.max_payload,
                        self.buffers,
                        require_digest=self.require_digest,
                    )
                except SerializationError as exc:
                    self._refuse(header, f"task payload refused: {exc}", outbox)
                    header = None
                    continue
                if header.payload_size == 0:
                    self._answer(header, assembler, outbox, cancelled)
                    header = assembler = None
            elif kind == "cancel":
                if not message.cancel.task_id:
                    log.info("coordinator: %s", message.cancel.reason)
                    return True
                log.info("task %s cancelled: %s", message.cancel.task_id, message.cancel.reason)

    def _on_chunk(
        self,
        header: pb.TaskHeader,
        assembler: Assembler,
        chunk: ChunkLike,
        outbox: Outbox,
        cancelled: set[str],
    ) -> bool:
        """Add ``chunk`` to the task's payload; True once the task is answered or refused."""
        try:
            assembler.add(chunk)
        except SerializationError as exc:
            self._refuse(header, f"task payload refused: {exc}", outbox)
            return True
        if chunk.last:
            self._answer(header, assembler, outbox, cancelled)
            return True
        return False

    def _answer(
        self,
        header: pb.TaskHeader,
        assembler: Assembler,
        outbox: Outbox,
        cancelled: set[str],
    ) -> None:
        if self.client_id is None:
            raise SerializationError("task received before the join completed")
        if header.task_id in cancelled:
            log.info("task %s skipped: cancelled before it started", header.task_id)
            self.tasks_skipped += 1
            return
        try:
            task = task_from_proto(header, client_id=self.client_id)
            payload = assembler.finish()
            split_at = header.payload_size - header.message_size
            arrays = decode_arrays(payload[:split_at])
            if header.message_size:  # a protocol message follows the arrays
                task = replace(task, payload=bytes(payload[split_at:]))
        except SerializationError as exc:
            self._refuse(header, f"malformed task: {exc}", outbox)
            return
        reply = self.runtime.handle(task, arrays)
        if header.task_id in cancelled:
            log.info("task %s finished after its cancel: reply not sent", header.task_id)
            self.tasks_skipped += 1
            return
        try:
            parts = [
                *(encode_arrays_parts(reply.arrays) if reply.arrays is not None else []),
                reply.payload,
            ]
            reply_header = reply_to_proto(
                reply,
                task_id=header.task_id,
                payload_size=sum(len(p) for p in parts),
                message_size=len(reply.payload),
            )
        except SerializationError as exc:
            # What the app returned cannot travel (say, an object array): fail this task,
            # never the daemon.
            self._refuse(header, f"the reply cannot be sent: {exc}", outbox)
            return
        # hashed on another thread while the chunks go out
        digest = Digest(parts) if self.digest else None
        outbox.put(pb.ClientMessage(reply_header=reply_header))
        outbox.put(frames(parts, header.task_id, digest))
        self.tasks_done += 1

    def _refuse(self, header: pb.TaskHeader, error: str, outbox: Outbox) -> None:
        """Answer ``header``'s task with a failure (no payload)."""
        log.warning("task %s failed: %s", header.task_id, error)
        outbox.put(
            pb.ClientMessage(
                reply_header=pb.ReplyHeader(
                    task_id=header.task_id,
                    stage=header.stage,
                    round=header.round,
                    error=error.encode("utf-8", "replace").decode("utf-8"),
                    payload_size=0,
                )
            )
        )


def _read_ahead(
    responses: Iterator[pb.ServerMessage | ChunkMessage],
    inbox: queue.Queue[pb.ServerMessage | ChunkMessage | BaseException | None],
    cancelled: set[str],
) -> None:
    """Move the stream's messages to ``inbox`` (then None, or the error that ended it),
    noting cancelled task ids as they arrive."""
    try:
        for message in responses:
            if message.WhichOneof("kind") == "cancel":
                assert isinstance(message, pb.ServerMessage)
                if message.cancel.task_id:
                    cancelled.add(message.cancel.task_id)
            inbox.put(message)
    except BaseException as exc:  # the stream's error goes to the serving thread
        inbox.put(exc)
    else:
        inbox.put(None)


def _cancel_on(stop: threading.Event, done: threading.Event, call: object) -> None:
    while not done.is_set():
        if stop.wait(0.2):
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()
            return
