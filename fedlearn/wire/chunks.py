"""Payload chunking: split a payload into bounded ``Chunk`` messages and reassemble it.

A header (``TaskHeader`` or ``ReplyHeader``) announces a payload by size and SHA-256; the
payload then travels as ``Chunk`` messages indexed 0, 1, 2, ..., the final one marked
``last``. Each chunk carries at most :data:`MAX_CHUNK` bytes, so a chunk wrapped in its
``ClientMessage``/``ServerMessage`` stays below gRPC's default 4 MiB receive limit, and a
payload may be far larger than 2 GiB (the limit of a single protobuf message).

The receiver's :class:`Assembler` checks the declared size against its limit before
allocating anything, then writes each chunk straight into one preallocated buffer of exactly
the declared size while hashing incrementally; malformed input of any kind raises
:class:`~fedlearn.errors.SerializationError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator, Sequence

from fedlearn.errors import SerializationError
from fedlearn.wire import fedlearn_pb2 as pb

GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
"""gRPC's default maximum receive message size in bytes."""

MAX_CHUNK = GRPC_DEFAULT_MAX_MESSAGE - 64 * 1024
"""Most payload bytes in one ``Chunk``; the 64 KiB left over covers every envelope field."""

MAX_TASK_ID_BYTES = 128
"""Longest task id (UTF-8 bytes) allowed on the wire; bounds a chunk's envelope."""

SHA256_SIZE = 32


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


def payload_digest(payload: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of ``payload`` (32 bytes), as sent in a header's ``payload_sha256``."""
    return hashlib.sha256(payload).digest()


def split(
    payload: bytes | bytearray | memoryview, task_id: str, chunk_size: int = MAX_CHUNK
) -> Iterator[pb.Chunk]:
    """Yield ``payload`` as chunks of ``task_id``, lazily, one at a time.

    Slicing is zero-copy; protobuf copies each slice into its ``bytes`` field, so at most
    one chunk's worth of extra memory exists per chunk the caller holds. An empty payload
    yields no chunks (its header's ``payload_size`` of 0 says there is nothing to wait for).
    """
    check_task_id(task_id)
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}, not {chunk_size}")
    view = memoryview(payload).cast("B")
    size = len(view)
    for index, start in enumerate(range(0, size, chunk_size)):
        end = min(start + chunk_size, size)
        yield pb.Chunk(task_id=task_id, index=index, data=bytes(view[start:end]), last=end == size)


def split_parts(
    parts: Sequence[bytes | bytearray | memoryview], task_id: str, chunk_size: int = MAX_CHUNK
) -> Iterator[pb.Chunk]:
    """Like :func:`split` for the concatenation of ``parts``, without building it."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    if len(views) <= 1:
        yield from split(views[0] if views else b"", task_id, chunk_size)
        return
    check_task_id(task_id)
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
                yield pb.Chunk(
                    task_id=task_id, index=index, data=b"".join(pending), last=sent == total
                )
                index, pending, pending_size = index + 1, [], 0


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


class Assembler:
    """Reassembles one payload from its chunks with bounded memory and full checks.

    ``expected_size`` and ``expected_sha256`` come from the header; ``max_size`` is the
    receiver's limit, checked before the single allocation of ``expected_size`` bytes.
    Call :meth:`add` for each chunk in arrival order, then :meth:`finish`.
    """

    def __init__(
        self, task_id: str, expected_size: int, expected_sha256: bytes, max_size: int
    ) -> None:
        self.task_id = check_task_id(task_id)
        if isinstance(expected_size, bool) or not isinstance(expected_size, int):
            raise SerializationError(f"payload size of task {task_id!r} must be an int")
        if expected_size < 0:
            raise SerializationError(f"payload of task {task_id!r} has negative size")
        if expected_size > max_size:
            raise SerializationError(
                f"payload of {format_size(expected_size)} for task {task_id!r} exceeds "
                f"the {format_size(max_size)} limit"
            )
        if not isinstance(expected_sha256, bytes) or len(expected_sha256) != SHA256_SIZE:
            raise SerializationError(
                f"payload digest of task {task_id!r} must be {SHA256_SIZE} bytes of SHA-256"
            )
        self.expected_size = expected_size
        self.expected_sha256 = expected_sha256
        self._buffer = bytearray(expected_size)  # the only allocation proportional to size
        self._view = memoryview(self._buffer)
        self._hash = hashlib.sha256()
        self._received = 0
        self._next_index = 0
        self._last_seen = False
        self._result: memoryview | None = None

    @property
    def received(self) -> int:
        """Payload bytes received so far."""
        return self._received

    @property
    def complete(self) -> bool:
        """Whether every byte has arrived and the last chunk was seen (or none is due)."""
        return self._received == self.expected_size and (self._last_seen or self.expected_size == 0)

    def add(self, chunk: pb.Chunk) -> None:
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
        if chunk.last and end != self.expected_size:
            raise SerializationError(
                f"{where} is marked last but the payload ends at byte {end} of {self.expected_size}"
            )
        self._view[self._received : end] = data
        self._hash.update(data)
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
        digest = self._hash.digest()
        if not hmac.compare_digest(digest, self.expected_sha256):
            raise SerializationError(
                f"payload of task {self.task_id!r}: digest mismatch (SHA-256 "
                f"{digest.hex()[:16]}... but the header declared "
                f"{self.expected_sha256.hex()[:16]}...)"
            )
        self._result = self._view.toreadonly()
        return self._result
