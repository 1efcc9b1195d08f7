"""Messages between the coordinator and client runtimes, and their byte encoding.

A round is a sequence of stages; in each stage the coordinator sends one ``Task`` per
client and a shared broadcast (the global arrays), and each client answers with a
``Reply``. Transports only move these messages.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from fedlearn.engine.records import (
    Arrays,
    Config,
    Metrics,
    decode_arrays,
    decode_json,
    encode_arrays,
    encode_json,
)
from fedlearn.errors import SerializationError


class Stage(StrEnum):
    """The kinds of exchange a round is made of."""

    TRAIN = "train"
    EVALUATE = "evaluate"
    # secure aggregation: training happens in the first stage, the sum comes out of the last
    SECAGG_SETUP = "secagg-setup"
    SECAGG_KEYS = "secagg-keys"
    SECAGG_SHARES = "secagg-shares"
    SECAGG_UNMASK = "secagg-unmask"

    @property
    def secure(self) -> bool:
        """Whether this is a secure-aggregation stage (the client keeps state across them)."""
        return self.value.startswith("secagg-")


@dataclass(frozen=True)
class Task:
    """Work for one client in one stage of one round."""

    stage: Stage
    round: int
    client_id: int
    seed: int
    config: Config = field(default_factory=dict)
    payload: bytes = b""
    """A per-client protocol message (secure aggregation); empty for train/evaluate."""
    reply_limit: int | None = None
    """The most payload bytes the reply may carry, when the protocol that issues the task
    knows it (secure aggregation: its messages' sizes); None lets a transport derive it
    from the stage and the broadcast. Never sent to the client."""


@dataclass(frozen=True)
class Reply:
    """A client's answer to a ``Task``; ``error`` is set when the client failed."""

    stage: Stage
    round: int
    client_id: int
    num_examples: int = 0
    arrays: Arrays | None = None
    loss: float | None = None
    metrics: Metrics = field(default_factory=dict)
    error: str | None = None
    payload: bytes = b""
    """The client's protocol message (secure aggregation)."""

    @property
    def ok(self) -> bool:
        """Whether the client answered without error."""
        return self.error is None


_STAGE_INDEX = {stage: i for i, stage in enumerate(Stage)}


def seed_for(run_seed: int, round: int, stage: Stage, client_id: int) -> int:
    """A 63-bit task seed derived from the run seed; the same in every transport."""
    seq = np.random.SeedSequence([run_seed, round, _STAGE_INDEX[stage], client_id])
    high, low = seq.generate_state(2, dtype=np.uint32).tolist()
    return int((high << 32) | low) & ((1 << 63) - 1)


_LEN = struct.Struct("<Q")


def frame(parts: Sequence[bytes]) -> bytes:
    """Join byte strings with length prefixes."""
    out = bytearray()
    for part in parts:
        out += _LEN.pack(len(part))
        out += part
    return bytes(out)


def unframe(data: bytes | memoryview) -> Iterator[memoryview]:
    """Split bytes made by :func:`frame`."""
    view = memoryview(data)
    offset = 0
    while offset < len(view):
        if offset + _LEN.size > len(view):
            raise SerializationError("truncated frame length")
        (size,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if offset + size > len(view):
            raise SerializationError("frame runs past the end of the payload")
        yield view[offset : offset + size]
        offset += size


def encode_task(task: Task) -> bytes:
    """Task to bytes: a JSON header frame and the raw payload frame (no pickle)."""
    header = encode_json([task.stage.value, task.round, task.client_id, task.seed, task.config])
    return frame([header, task.payload])


def decode_task(data: bytes | memoryview) -> Task:
    """Bytes made by :func:`encode_task` back to a Task."""
    parts = list(unframe(data))
    if len(parts) != 2:
        raise SerializationError("a task has two frames")
    try:
        stage, rnd, cid, seed, config = decode_json(parts[0])
        return Task(Stage(stage), int(rnd), int(cid), int(seed), dict(config), bytes(parts[1]))
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"malformed task: {exc}") from exc


def encode_reply(reply: Reply) -> bytes:
    """Reply to bytes: a JSON header frame and, for training, an arrays frame."""
    header: list[Any] = [
        reply.stage.value,
        reply.round,
        reply.client_id,
        reply.num_examples,
        reply.loss,
        reply.metrics,
        reply.error,
    ]
    parts = [encode_json(header), reply.payload]
    if reply.arrays is not None:
        parts.append(encode_arrays(reply.arrays))
    return frame(parts)


def decode_reply(data: bytes | memoryview) -> Reply:
    """Bytes made by :func:`encode_reply` back to a Reply."""
    parts = list(unframe(data))
    if len(parts) not in (2, 3):
        raise SerializationError("a reply has two or three frames")
    try:
        stage, rnd, cid, num_examples, loss, metrics, error = decode_json(parts[0])
        return Reply(
            stage=Stage(stage),
            round=int(rnd),
            client_id=int(cid),
            num_examples=int(num_examples),
            arrays=decode_arrays(parts[2]) if len(parts) == 3 else None,
            loss=None if loss is None else float(loss),
            metrics=dict(metrics),
            error=None if error is None else str(error),
            payload=bytes(parts[1]),
        )
    except (TypeError, ValueError) as exc:
        raise SerializationError(f"malformed reply: {exc}") from exc
