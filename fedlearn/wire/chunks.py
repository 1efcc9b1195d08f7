"""Payload chunking: split a payload into bounded ``Chunk`` messages and reassemble it.

A header (``TaskHeader`` or ``ReplyHeader``) announces a payload by size; the payload then
travels as ``Chunk`` messages indexed 0, 1, 2, ..., the final one marked ``last`` and
carrying the SHA-256 of the whole payload. Each chunk carries at most :data:`MAX_CHUNK`
bytes, so a chunk wrapped in its ``ClientMessage``/``ServerMessage`` stays below gRPC's
default 4 MiB receive limit, and a payload may be far larger than 2 GiB (the limit of a
single protobuf message).

Senders use :func:`frames`: each chunk's whole ``ClientMessage``/``ServerMessage`` written
with one copy of its data, byte for byte what protobuf writes (both envelopes hold the
chunk in field 4), and the digest taken from a :class:`Digest` hashing on another thread
while the chunks stream. :func:`parse_chunk_message` reads such a message back without
copying its data (a view of the received bytes); :mod:`fedlearn.wire.codec` plugs both into
gRPC. :func:`split` and :func:`split_parts` yield the same chunks as ``pb.Chunk`` objects.

The receiver's :class:`Assembler` checks the declared size against its limit before
anything else, then appends each chunk to one buffer that grows with the bytes that actually
arrive (never to more than the declared size), hashing incrementally; malformed input of any
kind raises :class:`~fedlearn.errors.SerializationError`. A declaration alone allocates
nothing: a peer that announces gigabytes and sends a few bytes costs a few bytes.
:class:`ReceiveBuffers` lets the next payload of the same size be written into the previous
one's buffer once nothing references that payload any more.
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedlearn.errors import SerializationError
from fedlearn.wire import fedlearn_pb2 as pb

GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
"""gRPC's default maximum receive message size in bytes."""

MAX_CHUNK = GRPC_DEFAULT_MAX_MESSAGE - 64 * 1024
"""Most payload bytes in one ``Chunk``; the 64 KiB left over covers every envelope field."""

MAX_TASK_ID_BYTES = 128
"""Longest task id (UTF-8 bytes) allowed on the wire; bounds a chunk's envelope."""

SHA256_SIZE = 32

BACKGROUND_HASH_MIN = 8 << 20
"""A :class:`Digest` of this many bytes or more is computed on a thread of its own."""

Buffer = bytes | bytearray | memoryview

# Tags (field number << 3 | wire type) of the chunk's fields; ``chunk`` is field 4 of both
# ClientMessage and ServerMessage (tests/test_wire.py checks the bytes against protobuf's).
_ENVELOPE_CHUNK = 0x22  # 4, length-delimited
_TASK_ID = 0x0A  # 1, length-delimited
_INDEX = 0x10  # 2, varint
_DATA = 0x1A  # 3, length-delimited
_LAST = 0x20  # 4, varint
_SHA256 = 0x2A  # 5, length-delimited


def check_task_id(task_id: str) -> str:
    """Return ``task_id`` if it is a non-empty string of at most MAX_TASK_ID_BYTES UTF-8 bytes."""
    if not isinstance(task_id, str) or not task_id:
        raise SerializationError(f"task id must be a non-empty string, not {task_id!r}")
    try:
        size = len(task_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise SerializationError(f"task id {task_id!r} is not valid UTF-8") from exc
    if size > MAX_TASK_ID_BYTES:
        raise SerializationError(
            f"task id of {size} bytes is longer than the {MAX_TASK_ID_BYTES}-byte limit"
        )
    return task_id


def payload_digest(payload: Buffer) -> bytes:
    """SHA-256 of ``payload`` (32 bytes), as sent on a payload's last chunk."""
    return hashlib.sha256(payload).digest()


class Digest:
    """The SHA-256 of the concatenation of ``parts``, computed on a background thread.

    hashlib releases the GIL while it hashes a large buffer, so the digest is computed
    on another core while the chunks stream; :meth:`result` waits for it. The parts must
    not change until then. One Digest can serve many streams (the broadcast of a stage).
    """

    def __init__(self, parts: Sequence[Buffer]) -> None:
        self._hash = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if sum(len(p) for p in parts) < BACKGROUND_HASH_MIN:
            self._run(list(parts))  # a thread would cost more than it saves
        else:
            self._thread = threading.Thread(
                target=self._run, args=(list(parts),), name="fedlearn-digest", daemon=True
            )
            self._thread.start()

    def _run(self, parts: list[Buffer]) -> None:
        try:
            for part in parts:
                self._hash.update(part)
        except BaseException as exc:  # re-raised by result()
            self._error = exc

    def result(self, suffix: Buffer = b"") -> bytes:
        """The digest of the parts followed by ``suffix`` (which is hashed here)."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if not len(suffix):
            return self._hash.digest()
        h = self._hash.copy()
        h.update(suffix)
        return h.digest()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _pieces(
    parts: Sequence[Buffer], chunk_size: int
) -> Iterator[tuple[int, list[memoryview], int, bool]]:
    """``(index, pieces, size, last)`` for each chunk of the concatenation of ``parts``:
    views into the parts, never a copy."""
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}, not {chunk_size}")
    views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
    total = sum(len(v) for v in views)
    index, sent, pending, pending_size = 0, 0, [], 0
    for view in views:
        start = 0
        while start < len(view):
            take = min(chunk_size - pending_size, len(view) - start)
            pending.append(view[start : start + take])
            pending_size += take
            start += take
            if pending_size == chunk_size or sent + pending_size == total:
                sent += pending_size
                yield index, pending, pending_size, sent == total
                index, pending, pending_size = index + 1, [], 0


def frames(
    parts: Sequence[Buffer],
    task_id: str,
    digest: Digest | None = None,
    suffix: Buffer = b"",
    chunk_size: int = MAX_CHUNK,
) -> Iterator[bytes]:
    """The serialized ``ClientMessage``/``ServerMessage`` of each chunk of ``parts`` +
    ``suffix``, lazily; with a ``digest`` the last one carries the payload's SHA-256.

    ``digest`` is the Digest of ``parts`` (started before the first frame, so hashing
    overlaps the sending); None sends no digest (over TLS, whose records are each
    authenticated). Each frame is built with a single copy of its data and is
    byte-identical to protobuf's serialization of ``Message(chunk=Chunk(...))``. An empty
    payload yields no frames.
    """
    tid = check_task_id(task_id).encode("utf-8")
    id_field = bytes([_TASK_ID]) + _varint(len(tid)) + tid
    all_parts = [*parts, suffix] if len(suffix) else list(parts)
    for index, pieces, size, last in _pieces(all_parts, chunk_size):
        head = id_field + (bytes([_INDEX]) + _varint(index) if index else b"")
        data_head = bytes([_DATA]) + _varint(size)
        tail = b""
        if last:
            tail = bytes([_LAST, 1])
            if digest is not None:
                tail += bytes([_SHA256, SHA256_SIZE]) + digest.result(suffix)
        body = len(head) + len(data_head) + size + len(tail)
        yield b"".join([bytes([_ENVELOPE_CHUNK]), _varint(body), head, data_head, *pieces, tail])


def split(payload: Buffer, task_id: str, chunk_size: int = MAX_CHUNK) -> Iterator[pb.Chunk]:
    """Yield ``payload`` as ``pb.Chunk`` messages of ``task_id``, lazily, one at a time; the
    last one carries the payload's SHA-256. An empty payload yields no chunks (its header's
    ``payload_size`` of 0 says there is nothing to wait for)."""
    yield from split_parts([payload], task_id, chunk_size)


def split_parts(
    parts: Sequence[Buffer], task_id: str, chunk_size: int = MAX_CHUNK
) -> Iterator[pb.Chunk]:
    """Like :func:`split` for the concatenation of ``parts``, without building it."""
    check_task_id(task_id)
    hasher = hashlib.sha256()
    for index, pieces, _, last in _pieces(parts, chunk_size):
        data = b"".join(pieces)
        hasher.update(data)
        chunk = pb.Chunk(task_id=task_id, index=index, data=data, last=last)
        if last:
            chunk.sha256 = hasher.digest()
        yield chunk


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received chunk whose ``data`` is a view of the received message (no copy)."""

    task_id: str
    index: int
    data: memoryview
    last: bool
    sha256: bytes


class ChunkMessage:
    """A parsed ``ClientMessage``/``ServerMessage`` holding a chunk: reads like one."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: ChunkView) -> None:
        self.chunk = chunk

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 - protobuf's name
        return "chunk" if group == "kind" else None


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("bad varint")


def parse_chunk_message(raw: bytes) -> ChunkMessage | None:
    """The chunk in a serialized ``ClientMessage``/``ServerMessage`` that holds exactly one
    chunk (what :func:`frames` writes), with ``data`` a view of ``raw``; None for any other
    message, and for any encoding this fast path does not handle (a field repeated or
    unknown, ...): the caller then parses ``raw`` with protobuf, which decides."""
    if len(raw) < 2 or raw[0] != _ENVELOPE_CHUNK:
        return None
    buf = memoryview(raw)
    try:
        length, pos = _read_varint(buf, 1, len(buf))
        end = len(buf)
        if pos + length != end:
            return None
        task_id, index, data, last, sha256 = "", 0, buf[0:0], False, b""
        seen = 0
        while pos < end:
            tag = buf[pos]
            pos += 1
            bit = 1 << (tag & 0x3F)
            if seen & bit:
                return None
            seen |= bit
            if tag in (_INDEX, _LAST):
                value, pos = _read_varint(buf, pos, end)
                if tag == _INDEX:
                    if value > 0xFFFFFFFF:
                        return None
                    index = value
                else:
                    last = value != 0
            elif tag in (_TASK_ID, _DATA, _SHA256):
                size, pos = _read_varint(buf, pos, end)
                if pos + size > end:
                    return None
                value_view = buf[pos : pos + size]
                pos += size
                if tag == _TASK_ID:
                    task_id = bytes(value_view).decode("utf-8")
                elif tag == _DATA:
                    data = value_view
                else:
                    sha256 = bytes(value_view)
            else:
                return None
    except (ValueError, UnicodeDecodeError):
        return None
    return ChunkMessage(ChunkView(task_id, index, data, last, sha256))


def format_size(size: int) -> str:
    """A byte count for error messages: ``5 GiB``, ``1.5 MiB``, ``17 bytes``."""
    if size < 1024:
        return f"{size} bytes"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


class ReceiveBuffers:
    """Recycles the receive buffer of a finished payload for the next one of the same size.

    Writing a large payload into fresh memory costs a page fault per 4 KiB page; a buffer
    already touched is several times faster to fill. :meth:`keep` remembers the buffer of
    a finished payload; :meth:`take` hands it out again only when nothing else refers to
    it any more: every view of it (a memoryview, the numpy arrays decoded from it, an
    array a strategy or an app kept) holds a reference, so a buffer still in use is never
    overwritten. It never allocates: without a free buffer of the right size the payload
    grows a buffer of its own. Thread-safe; keeps at most one buffer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spare: bytearray | None = None
        self.reused = 0

    def take(self, size: int) -> bytearray | None:
        """The kept buffer if it holds exactly ``size`` bytes and is unreferenced, else None."""
        with self._lock:
            spare, self._spare = self._spare, None
            # References: ``spare`` and getrefcount's argument; any more is a live view.
            if spare is not None and len(spare) == size and sys.getrefcount(spare) == 2:
                self.reused += 1
                return spare
        return None  # a spare still in use lives on as long as its views

    def keep(self, buffer: bytearray) -> None:
        """Remember ``buffer`` (whose payload was handed out) for a later :meth:`take`."""
        with self._lock:
            self._spare = buffer


class ChunkLike(Protocol):
    """What the Assembler reads of a chunk: ``pb.Chunk`` or :class:`ChunkView`."""

    @property
    def task_id(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def data(self) -> Any: ...
    @property
    def last(self) -> bool: ...
    @property
    def sha256(self) -> bytes: ...


class Assembler:
    """Reassembles one payload from its chunks with bounded memory and full checks.

    ``expected_size`` comes from the header; ``max_size`` is the receiver's limit, checked
    first. Nothing is allocated for a declaration: each chunk is appended to a buffer that
    grows with the bytes received (bytearray's geometric growth; on Linux a large buffer
    grows by remapping its pages, not by copying them), so memory follows what a peer
    actually sends, never what it announces. When ``buffers`` holds an unreferenced buffer
    of exactly ``expected_size`` bytes (the previous payload's), the chunks are written into
    it instead, and ``buffers`` gets this payload's buffer back once it is finished. Call
    :meth:`add` for each chunk in arrival order, then :meth:`finish`, which checks the
    digest the last chunk carries against the SHA-256 of what arrived. With
    ``require_digest`` (a plaintext channel) a last chunk without one is refused; otherwise
    (TLS, which authenticates every record) a digest is checked when present, hashed in one
    pass at the end.
    """

    def __init__(
        self,
        task_id: str,
        expected_size: int,
        max_size: int,
        buffers: ReceiveBuffers | None = None,
        require_digest: bool = True,
    ) -> None:
        self.task_id = check_task_id(task_id)
        self.require_digest = require_digest
        if isinstance(expected_size, bool) or not isinstance(expected_size, int):
            raise SerializationError(f"payload size of task {task_id!r} must be an int")
        if expected_size < 0:
            raise SerializationError(f"payload of task {task_id!r} has negative size")
        if expected_size > max_size:
            raise SerializationError(
                f"payload of {format_size(expected_size)} for task {task_id!r} exceeds "
                f"the {format_size(max_size)} limit"
            )
        self.expected_size = expected_size
        spare = buffers.take(expected_size) if buffers is not None and expected_size else None
        # A reused buffer is written in place; otherwise the buffer grows chunk by chunk.
        self._buffer = bytearray() if spare is None else spare
        self._view = None if spare is None else memoryview(spare)
        self._buffers = buffers
        self._hash = hashlib.sha256() if require_digest else None
        self._received = 0
        self._next_index = 0
        self._last_seen = False
        self._sha256 = b""
        self._result: memoryview | None = None

    @property
    def received(self) -> int:
        """Payload bytes received so far."""
        return self._received

    @property
    def complete(self) -> bool:
        """Whether every byte has arrived and the last chunk was seen (or none is due)."""
        return self._received == self.expected_size and (self._last_seen or self.expected_size == 0)

    def add(self, chunk: ChunkLike) -> None:
        """Check ``chunk`` and copy its data into place."""
        where = f"chunk {chunk.index} of task {self.task_id!r}"
        if self._result is not None:
            raise SerializationError(f"{where} arrived after the payload was finished")
        if chunk.task_id != self.task_id:
            raise SerializationError(
                f"chunk {chunk.index} of task {chunk.task_id!r} arrived while assembling "
                f"task {self.task_id!r}"
            )
        if self._last_seen:
            raise SerializationError(f"{where} arrived after the last chunk {self._next_index - 1}")
        if chunk.index != self._next_index:
            if chunk.index == self._next_index - 1:
                raise SerializationError(f"{where} arrived twice")
            if chunk.index < self._next_index:
                raise SerializationError(f"{where} arrived after chunk {self._next_index - 1}")
            raise SerializationError(
                f"{where} arrived before chunk {self._next_index}"
                + ("" if self._next_index else " (the first)")
            )
        data = chunk.data
        size = len(data)
        if size == 0 and not chunk.last:
            raise SerializationError(f"{where} is empty but not marked last")
        if size > MAX_CHUNK:
            raise SerializationError(
                f"{where} carries {size} bytes, more than the {MAX_CHUNK}-byte chunk limit"
            )
        end = self._received + size
        if end > self.expected_size:
            raise SerializationError(
                f"{where} overflows the declared payload size of {self.expected_size} bytes "
                f"(it would end at byte {end})"
            )
        sha256 = chunk.sha256
        if chunk.last:
            if end != self.expected_size:
                raise SerializationError(
                    f"{where} is marked last but the payload ends at byte {end} of "
                    f"{self.expected_size}"
                )
            if len(sha256) != SHA256_SIZE and (self.require_digest or len(sha256)):
                raise SerializationError(
                    f"{where} is the last but does not carry the payload's {SHA256_SIZE}-byte "
                    "SHA-256"
                )
            self._sha256 = bytes(sha256)
        elif len(sha256):
            raise SerializationError(f"{where} carries a digest but is not the last chunk")
        if self._view is not None:
            self._view[self._received : end] = data
        else:
            self._buffer += data  # grows with what arrives; never past expected_size
        if self._hash is not None:
            self._hash.update(data)  # releases the GIL: gRPC's threads receive meanwhile
        self._received = end
        self._next_index += 1
        self._last_seen = chunk.last

    def finish(self) -> memoryview:
        """Return the payload as a read-only view after checking it is whole and intact."""
        if self._result is not None:
            return self._result
        if self._received != self.expected_size:
            raise SerializationError(
                f"payload of task {self.task_id!r} is incomplete: {self._received} of "
                f"{self.expected_size} bytes arrived"
            )
        if not self.complete:
            raise SerializationError(
                f"payload of task {self.task_id!r} has all its bytes but its last chunk "
                "was never marked last"
            )
        if self._last_seen and (self._hash is not None or self._sha256):
            # an empty payload may come without a chunk, hence a digest
            digest = (
                self._hash.digest()
                if self._hash is not None
                else hashlib.sha256(self._buffer).digest()  # TLS, and the sender sent one
            )
            if not hmac.compare_digest(digest, self._sha256):
                raise SerializationError(
                    f"payload of task {self.task_id!r}: digest mismatch (SHA-256 "
                    f"{digest.hex()[:16]}... but the last chunk declared "
                    f"{self._sha256.hex()[:16]}...)"
                )
        self._result = memoryview(self._buffer).toreadonly()
        if self._buffers is not None and self.expected_size:
            self._buffers.keep(self._buffer)
        return self._result
