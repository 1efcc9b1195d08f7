"""The coordinator's gRPC servicer: a thin shell around the join handshake and sessions.

``Connect`` authenticates the site (Hello -> Challenge -> Proof -> Welcome), registers a
Session, and streams the session's outbox (task headers and lazily chunked payloads) back
to the site. One reader thread per stream pulls the site's messages: the first two (Hello
and Proof) go to the handshake, which must finish within ``handshake_timeout_s``; after
the Welcome it assembles the site's replies.

Nothing a site sends can stop the coordinator serving others: a malformed join ends that
stream with an error status (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED,
FAILED_PRECONDITION or DEADLINE_EXCEEDED; ABORTED for a lapsed challenge and
RESOURCE_EXHAUSTED for too many joins at once, which a site answers by joining again
later), and a malformed reply fails that task (recorded as the client's failure, logged,
and told to the site in a Cancel that says why), not the stream. Streams that have not
joined yet are limited per peer address before anything is read from them
(:mod:`fedlearn.deploy.admission`). A site revoked while connected has its stream ended
with PERMISSION_DENIED and the reason (:meth:`ClientRegistry.revoke`). A site has at most
one upload in progress, only for a task it was actually given and is still awaited, and of
at most the transport's expected size for that task (and ``max_payload``): a larger
declaration is refused before anything is allocated. An upload's buffer grows with the
bytes that arrive, and all uploads in flight share one
:class:`~fedlearn.deploy.uploads.UploadBudget`: past it, a stream is not read until other
uploads end.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, replace

import grpc

from fedlearn.deploy.admission import JoinGate, JoinLimits, peer_address
from fedlearn.deploy.sessions import Cancelled, ClientRegistry, Session
from fedlearn.deploy.uploads import Account, UploadBudget
from fedlearn.engine.messages import Reply, Stage
from fedlearn.engine.records import decode_arrays
from fedlearn.errors import AuthError, SerializationError
from fedlearn.security.auth import Authenticator
from fedlearn.wire import CAPABILITIES, PROTOCOL_VERSION
from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire import fedlearn_pb2_grpc as pb_grpc
from fedlearn.wire.chunks import (
    Assembler,
    ChunkLike,
    ChunkMessage,
    ReceiveBuffers,
    check_task_id,
    frames,
)
from fedlearn.wire.convert import reply_from_proto, stage_from_proto, task_to_proto

Received = pb.ClientMessage | ChunkMessage
"""A message from a site as fedlearn.wire.codec parses it (chunks without protobuf)."""

UPLOAD_BUDGET = 2048 << 20
"""Default bytes all uploads in flight may hold together (``[server] max_inflight_upload_mb``)."""

HANDSHAKE_TIMEOUT_S = 10.0
"""Default time a new stream has to complete Hello and Proof (below the 30 s nonce TTL)."""

CLOSE_GRACE_S = 5.0
"""How long a finished session waits for its site to close its side of the stream."""

log = logging.getLogger("fedlearn.server")

PayloadCounter = Callable[[int], None]
"""Called with a number of payload bytes (``CoordinatorMetrics``' byte counters)."""


def _uncounted(size: int) -> None:
    pass


def _valid_task_id(task_id: str) -> bool:
    try:
        check_task_id(task_id)
    except SerializationError:
        return False
    return True


class _Refused(Exception):
    """Ends a stream during the join with a status code and a message for the site."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Handshake:
    """The reader thread and ``Connect`` in lock step until the join is decided.

    The reader reads a message only when ``Connect`` asks for one (the Hello, then the
    Proof), so once the join is refused no read is left pending on the stream: gRPC ends a
    call itself when a read brings bytes that do not parse, and doing that to a call that
    already has its status would leave the call pending forever.
    """

    def __init__(self) -> None:
        self.messages: queue.Queue[Received | None] = queue.Queue()
        self._cond = threading.Condition()
        self._wanted = 1  # the Hello
        self._decided = False
        self.session: Session | None = None

    def want_proof(self) -> None:
        with self._cond:
            self._wanted = 2
            self._cond.notify_all()

    def decide(self, session: Session | None) -> None:
        with self._cond:
            self.session = session
            self._decided = True
            self._cond.notify_all()

    def may_read(self, read: int, timeout: float) -> bool:
        """Wait until message number ``read + 1`` is wanted; False once decided."""
        with self._cond:
            self._cond.wait_for(lambda: self._decided or self._wanted > read, timeout)
            return not self._decided and self._wanted > read

    def decision(self, timeout: float) -> Session | None:
        with self._cond:
            self._cond.wait_for(lambda: self._decided, timeout)
            return self.session


@dataclass(eq=False)
class _Upload:
    """A reply being received: its header, the assembler for its payload, and what it
    holds of the upload budget."""

    header: pb.ReplyHeader
    assembler: Assembler
    budget: UploadBudget
    account: Account

    def release(self) -> None:
        """Give back its share of the budget (when it ends, however it ends)."""
        self.budget.release(self.account)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Admits enrolled sites and moves messages between their streams and the registry."""

    def __init__(
        self,
        registry: ClientRegistry,
        authenticator: Authenticator,
        max_payload: int,
        *,
        handshake_timeout_s: float | None = None,
        require_digest: bool = True,
        payload_sent: PayloadCounter = _uncounted,
        payload_received: PayloadCounter = _uncounted,
        upload_budget: int = UPLOAD_BUDGET,
        client_id: Callable[[str], int | None] | None = None,
        join_limits: JoinLimits | None = None,
        refresh: Callable[[], object] | None = None,
    ) -> None:
        self.registry = registry
        self.payload_sent = payload_sent
        """Told each task payload's size once its last chunk is handed to gRPC."""
        self.payload_received = payload_received
        """Told each received chunk's data size (whether or not its upload is kept)."""
        self.auth = authenticator
        if client_id is None:  # the allowlist's order, fixed
            order = {site.name: i for i, site in enumerate(authenticator.allowlist.sites)}
            client_id = order.get
        self.client_id = client_id
        """Site name -> client id (fedlearn.deploy.enrollment keeps it as sites come)."""
        self.gate = JoinGate(join_limits or JoinLimits())
        self.refresh = refresh
        """Re-reads the allowlist (rate-limited) when an unknown key says Hello, so a
        site enrolled a moment ago need not wait for the next poll."""
        self.require_digest = require_digest
        """Refuse uploads without a SHA-256 (plaintext); over TLS check one if present."""
        self.max_payload = max_payload
        self.handshake_timeout_s = (
            HANDSHAKE_TIMEOUT_S if handshake_timeout_s is None else handshake_timeout_s
        )
        self.buffers = ReceiveBuffers()
        """Upload buffers: a reply's is reused once the fold has let go of its arrays."""
        self.budget = UploadBudget(upload_budget)
        """Bytes all uploads in flight may hold together; past it, streams wait."""
        self._lock = threading.Lock()
        self.rejected = 0
        """Joins refused and uploads rejected."""
        self.ignored = 0
        """Uploads dropped unread because no one awaits them (late, duplicate, unknown task)."""

    def _count(self, what: str) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + 1)

    def Connect(  # noqa: N802 - the gRPC method name
        self, request_iterator: Iterator[Received], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage | bytes]:
        """One site's stream: handshake, then tasks out and replies in."""
        yield from self._connect(request_iterator, context)
        if not context.is_active():
            # gRPC ended this call itself (the site sent bytes that do not parse as a
            # ClientMessage, or cancelled). Returning now would make gRPC send a second
            # status, which never completes: the call would stay pending forever and hold
            # up server shutdown. A message for an ended call is dropped instead, and gRPC
            # stops iterating.
            yield pb.ServerMessage()

    def _connect(
        self, request_iterator: Iterator[Received], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage | bytes]:
        peer = peer_address(context.peer())
        refusal = self.gate.enter(peer)
        if refusal is not None:  # nothing read yet: no read is pending on the stream
            self._count("rejected")
            if self.gate.refused % 100 == 1:
                log.info("join refused (RESOURCE_EXHAUSTED): %s", refusal)
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(refusal)
            return
        try:
            joined = yield from self._join(request_iterator, context)
        finally:
            self.gate.leave(peer)
        if joined is not None:
            yield from self._serve(*joined, context)

    def _join(
        self, request_iterator: Iterator[Received], context: grpc.ServicerContext
    ) -> Generator[pb.ServerMessage, None, tuple[Session, threading.Thread] | None]:
        """Hello, Challenge, Proof; the generator's value is the registered Session and
        the stream's reader thread, or None when the join was refused (status set)."""
        deadline = time.monotonic() + self.handshake_timeout_s
        handshake = _Handshake()
        reader = threading.Thread(
            target=self._read,
            args=(request_iterator, handshake),
            name="fedlearn-reader",
            daemon=True,
        )
        reader.start()
        # Status codes are set and the generator returns: no context.abort() (an exception
        # thrown through gRPC's iterator) on any path.
        session: Session | None = None
        nonce: bytes | None = None
        try:
            try:
                hello = self._expect(handshake, "hello", deadline)
                nonce, public_key = self._challenge(hello.hello)
                yield pb.ServerMessage(
                    challenge=pb.Challenge(
                        nonce=nonce,
                        server_id=self.auth.server_id,
                        protocol_version=PROTOCOL_VERSION,
                        capabilities=list(CAPABILITIES),
                    )
                )
                handshake.want_proof()
                proof = self._expect(handshake, "proof", deadline)
                try:
                    site = self.auth.verify(public_key, nonce, bytes(proof.proof.signature))
                    nonce = None  # consumed
                except AuthError as exc:
                    nonce = None  # consumed
                    # a lapsed challenge (expired) is ABORTED: the site joins again
                    # instead of giving up
                    code = (
                        grpc.StatusCode.ABORTED
                        if exc.retryable
                        else grpc.StatusCode.UNAUTHENTICATED
                    )
                    raise _Refused(code, str(exc)) from None
                client_id = self.client_id(site.name)
                if client_id is None:  # pragma: no cover - enrollment assigns one first
                    raise _Refused(
                        grpc.StatusCode.PERMISSION_DENIED, f"site {site.name!r} has no client id"
                    )
            except _Refused as refused:
                self._count("rejected")
                log.info("join refused (%s): %s", refused.code.name, refused.details)
                context.set_code(refused.code)
                context.set_details(refused.details)
                return None
            session = self.registry.connect(client_id, site.name)
            if self.auth.admitted(public_key) != site:
                # revoked between the proof and now: the revocation may have looked for
                # this site's session before there was one, so end it here
                self.registry.revoke(client_id, f"site {site.name!r} was revoked")
        finally:
            if nonce is not None:
                self.auth.withdraw(nonce)
            handshake.decide(session)
        log.info("site %s joined as client %d", site.name, session.client_id)
        return session, reader

    def _serve(
        self, session: Session, reader: threading.Thread, context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage | bytes]:
        """Welcome, then the session's tasks until it ends."""
        if not context.add_callback(lambda: self.registry.disconnect(session)):
            self.registry.disconnect(session)  # the stream already ended
            return
        if session.revoked is None:
            yield pb.ServerMessage(
                welcome=pb.Welcome(client_id=session.client_id, session_id=session.session_id)
            )
        while session.revoked is None:
            item = session.outbox.get()
            if item is None:
                break
            if isinstance(item, Cancelled):
                yield pb.ServerMessage(cancel=pb.Cancel(task_id=item.task_id, reason=item.reason))
                continue
            try:
                header = task_to_proto(
                    item.task,
                    task_id=item.task_id,
                    payload_size=item.size,
                    message_size=len(item.task.payload),
                )
            except SerializationError as exc:  # say, a config value no wire can carry
                self.registry.deliver(
                    session,
                    item.task_id,
                    Reply(
                        item.task.stage,
                        item.task.round,
                        session.client_id,
                        error=f"the task cannot be sent: {exc}",
                    ),
                )
                continue
            yield pb.ServerMessage(task_header=header)
            # Serialized ServerMessages (fedlearn.wire.codec passes bytes through).
            for frame in frames(item.payload, item.task_id, item.digest, item.task.payload):
                if session.revoked is not None:
                    break
                yield frame
            else:
                self.payload_sent(item.size)
            # drop our references before waiting again: they pin the stage's whole payload
            item = header = frame = None  # type: ignore[assignment]
        if session.revoked is not None:
            # Said at once, read pending or not: the site must stop within seconds, and
            # an honest site sends nothing that does not parse (see _Handshake).
            log.info("site %s: stream ended: %s", session.site, session.revoked)
            context.set_code(grpc.StatusCode.PERMISSION_DENIED)
            context.set_details(session.revoked)
            return
        # The session is over (the run ended, the site reconnected on another stream, or
        # this one broke). A site that has finished closes its side at once; one that
        # still sends after a few seconds is cut off rather than given a status while a
        # read is pending (see _Handshake).
        reader.join(CLOSE_GRACE_S)
        if reader.is_alive():
            context.cancel()

    def _expect(self, handshake: _Handshake, kind: str, deadline: float) -> pb.ClientMessage:
        try:
            message = handshake.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise _Refused(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no {kind} within the {self.handshake_timeout_s:g} s join deadline",
            ) from None
        if message is None:
            got = "end of stream"
        else:
            got = message.WhichOneof("kind") or "a message with no kind set"
        if got != kind:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"expected {kind}, got {got}")
        assert isinstance(message, pb.ClientMessage)  # a chunk would have been refused above
        return message

    def _challenge(self, hello: pb.Hello) -> tuple[bytes, bytes]:
        if hello.protocol_version != PROTOCOL_VERSION:
            raise _Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.protocol_version} is not supported; "
                f"this coordinator speaks version {PROTOCOL_VERSION}",
            )
        public_key = bytes(hello.public_key)
        if self.refresh is not None and self.auth.allowlist.lookup(public_key) is None:
            self.refresh()
        try:
            return self.auth.challenge(public_key), public_key
        except AuthError as exc:
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if exc.retryable
                else grpc.StatusCode.PERMISSION_DENIED
            )
            raise _Refused(code, str(exc)) from None

    def _read(self, requests: Iterator[Received], handshake: _Handshake) -> None:
        """Feed the handshake, then assemble the site's replies until the stream ends."""
        session: Session | None = None
        wait = self.handshake_timeout_s + CLOSE_GRACE_S
        try:
            for read in range(2):  # the Hello and the Proof, each when Connect wants it
                if not handshake.may_read(read, wait):
                    return
                message = next(requests, None)
                handshake.messages.put(message)
                if message is None:
                    return
            session = handshake.decision(wait)
            if session is None:
                return
            for message in requests:
                if session.revoked is None:  # a revoked site's uploads are dropped unread
                    self._on_message(session, message)
        except grpc.RpcError:
            pass  # the stream broke: the site is gone
        except Exception:  # a bug here must not leave the session half-alive
            log.exception("reader of client %s failed", getattr(session, "client_id", "?"))
        finally:
            handshake.messages.put(None)
            if session is not None:
                unfinished = session.drop_upload()
                if unfinished is not None:
                    unfinished.release()
                self.registry.disconnect(session)

    def _on_message(self, session: Session, message: Received) -> None:
        kind = message.WhichOneof("kind")
        if kind == "reply_header" and isinstance(message, pb.ClientMessage):
            self._on_header(session, message.reply_header)
        elif kind == "chunk":
            self._on_chunk(session, message.chunk)
        elif kind != "heartbeat":
            log.warning("client %d sent an unexpected %s", session.client_id, kind)

    def _on_header(self, session: Session, header: pb.ReplyHeader) -> None:
        previous = session.drop_upload()
        if isinstance(previous, _Upload):
            previous.release()
            self._reject(
                session, previous.header, "a new reply header arrived before its last chunk"
            )
        limit = self.registry.reply_limit(session, header.task_id)
        if limit is None:
            self._count("ignored")
            log.info(
                "client %d: ignored a reply to %r (not awaited)", session.client_id, header.task_id
            )
            if _valid_task_id(header.task_id):  # "" would tell the site that the run is over
                session.outbox.put(
                    Cancelled(
                        header.task_id,
                        "reply ignored: no such task is awaited from this site (already "
                        "answered, past its deadline, or never issued)",
                    )
                )
            return
        try:
            # checks the declared size against the task's expected size: allocates nothing
            assembler = Assembler(
                header.task_id,
                header.payload_size,
                min(self.max_payload, limit),
                self.buffers,
                require_digest=self.require_digest,
            )
        except SerializationError as exc:
            self._reject(session, header, str(exc))
            return
        upload = _Upload(header, assembler, self.budget, self.budget.open())
        if header.payload_size == 0:
            self._complete(session, upload)
        else:
            session.begin_upload(header.task_id, upload)

    def _on_chunk(self, session: Session, chunk: ChunkLike) -> None:
        self.payload_received(len(chunk.data))
        upload = session.current_upload()
        if not isinstance(upload, _Upload):
            return  # a stray chunk, or the rest of a payload that is not awaited
        size = len(chunk.data)
        # Past the budget this waits (and this stream is not read meanwhile) until other
        # uploads end; False if this one ended meanwhile (deadline, or the site left).
        if not self.budget.charge(
            upload.account, size, lambda: session.closed or session.current_upload() is not upload
        ):
            return
        try:
            upload.assembler.add(chunk)
        except SerializationError as exc:
            session.end_upload(upload)  # the rest of this payload is dropped unread
            upload.release()
            self._reject(session, upload.header, str(exc))
            return
        if chunk.last and session.end_upload(upload):
            upload.release()  # the payload now belongs to the reply
            self._complete(session, upload)

    def _complete(self, session: Session, upload: _Upload) -> None:
        header = upload.header
        try:
            payload = upload.assembler.finish()
            split_at = header.payload_size - header.message_size
            arrays = decode_arrays(payload[:split_at]) if split_at > 0 else None
            reply = reply_from_proto(header, client_id=session.client_id, arrays=arrays)
            if header.message_size:
                reply = replace(reply, payload=bytes(payload[split_at:]))
        except Exception as exc:  # whatever a malformed payload raises fails this task only
            self._reject(session, header, str(exc))
            return
        self.registry.deliver(session, header.task_id, reply)

    def _reject(self, session: Session, header: pb.ReplyHeader, reason: str) -> None:
        """Fail the task ``header`` answers (the site's failure, with ``reason``), log it,
        and tell the site why in a Cancel of that task."""
        self._count("rejected")
        log.warning(
            "client %d: rejected reply to %r: %s", session.client_id, header.task_id, reason
        )
        if not session.closed:
            session.outbox.put(Cancelled(header.task_id, f"upload refused: {reason}"))
        try:
            stage = stage_from_proto(header.stage)
        except SerializationError:  # the transport then names the task's real stage
            stage = Stage.TRAIN
        self.registry.deliver(
            session,
            header.task_id,
            Reply(stage, header.round, session.client_id, error=f"rejected upload: {reason}"),
        )
