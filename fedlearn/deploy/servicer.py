"""The coordinator's gRPC servicer: a thin shell around the join handshake and sessions.

``Connect`` authenticates the site (Hello -> Challenge -> Proof -> Welcome), registers a
Session, starts a reader for the site's replies and streams the session's outbox (task
headers and lazily chunked payloads) back to the site.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc

from fedlearn.deploy.sessions import Cancelled, ClientRegistry, Outgoing, Session
from fedlearn.errors import AuthError, SerializationError
from fedlearn.records import decode_arrays
from fedlearn.security.auth import Authenticator
from fedlearn.wire import PROTOCOL_VERSION
from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire import fedlearn_pb2_grpc as pb_grpc
from fedlearn.wire.chunks import Assembler, split
from fedlearn.wire.convert import reply_from_proto, task_to_proto

CAPABILITIES = ("chunked-arrays", "sha256")

log = logging.getLogger("fedlearn.server")


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Admits enrolled sites and moves messages between their streams and the registry."""

    def __init__(
        self, registry: ClientRegistry, authenticator: Authenticator, max_payload: int
    ) -> None:
        self.registry = registry
        self.auth = authenticator
        self.max_payload = max_payload
        self.client_ids = {site.name: i for i, site in enumerate(authenticator.allowlist.sites)}
        self.rejected = 0

    def Connect(  # noqa: N802 - the gRPC method name
        self, request_iterator: Iterator[pb.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage]:
        """One site's stream: handshake, then tasks out and replies in."""
        hello = _next(request_iterator, "hello", context)
        if hello.hello.protocol_version != PROTOCOL_VERSION:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {hello.hello.protocol_version} is not supported; "
                f"this coordinator speaks version {PROTOCOL_VERSION}",
            )
        public_key = bytes(hello.hello.public_key)
        try:
            nonce = self.auth.challenge(public_key)
        except AuthError as exc:
            self.rejected += 1
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        yield pb.ServerMessage(
            challenge=pb.Challenge(
                nonce=nonce,
                server_id=self.auth.server_id,
                protocol_version=PROTOCOL_VERSION,
                capabilities=list(CAPABILITIES),
            )
        )
        proof = _next(request_iterator, "proof", context)
        try:
            site = self.auth.verify(public_key, nonce, bytes(proof.proof.signature))
        except AuthError as exc:
            self.rejected += 1
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        session = self.registry.connect(self.client_ids[site.name], site.name)
        log.info("site %s joined as client %d", site.name, session.client_id)
        context.add_callback(lambda: self.registry.disconnect(session))
        yield pb.ServerMessage(
            welcome=pb.Welcome(client_id=session.client_id, session_id=session.session_id)
        )
        reader = threading.Thread(
            target=self._read, args=(request_iterator, session, context), daemon=True
        )
        reader.start()
        while True:
            item = session.outbox.get()
            if item is None:
                return
            if isinstance(item, Cancelled):
                yield pb.ServerMessage(cancel=pb.Cancel(task_id=item.task_id, reason=item.reason))
                continue
            yield from _task_messages(item)

    def _read(
        self,
        requests: Iterator[pb.ClientMessage],
        session: Session,
        context: grpc.ServicerContext,
    ) -> None:
        """Assemble the site's replies; a malformed one fails that task, not the stream."""
        header: pb.ReplyHeader | None = None
        assembler: Assembler | None = None
        try:
            for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "reply_header":
                    header, assembler = message.reply_header, None
                    try:
                        assembler = Assembler(
                            header.task_id,
                            header.payload_size,
                            bytes(header.payload_sha256),
                            self.max_payload,
                        )
                    except SerializationError as exc:
                        self._reject(session, header, str(exc))
                        header = None
                        continue
                    if header.payload_size == 0:
                        self._complete(session, header, assembler)
                        header = assembler = None
                elif kind == "chunk":
                    if header is None or assembler is None:
                        continue  # the rest of a rejected payload
                    try:
                        assembler.add(message.chunk)
                    except SerializationError as exc:
                        self._reject(session, header, str(exc))
                        header = assembler = None
                        continue
                    if message.chunk.last:
                        self._complete(session, header, assembler)
                        header = assembler = None
                elif kind == "heartbeat":
                    continue
                else:
                    log.warning("client %d sent an unexpected %s", session.client_id, kind)
        except grpc.RpcError:
            pass
        finally:
            self.registry.disconnect(session)

    def _complete(self, session: Session, header: pb.ReplyHeader, assembler: Assembler) -> None:
        try:
            payload = assembler.finish()
            arrays = decode_arrays(payload) if header.payload_size else None
            reply = reply_from_proto(header, client_id=session.client_id, arrays=arrays)
        except SerializationError as exc:
            self._reject(session, header, str(exc))
            return
        self.registry.deliver(session, header.task_id, reply)

    def _reject(self, session: Session, header: pb.ReplyHeader, reason: str) -> None:
        from fedlearn.messages import Reply, Stage

        self.rejected += 1
        log.warning(
            "client %d: rejected reply to %s: %s", session.client_id, header.task_id, reason
        )
        stage = Stage.EVALUATE if header.stage == pb.STAGE_EVALUATE else Stage.TRAIN
        self.registry.deliver(
            session,
            header.task_id,
            Reply(stage, header.round, session.client_id, error=f"rejected upload: {reason}"),
        )


def _task_messages(item: Outgoing) -> Iterator[pb.ServerMessage]:
    header = task_to_proto(
        item.task,
        task_id=item.task_id,
        payload_size=len(item.payload),
        payload_sha256=item.digest,
    )
    yield pb.ServerMessage(task_header=header)
    for chunk in split(item.payload, item.task_id):
        yield pb.ServerMessage(chunk=chunk)


def _next(
    requests: Iterator[pb.ClientMessage], kind: str, context: grpc.ServicerContext
) -> pb.ClientMessage:
    message = next(requests, None)
    if message is None or message.WhichOneof("kind") != kind:
        got = "end of stream" if message is None else message.WhichOneof("kind")
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected {kind}, got {got}")
        raise AssertionError("context.abort returns only by raising")
    return message
