"""Conversions between fedlearn records and the protobuf messages of ``fedlearn.v1``.

Every conversion comes as a symmetric pair ``x_to_proto`` / ``x_from_proto``; anything that
cannot be represented, or a message that does not describe a valid record, raises
:class:`~fedlearn.errors.SerializationError`.

Headers carry no client id (the stream's session identifies the client) and no arrays: the
arrays travel as the header's payload (``encode_arrays`` bytes, announced by
``payload_size`` and sent with :mod:`fedlearn.wire.chunks`, the last chunk carrying the
payload's SHA-256). A reply
without arrays has ``payload_size == 0``; an empty ``Arrays`` still encodes to a non-empty
payload, so the two stay distinct.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, Scalar, check_scalars
from fedlearn.errors import SerializationError
from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire.chunks import check_task_id

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

_STAGE_TO_PROTO: dict[Stage, pb.Stage] = {
    Stage.TRAIN: pb.STAGE_TRAIN,
    Stage.EVALUATE: pb.STAGE_EVALUATE,
    Stage.SECAGG_SETUP: pb.STAGE_SECAGG_SETUP,
    Stage.SECAGG_KEYS: pb.STAGE_SECAGG_KEYS,
    Stage.SECAGG_SHARES: pb.STAGE_SECAGG_SHARES,
    Stage.SECAGG_UNMASK: pb.STAGE_SECAGG_UNMASK,
}
_STAGE_FROM_PROTO: dict[int, Stage] = {int(v): k for k, v in _STAGE_TO_PROTO.items()}


# ------------------------------------------------------------------------------ scalars


def value_to_proto(value: Scalar) -> pb.Value:
    """A config/metric scalar to a ``Value`` (bool is checked before int)."""
    if isinstance(value, bool):
        return pb.Value(bool_value=value)
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise SerializationError(f"integer {value} does not fit in 64 bits")
        return pb.Value(int_value=int(value))
    if isinstance(value, float):
        return pb.Value(float_value=float(value))
    if isinstance(value, str):
        try:
            return pb.Value(string_value=str(value))
        except ValueError as exc:  # lone surrogates are not UTF-8
            raise SerializationError(f"string {value!r} is not valid UTF-8") from exc
    raise SerializationError(
        f"value of type {type(value).__name__} is not a bool, int, float or str"
    )


def value_from_proto(value: pb.Value) -> Scalar:
    """A ``Value`` back to a Python scalar; an unset ``Value`` is malformed."""
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return bool(value.bool_value)
    if kind == "int_value":
        return int(value.int_value)
    if kind == "float_value":
        return float(value.float_value)
    if kind == "string_value":
        return str(value.string_value)
    raise SerializationError("a Value has no kind set")


def scalars_to_proto(values: Mapping[str, Any], what: str = "config") -> dict[str, pb.Value]:
    """A config or metrics dict to the ``map<string, Value>`` entries of a header.

    ``what`` ("config", "metrics") names the mapping in error messages. numpy scalars are
    accepted and become Python scalars; lists, dicts, arrays, None, ... are rejected.
    """
    if not isinstance(values, Mapping):
        raise SerializationError(f"{what} must be a mapping, not {type(values).__name__}")
    out: dict[str, pb.Value] = {}
    for key, value in check_scalars(values, what).items():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerializationError(f"{what} key {key!r} is not valid UTF-8") from exc
        try:
            out[key] = value_to_proto(value)
        except SerializationError as exc:
            raise SerializationError(f"{what} value {key!r}: {exc}") from exc
    return out


def scalars_from_proto(values: Mapping[str, pb.Value], what: str = "config") -> dict[str, Scalar]:
    """The ``map<string, Value>`` of a header back to a plain dict."""
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        try:
            out[key] = value_from_proto(value)
        except SerializationError as exc:
            raise SerializationError(f"{what} value {key!r}: {exc}") from exc
    return out


# ------------------------------------------------------------------------------- stages


def stage_to_proto(stage: Stage) -> pb.Stage:
    """A :class:`~fedlearn.engine.messages.Stage` to its enum value on the wire."""
    try:
        return _STAGE_TO_PROTO[Stage(stage)]
    except (KeyError, ValueError) as exc:
        raise SerializationError(f"stage {stage!r} has no wire representation") from exc


def stage_from_proto(stage: int) -> Stage:
    """An enum value from the wire to a Stage; STAGE_UNSPECIFIED and unknown values fail."""
    try:
        return _STAGE_FROM_PROTO[int(stage)]
    except KeyError:
        if stage == pb.STAGE_UNSPECIFIED:
            raise SerializationError("stage is unspecified") from None
        raise SerializationError(f"unknown stage {int(stage)}") from None


# ------------------------------------------------------------------------------ headers


def task_to_proto(
    task: Task, *, task_id: str, payload_size: int, message_size: int = 0
) -> pb.TaskHeader:
    """A Task to the header sent ahead of its payload (the broadcast arrays).

    ``task.client_id`` is not sent: the stream the header travels on identifies the client.
    """
    check_task_id(task_id)
    _check_payload(payload_size, task_id)
    return pb.TaskHeader(
        task_id=task_id,
        stage=stage_to_proto(task.stage),
        round=_check_uint(task.round, UINT32_MAX, "round"),
        seed=_check_uint(task.seed, UINT64_MAX, "seed"),
        config=scalars_to_proto(task.config, "config"),
        payload_size=payload_size,
        message_size=_check_message(message_size, payload_size, task_id),
    )


def task_from_proto(header: pb.TaskHeader, *, client_id: int) -> Task:
    """A TaskHeader back to the Task for ``client_id`` (the id given in ``Welcome``).

    ``header.task_id`` and ``payload_size`` are checked here and are read from the header
    by the caller to build the payload's Assembler.
    """
    check_task_id(header.task_id)
    _check_payload(header.payload_size, header.task_id)
    _check_message(header.message_size, header.payload_size, header.task_id)
    return Task(
        stage=stage_from_proto(header.stage),
        round=header.round,
        client_id=client_id,
        seed=header.seed,
        config=scalars_from_proto(header.config, "config"),
    )


def reply_to_proto(
    reply: Reply, *, task_id: str, payload_size: int, message_size: int = 0
) -> pb.ReplyHeader:
    """A Reply to the header sent ahead of its payload (its encoded arrays, if any).

    ``payload_size`` must be 0 exactly when ``reply.arrays`` is None.
    """
    check_task_id(task_id)
    _check_payload(payload_size, task_id)
    _check_message(message_size, payload_size, task_id)
    _check_arrays_match(reply.arrays, payload_size - message_size, task_id)
    header = pb.ReplyHeader(
        task_id=task_id,
        stage=stage_to_proto(reply.stage),
        round=_check_uint(reply.round, UINT32_MAX, "round"),
        num_examples=_check_uint(reply.num_examples, UINT64_MAX, "num_examples"),
        metrics=scalars_to_proto(reply.metrics, "metrics"),
        payload_size=payload_size,
        message_size=message_size,
    )
    if reply.loss is not None:
        loss = reply.loss
        if isinstance(loss, bool) or not isinstance(loss, int | float):
            raise SerializationError(f"loss must be a number, not {type(loss).__name__}")
        header.loss = float(loss)
    if reply.error is not None:
        try:
            header.error = str(reply.error)
        except ValueError as exc:
            raise SerializationError("reply error message is not valid UTF-8") from exc
    return header


def reply_from_proto(header: pb.ReplyHeader, *, client_id: int, arrays: Arrays | None) -> Reply:
    """A ReplyHeader back to the Reply of ``client_id``, with the arrays decoded from its
    payload (None when ``payload_size`` is 0)."""
    check_task_id(header.task_id)
    _check_payload(header.payload_size, header.task_id)
    _check_message(header.message_size, header.payload_size, header.task_id)
    _check_arrays_match(arrays, header.payload_size - header.message_size, header.task_id)
    return Reply(
        stage=stage_from_proto(header.stage),
        round=header.round,
        client_id=client_id,
        num_examples=header.num_examples,
        arrays=arrays,
        loss=header.loss if header.HasField("loss") else None,
        metrics=scalars_from_proto(header.metrics, "metrics"),
        error=header.error if header.HasField("error") else None,
    )


def _check_uint(value: Any, limit: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise SerializationError(f"{what} must be an int in 0..{limit}, not {value!r}")
    return int(value)


def _check_payload(size: Any, task_id: str) -> None:
    _check_uint(size, UINT64_MAX, f"payload size of task {task_id!r}")


def _check_message(message_size: Any, payload_size: int, task_id: str) -> int:
    size = _check_uint(message_size, UINT64_MAX, f"message size of task {task_id!r}")
    if size > payload_size:
        raise SerializationError(
            f"task {task_id!r} declares a {size}-byte message in a {payload_size}-byte payload"
        )
    return size


def _check_arrays_match(arrays: Arrays | None, payload_size: int, task_id: str) -> None:
    if (arrays is None) != (payload_size == 0):
        raise SerializationError(
            f"reply of task {task_id!r} "
            + (
                f"declares a {payload_size}-byte payload but has no arrays"
                if arrays is None
                else "has arrays but declares an empty payload"
            )
        )
