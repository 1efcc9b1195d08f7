"""The gRPC wire layer: schema, record <-> protobuf conversion, payload chunking."""

from __future__ import annotations

import gc
import hashlib
import math
import mmap
import os
import random
import struct
import time
import tracemalloc
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import ALLOWED_DTYPES, Scalar, decode_arrays, encode_arrays
from fedlearn.errors import SerializationError
from fedlearn.wire import PROTOCOL_VERSION
from fedlearn.wire import fedlearn_pb2 as pb
from fedlearn.wire.chunks import (
    GRPC_DEFAULT_MAX_MESSAGE,
    MAX_CHUNK,
    MAX_TASK_ID_BYTES,
    Assembler,
    ReceiveBuffers,
    check_task_id,
    format_size,
    payload_digest,
    split,
)
from fedlearn.wire.convert import (
    INT64_MAX,
    INT64_MIN,
    UINT32_MAX,
    UINT64_MAX,
    reply_from_proto,
    reply_to_proto,
    scalars_from_proto,
    scalars_to_proto,
    stage_from_proto,
    stage_to_proto,
    task_from_proto,
    task_to_proto,
    value_from_proto,
    value_to_proto,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
EMPTY_SHA = hashlib.sha256(b"").digest()

scalars = st.one_of(
    st.booleans(),
    st.integers(INT64_MIN, INT64_MAX),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
scalar_dicts = st.dictionaries(st.text(max_size=12), scalars, max_size=8)
dtypes = st.sampled_from(sorted(ALLOWED_DTYPES)).map(np.dtype)
arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, max_side=6))
)
named_arrays = st.dictionaries(st.text(min_size=1, max_size=12), arrays, max_size=5)


def same_scalar(a: Scalar, b: Scalar) -> bool:
    """Equal value and type; floats compared bit for bit (NaN, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return a == b


def same_scalars(a: dict[str, Scalar], b: dict[str, Scalar]) -> bool:
    return a.keys() == b.keys() and all(same_scalar(a[k], b[k]) for k in a)


def assemble(chunks: Iterator[pb.Chunk] | list[pb.Chunk], asm: Assembler) -> memoryview:
    for chunk in chunks:
        asm.add(chunk)
    return asm.finish()


# ----------------------------------------------------------------------- generated code


def test_generated_modules_import_under_installed_protobuf() -> None:
    from google.protobuf import __version__ as protobuf_version

    from fedlearn.wire import fedlearn_pb2_grpc

    assert int(protobuf_version.split(".")[0]) >= 6
    assert callable(fedlearn_pb2_grpc.CoordinatorStub)
    assert callable(fedlearn_pb2_grpc.add_CoordinatorServicer_to_server)
    assert issubclass(fedlearn_pb2_grpc.CoordinatorServicer, object)
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    connect = service.methods_by_name["Connect"]
    assert connect.client_streaming and connect.server_streaming
    assert connect.input_type.full_name == "fedlearn.v1.ClientMessage"
    assert connect.output_type.full_name == "fedlearn.v1.ServerMessage"
    assert pb.DESCRIPTOR.package == "fedlearn.v1"
    assert PROTOCOL_VERSION == 3


SCHEMA = {
    "Value": {"bool_value": 1, "int_value": 2, "float_value": 3, "string_value": 4},
    "Chunk": {"task_id": 1, "index": 2, "data": 3, "last": 4, "sha256": 5},
    "Heartbeat": {},
    "ClientMessage": {"hello": 1, "proof": 2, "reply_header": 3, "chunk": 4, "heartbeat": 5},
    "Hello": {"protocol_version": 1, "capabilities": 2, "public_key": 3, "site_name": 4},
    "Proof": {"signature": 1},
    "ReplyHeader": {
        "task_id": 1,
        "stage": 2,
        "round": 3,
        "num_examples": 4,
        "loss": 5,
        "metrics": 6,
        "error": 7,
        "payload_size": 8,
        "message_size": 10,
    },
    "ServerMessage": {
        "challenge": 1,
        "welcome": 2,
        "task_header": 3,
        "chunk": 4,
        "cancel": 5,
        "heartbeat": 6,
    },
    "Challenge": {"nonce": 1, "server_id": 2, "protocol_version": 3, "capabilities": 4},
    "Welcome": {"client_id": 1, "session_id": 2},
    "TaskHeader": {
        "task_id": 1,
        "stage": 2,
        "round": 3,
        "seed": 4,
        "config": 5,
        "payload_size": 6,
        "message_size": 8,
    },
    "Cancel": {"task_id": 1, "reason": 2},
}


def test_field_numbers_are_stable() -> None:
    """Renumbering a field breaks every deployed peer; this pins the schema."""
    from google.protobuf import descriptor_pb2

    assert set(pb.DESCRIPTOR.message_types_by_name) == set(SCHEMA)
    for name, fields in SCHEMA.items():
        message = pb.DESCRIPTOR.message_types_by_name[name]
        assert {f.name: f.number for f in message.fields} == fields, name
    assert {v.name: v.number for v in pb.DESCRIPTOR.enum_types_by_name["Stage"].values} == {
        "STAGE_UNSPECIFIED": 0,
        "STAGE_TRAIN": 1,
        "STAGE_EVALUATE": 2,
        "STAGE_SECAGG_SETUP": 3,
        "STAGE_SECAGG_KEYS": 4,
        "STAGE_SECAGG_SHARES": 5,
        "STAGE_SECAGG_UNMASK": 6,
    }
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    reserved = {m.name: [(r.start, r.end) for r in m.reserved_range] for m in proto.message_type}
    assert reserved["ClientMessage"] == [(10, 16)]  # end is exclusive
    assert reserved["ServerMessage"] == [(10, 16)]
    # protocol version 1's header digests (now on the last chunk) stay reserved
    assert reserved["TaskHeader"] == [(7, 8)] and reserved["ReplyHeader"] == [(9, 10)]
    names = {m.name: list(m.reserved_name) for m in proto.message_type}
    assert names["TaskHeader"] == names["ReplyHeader"] == ["payload_sha256"]
    (stage,) = proto.enum_type
    assert [(r.start, r.end) for r in stage.reserved_range] == [(7, 15)]  # end inclusive


def test_oneofs_and_presence() -> None:
    assert pb.ClientMessage(heartbeat=pb.Heartbeat()).WhichOneof("kind") == "heartbeat"
    assert pb.ServerMessage(cancel=pb.Cancel(task_id="t")).WhichOneof("kind") == "cancel"
    header = pb.ReplyHeader()
    assert not header.HasField("loss") and not header.HasField("error")
    header.loss = 0.0
    header.error = ""
    parsed = pb.ReplyHeader.FromString(header.SerializeToString())
    assert parsed.HasField("loss") and parsed.HasField("error")


def test_max_chunk_fits_grpc_default_limit_exactly() -> None:
    """The largest possible Chunk, in either envelope, stays under 4 MiB."""
    chunk = pb.Chunk(
        task_id="x" * MAX_TASK_ID_BYTES,
        index=UINT32_MAX,
        data=bytes(MAX_CHUNK),
        last=True,
        sha256=bytes(32),
    )
    # task_id: tag + 2-byte length varint + 128; index: tag + 5-byte varint; data: tag +
    # 4-byte length varint + MAX_CHUNK; last: tag + 1; sha256: tag + 1-byte length + 32.
    body = (1 + 2 + MAX_TASK_ID_BYTES) + (1 + 5) + (1 + 4 + MAX_CHUNK) + (1 + 1) + (1 + 1 + 32)
    assert chunk.ByteSize() == body == MAX_CHUNK + 178
    for envelope in (pb.ClientMessage(chunk=chunk), pb.ServerMessage(chunk=chunk)):
        assert envelope.ByteSize() == 1 + 4 + body == MAX_CHUNK + 183
        assert envelope.ByteSize() < GRPC_DEFAULT_MAX_MESSAGE
        assert GRPC_DEFAULT_MAX_MESSAGE - envelope.ByteSize() > 60 * KiB
    # A multi-byte task id is limited by its UTF-8 length, so the bound holds for it too.
    with pytest.raises(SerializationError, match="longer than"):
        check_task_id("é" * (MAX_TASK_ID_BYTES // 2 + 1))
    check_task_id("é" * (MAX_TASK_ID_BYTES // 2))


def test_max_chunk_crosses_a_real_grpc_stream_with_default_limits() -> None:
    import grpc

    from fedlearn.wire import fedlearn_pb2_grpc

    class Echo(fedlearn_pb2_grpc.CoordinatorServicer):
        def Connect(  # noqa: N802 (the generated servicer's name)
            self, request_iterator: Iterator[Any], context: Any
        ) -> Iterator[pb.ServerMessage]:
            for message in request_iterator:  # ChunkMessages: fedlearn.wire.codec parses them
                c = message.chunk
                yield pb.ServerMessage(
                    chunk=pb.Chunk(
                        task_id=c.task_id,
                        index=c.index,
                        data=bytes(c.data),
                        last=c.last,
                        sha256=c.sha256,
                    )
                )

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    fedlearn_pb2_grpc.add_CoordinatorServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = fedlearn_pb2_grpc.CoordinatorStub(channel)
            payload = os.urandom(MAX_CHUNK + 1000)
            task_id = "t" * MAX_TASK_ID_BYTES
            sent = list(split(payload, task_id))
            replies = stub.Connect(iter([pb.ClientMessage(chunk=c) for c in sent]), timeout=30)
            asm = Assembler(task_id, len(payload), max_size=GiB)
            assert bytes(assemble((r.chunk for r in replies), asm)) == payload
            # Over the limit, the same stream fails: the bound above is the real one.
            too_big = pb.Chunk(task_id="t", data=bytes(GRPC_DEFAULT_MAX_MESSAGE), last=True)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Connect(iter([pb.ClientMessage(chunk=too_big)]), timeout=30))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(grace=None)


# ------------------------------------------------------------------------------ scalars


@given(scalars)
def test_value_round_trip_keeps_type_and_bits(value: Scalar) -> None:
    proto = pb.Value.FromString(value_to_proto(value).SerializeToString())
    assert same_scalar(value_from_proto(proto), value)


@given(scalar_dicts)
def test_config_round_trip(values: dict[str, Scalar]) -> None:
    header = pb.TaskHeader(config=scalars_to_proto(values))
    parsed = pb.TaskHeader.FromString(header.SerializeToString())
    assert same_scalars(scalars_from_proto(parsed.config), values)


def test_bool_is_not_sent_as_int() -> None:
    assert value_to_proto(True).WhichOneof("kind") == "bool_value"
    assert value_to_proto(False).WhichOneof("kind") == "bool_value"
    assert value_to_proto(1).WhichOneof("kind") == "int_value"
    assert value_to_proto(0).WhichOneof("kind") == "int_value"
    assert value_to_proto(1.0).WhichOneof("kind") == "float_value"
    back = scalars_from_proto(scalars_to_proto({"a": True, "b": 1, "c": 1.0, "d": "1"}))
    assert [type(v) for v in back.values()] == [bool, int, float, str]


def test_numpy_scalars_become_python_scalars() -> None:
    values = {"b": np.bool_(True), "i": np.int64(-3), "u": np.uint8(7), "f": np.float32(0.5)}
    back = scalars_from_proto(scalars_to_proto(values, "metrics"))
    assert same_scalars(back, {"b": True, "i": -3, "u": 7, "f": 0.5})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"a": [1, 2]}, "list"),
        ({"a": {"b": 1}}, "dict"),
        ({"a": None}, "NoneType"),
        ({"a": b"raw"}, "bytes"),
        ({"a": np.zeros(3)}, "ndarray"),
        ({"a": 1 + 2j}, "complex"),
        ({"a": 2**63}, "64 bits"),
        ({"a": INT64_MIN - 1}, "64 bits"),
        ({"a": "\ud800"}, "UTF-8"),
        ({"\ud800": 1}, "UTF-8"),
        ({1: 1}, "not a string"),
    ],
)
def test_non_scalar_config_is_rejected(values: dict[Any, Any], message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        scalars_to_proto(values)
    task = Task(Stage.TRAIN, 0, 0, 0, values)
    with pytest.raises(SerializationError, match=message):
        task_to_proto(task, task_id="t", payload_size=0)


def test_config_must_be_a_mapping() -> None:
    with pytest.raises(SerializationError, match="mapping"):
        scalars_to_proto([("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="bool, int, float or str"):
        value_to_proto(None)  # type: ignore[arg-type]


def test_int64_bounds_are_accepted() -> None:
    back = scalars_from_proto(scalars_to_proto({"lo": INT64_MIN, "hi": INT64_MAX}))
    assert back == {"lo": INT64_MIN, "hi": INT64_MAX}


def test_value_without_kind_is_malformed() -> None:
    with pytest.raises(SerializationError, match="no kind"):
        value_from_proto(pb.Value())
    header = pb.ReplyHeader()
    header.metrics["acc"].CopyFrom(pb.Value())
    with pytest.raises(SerializationError, match="metrics value 'acc'"):
        scalars_from_proto(header.metrics, "metrics")


# ------------------------------------------------------------------------------- stages


def test_stage_round_trip() -> None:
    for stage in Stage:
        assert stage_from_proto(stage_to_proto(stage)) is stage
    assert stage_to_proto(Stage.TRAIN) == pb.STAGE_TRAIN
    assert stage_to_proto(Stage.EVALUATE) == pb.STAGE_EVALUATE


def test_unspecified_and_unknown_stages_are_rejected() -> None:
    with pytest.raises(SerializationError, match="unspecified"):
        stage_from_proto(pb.STAGE_UNSPECIFIED)
    with pytest.raises(SerializationError, match="unknown stage 7"):
        stage_from_proto(7)
    with pytest.raises(SerializationError, match="no wire representation"):
        stage_to_proto("aggregate")  # type: ignore[arg-type]
    header = pb.TaskHeader(task_id="t")  # stage left at 0
    with pytest.raises(SerializationError, match="unspecified"):
        task_from_proto(pb.TaskHeader.FromString(header.SerializeToString()), client_id=1)
    # A peer from the future may send a stage number this version does not know.
    future = pb.ReplyHeader.FromString(b"\x0a\x01t\x10\x09" + b"\x4a\x20" + EMPTY_SHA)
    with pytest.raises(SerializationError, match="unknown stage 9"):
        reply_from_proto(future, client_id=1, arrays=None)


# ------------------------------------------------------------------------------ headers


@given(
    stage=st.sampled_from(list(Stage)),
    rnd=st.integers(0, UINT32_MAX),
    client_id=st.integers(0, 2**40),
    seed=st.integers(0, UINT64_MAX),
    config=scalar_dicts,
    payload_size=st.integers(0, UINT64_MAX),
)
def test_task_round_trip(
    stage: Stage,
    rnd: int,
    client_id: int,
    seed: int,
    config: dict[str, Scalar],
    payload_size: int,
) -> None:
    task = Task(stage, rnd, client_id, seed, config)
    header = task_to_proto(task, task_id="task-1", payload_size=payload_size)
    parsed = pb.TaskHeader.FromString(header.SerializeToString())
    assert (parsed.task_id, parsed.payload_size) == ("task-1", payload_size)
    back = task_from_proto(parsed, client_id=client_id)
    assert (back.stage, back.round, back.client_id, back.seed) == (stage, rnd, client_id, seed)
    assert same_scalars(back.config, config)


@given(
    stage=st.sampled_from(list(Stage)),
    rnd=st.integers(0, UINT32_MAX),
    num_examples=st.integers(0, UINT64_MAX),
    loss=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    metrics=scalar_dicts,
    error=st.none() | st.text(max_size=30),
    values=st.none() | named_arrays,
)
def test_reply_round_trip(
    stage: Stage,
    rnd: int,
    num_examples: int,
    loss: float | None,
    metrics: dict[str, Scalar],
    error: str | None,
    values: dict[str, np.ndarray] | None,
) -> None:
    reply = Reply(stage, rnd, 9, num_examples, values, loss, metrics, error)
    payload = b"" if values is None else encode_arrays(values)
    header = reply_to_proto(reply, task_id="t-9", payload_size=len(payload))
    parsed = pb.ReplyHeader.FromString(header.SerializeToString())
    asm = Assembler(parsed.task_id, parsed.payload_size, max_size=GiB)
    view = assemble(split(payload, "t-9", chunk_size=64), asm)
    back = reply_from_proto(
        parsed, client_id=9, arrays=decode_arrays(view) if parsed.payload_size else None
    )
    assert (back.stage, back.round, back.client_id, back.num_examples) == (
        stage,
        rnd,
        9,
        num_examples,
    )
    assert back.error == error and back.ok == reply.ok
    assert (back.loss is None) == (loss is None)
    if loss is not None and back.loss is not None:
        assert same_scalar(back.loss, loss)
    assert same_scalars(back.metrics, metrics)
    if values is None:
        assert back.arrays is None
    else:
        assert back.arrays is not None and list(back.arrays) == list(values)
        for name, a in values.items():
            b = back.arrays[name]
            assert b.dtype == a.dtype and b.shape == a.shape
            assert b.tobytes() == np.ascontiguousarray(a).tobytes()


def test_failed_reply_with_empty_message_stays_failed() -> None:
    reply = Reply(Stage.TRAIN, 1, 2, error="")
    header = reply_to_proto(reply, task_id="t", payload_size=0)
    back = reply_from_proto(
        pb.ReplyHeader.FromString(header.SerializeToString()), client_id=2, arrays=None
    )
    assert back.error == "" and not back.ok


def test_empty_arrays_are_distinct_from_no_arrays() -> None:
    payload = encode_arrays({})
    assert len(payload) > 0
    reply = Reply(Stage.TRAIN, 1, 2, 5, arrays={})
    header = reply_to_proto(reply, task_id="t", payload_size=len(payload))
    assert reply_from_proto(header, client_id=2, arrays=decode_arrays(payload)).arrays == {}


def test_payloads_over_2_gib_are_accepted_by_headers() -> None:
    big = int(2.5 * GiB)
    task = Task(Stage.TRAIN, 4, 1, 99, {"lr": 0.1})
    header = task_to_proto(task, task_id="t", payload_size=big)
    parsed = pb.ServerMessage.FromString(pb.ServerMessage(task_header=header).SerializeToString())
    assert parsed.task_header.payload_size == big
    task_from_proto(parsed.task_header, client_id=1)
    reply = Reply(Stage.TRAIN, 4, 1, 10, arrays={})
    rheader = reply_to_proto(reply, task_id="t", payload_size=big)
    rparsed = pb.ClientMessage.FromString(
        pb.ClientMessage(reply_header=rheader).SerializeToString()
    )
    assert rparsed.reply_header.payload_size == big
    assert reply_from_proto(rparsed.reply_header, client_id=1, arrays={}).arrays == {}
    # The largest uint64 size survives too.
    header = task_to_proto(task, task_id="t", payload_size=UINT64_MAX)
    assert pb.TaskHeader.FromString(header.SerializeToString()).payload_size == UINT64_MAX


@pytest.mark.parametrize(
    "change, message",
    [
        ({"round": -1}, "round"),
        ({"round": 2**32}, "round"),
        ({"round": True}, "round"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"task_id": ""}, "non-empty"),
        ({"task_id": "x" * (MAX_TASK_ID_BYTES + 1)}, "longer than"),
        ({"task_id": "\udc80"}, "UTF-8"),
        ({"payload_size": -1}, "payload size"),
        ({"payload_size": 2**64}, "payload size"),
        ({"config": {"a": [1]}}, "list"),
    ],
)
def test_bad_task_headers_are_rejected(change: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "stage": Stage.TRAIN,
        "round": 1,
        "seed": 2,
        "config": {},
        "task_id": "t",
        "payload_size": 0,
    }
    fields.update(change)
    task = Task(fields["stage"], fields["round"], 0, fields["seed"], fields["config"])
    with pytest.raises(SerializationError, match=message):
        task_to_proto(
            task,
            task_id=fields["task_id"],
            payload_size=fields["payload_size"],
        )


def test_bad_headers_from_the_wire_are_rejected() -> None:
    with pytest.raises(SerializationError, match="non-empty"):
        task_from_proto(pb.TaskHeader(stage=pb.STAGE_TRAIN), client_id=1)
    with pytest.raises(SerializationError, match="2-byte message in a 1-byte payload"):
        task_from_proto(
            pb.TaskHeader(task_id="t", stage=pb.STAGE_TRAIN, payload_size=1, message_size=2),
            client_id=1,
        )


@pytest.mark.parametrize(
    "reply, size, message",
    [
        (Reply(Stage.TRAIN, 1, 1, arrays={}), 0, "declares an empty payload"),
        (Reply(Stage.TRAIN, 1, 1), 10, "has no arrays"),
        (Reply(Stage.TRAIN, 1, 1, num_examples=-1), 0, "num_examples"),
        (Reply(Stage.TRAIN, 1, 1, num_examples=2**64), 0, "num_examples"),
        (Reply(Stage.TRAIN, 2**32, 1), 0, "round"),
        (Reply(Stage.TRAIN, 1, 1, loss="0.5"), 0, "loss"),  # type: ignore[arg-type]
        (Reply(Stage.TRAIN, 1, 1, loss=True), 0, "loss"),
        (Reply(Stage.TRAIN, 1, 1, metrics={"m": None}), 0, "metrics value 'm'"),  # type: ignore[dict-item]
        (Reply(Stage.TRAIN, 1, 1, error="\ud800"), 0, "UTF-8"),
    ],
)
def test_bad_replies_are_rejected(reply: Reply, size: int, message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        reply_to_proto(reply, task_id="t", payload_size=size)


def test_reply_arrays_must_match_the_declared_payload() -> None:
    header = pb.ReplyHeader(task_id="t", stage=pb.STAGE_TRAIN)
    with pytest.raises(SerializationError, match="declares an empty payload"):
        reply_from_proto(header, client_id=1, arrays={})
    header.payload_size = 5
    with pytest.raises(SerializationError, match="has no arrays"):
        reply_from_proto(header, client_id=1, arrays=None)


def test_integral_loss_becomes_float() -> None:
    header = reply_to_proto(Reply(Stage.EVALUATE, 1, 1, loss=2), task_id="t", payload_size=0)
    assert reply_from_proto(header, client_id=1, arrays=None).loss == 2.0


# ------------------------------------------------------------------------------- chunks


def test_split_is_lazy_and_sized() -> None:
    payload = os.urandom(10 * KiB + 1)
    chunks = split(payload, "t", chunk_size=KiB)
    assert iter(chunks) is chunks and not isinstance(chunks, list | tuple)
    first = next(chunks)
    assert (first.index, len(first.data), first.last) == (0, KiB, False)
    rest = list(chunks)
    assert [c.index for c in rest] == list(range(1, 11))
    assert [len(c.data) for c in rest] == [KiB] * 9 + [1]
    assert [c.last for c in rest] == [False] * 9 + [True]
    assert b"".join(c.data for c in [first, *rest]) == payload
    assert {c.task_id for c in rest} == {"t"}


def test_split_default_is_max_chunk_and_accepts_views() -> None:
    payload = bytearray(os.urandom(MAX_CHUNK + 5))
    chunks = list(split(memoryview(payload), "t"))
    assert [len(c.data) for c in chunks] == [MAX_CHUNK, 5]
    # Any C-contiguous buffer works, read as bytes.
    a = np.arange(10, dtype=np.float64)
    assert b"".join(c.data for c in split(a.data, "t", 7)) == a.tobytes()


def test_split_edge_sizes() -> None:
    assert list(split(b"", "t")) == []
    (one,) = split(b"abc", "t", chunk_size=3)
    assert (one.index, one.data, one.last) == (0, b"abc", True)
    with pytest.raises(ValueError, match="chunk_size"):
        next(split(b"abc", "t", chunk_size=0))
    with pytest.raises(ValueError, match="chunk_size"):
        next(split(b"abc", "t", chunk_size=MAX_CHUNK + 1))
    with pytest.raises(SerializationError, match="non-empty"):
        next(split(b"abc", ""))


def test_payload_digest_is_sha256() -> None:
    assert payload_digest(b"abc") == hashlib.sha256(b"abc").digest()
    assert payload_digest(memoryview(b"abc")) == payload_digest(bytearray(b"abc"))
    assert payload_digest(b"") == EMPTY_SHA


@settings(max_examples=150)
@given(values=named_arrays, chunk_size=st.integers(1, 300))
def test_arrays_round_trip_through_chunks(values: dict[str, np.ndarray], chunk_size: int) -> None:
    payload = encode_arrays(values)
    asm = Assembler("job-1/c3", len(payload), max_size=len(payload))
    view = assemble(split(payload, "job-1/c3", chunk_size), asm)
    assert asm.complete and asm.received == len(payload)
    decoded = decode_arrays(view)
    assert list(decoded) == list(values)
    for name, a in values.items():
        b = decoded[name]
        assert b.dtype == a.dtype and b.shape == a.shape
        assert b.tobytes() == np.ascontiguousarray(a).tobytes()


def test_finished_payload_is_read_only_and_final() -> None:
    payload = encode_arrays({"w": np.arange(6.0)})
    asm = Assembler("t", len(payload), max_size=MiB)
    view = assemble(split(payload, "t", 16), asm)
    assert view.readonly and bytes(view) == payload
    assert asm.finish() is view
    with pytest.raises(ValueError):
        decode_arrays(view)["w"][0] = 1.0
    with pytest.raises(SerializationError, match="after the payload was finished"):
        asm.add(pb.Chunk(task_id="t", index=99, data=b"x"))


def test_empty_payload_needs_no_chunk_but_accepts_an_empty_last_one() -> None:
    assert bytes(Assembler("t", 0, max_size=0).finish()) == b""
    asm = Assembler("t", 0, max_size=0)
    asm.add(pb.Chunk(task_id="t", index=0, last=True, sha256=EMPTY_SHA))
    assert bytes(asm.finish()) == b""
    asm = Assembler("t", 0, max_size=0)
    asm.add(pb.Chunk(task_id="t", index=0, last=True, sha256=payload_digest(b"x")))
    with pytest.raises(SerializationError, match="digest mismatch"):
        asm.finish()
    asm = Assembler("t", 0, max_size=0)
    with pytest.raises(SerializationError, match="overflows"):
        asm.add(pb.Chunk(task_id="t", index=0, data=b"x", last=True))


def test_trailing_empty_last_chunk_is_accepted() -> None:
    payload = b"0123456789"
    asm = Assembler("t", 10, max_size=100)
    asm.add(pb.Chunk(task_id="t", index=0, data=payload))
    assert not asm.complete
    asm.add(pb.Chunk(task_id="t", index=1, last=True, sha256=payload_digest(payload)))
    assert bytes(asm.finish()) == payload


PAYLOAD = bytes(range(256)) * 4  # 1 KiB, 8 chunks of 128 bytes
TID = "t-7"


def chunks_of(payload: bytes = PAYLOAD) -> list[pb.Chunk]:
    return list(split(payload, TID, chunk_size=128))


def new_assembler(payload: bytes = PAYLOAD) -> Assembler:
    return Assembler(TID, len(payload), max_size=64 * KiB)


def copy_chunk(chunk: pb.Chunk, **changes: Any) -> pb.Chunk:
    out = pb.Chunk()
    out.CopyFrom(chunk)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def malformed_sequences() -> list[tuple[str, list[pb.Chunk], str]]:
    c = chunks_of()
    return [
        ("wrong task id", [c[0], copy_chunk(c[1], task_id="t-8")], "task 't-8'.*assembling"),
        ("gap", [c[0], c[1], c[3]], "chunk 3 of task 't-7' arrived before chunk 2"),
        ("first missing", c[1:], r"chunk 1 .* before chunk 0 \(the first\)"),
        ("duplicate", [c[0], c[1], c[1]], "chunk 1 of task 't-7' arrived twice"),
        ("reordered", [*c[:6], c[3]], "chunk 3 of task 't-7' arrived after chunk 5"),
        ("overflow", [*c[:-1], copy_chunk(c[-1], data=c[-1].data + b"!")], "overflows"),
        ("overflow mid", [copy_chunk(c[0], data=PAYLOAD + b"!")], "overflows"),
        ("missing last", [*c[:-1], copy_chunk(c[-1], last=False, sha256=b"")], "never marked last"),
        ("truncated", c[:-1], "incomplete: 896 of 1024 bytes"),
        ("nothing", [], "incomplete: 0 of 1024 bytes"),
        ("early last", [c[0], copy_chunk(c[1], last=True)], "marked last .* byte 256 of 1024"),
        ("after last", [*c, copy_chunk(c[0], index=8, last=True)], "after the last chunk 7"),
        ("empty not last", [c[0], copy_chunk(c[1], data=b"")], "empty but not marked last"),
        (
            "digest mismatch",
            [*c[:2], copy_chunk(c[2], data=b"\xff" + c[2].data[1:]), *c[3:]],
            "digest mismatch",
        ),
        ("wrong digest", [*c[:-1], copy_chunk(c[-1], sha256=bytes(32))], "digest mismatch"),
        ("no digest", [*c[:-1], copy_chunk(c[-1], sha256=b"")], "does not carry the payload's"),
        ("short digest", [*c[:-1], copy_chunk(c[-1], sha256=bytes(31))], "32-byte SHA-256"),
        (
            "digest too early",
            [copy_chunk(c[0], sha256=c[-1].sha256), *c[1:]],
            "chunk 0 .* carries a digest but is not the last",
        ),
    ]


@pytest.mark.parametrize(
    "sequence, message",
    [pytest.param(seq, msg, id=name) for name, seq, msg in malformed_sequences()],
)
def test_malformed_chunk_sequences(sequence: list[pb.Chunk], message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        assemble(sequence, new_assembler())


def test_oversized_chunk_is_rejected() -> None:
    asm = Assembler("t", MAX_CHUNK + 1, max_size=GiB)
    with pytest.raises(SerializationError, match="chunk limit"):
        asm.add(pb.Chunk(task_id="t", index=0, data=bytes(MAX_CHUNK + 1)))


def test_oversized_payload_is_refused_before_any_allocation() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(
            SerializationError, match="payload of 5 GiB for task 't-7' exceeds the 2 GiB limit"
        ):
            Assembler("t-7", 5 * GiB, max_size=2 * GiB)
        with pytest.raises(SerializationError, match=r"2\.5 GiB .* exceeds the 2 GiB limit"):
            Assembler("t-7", int(2.5 * GiB), max_size=2 * GiB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < MiB


@pytest.mark.parametrize(
    "args, message",
    [
        (("t", -1, 10), "negative"),
        (("t", 1.5, 10), "must be an int"),
        (("", 1, 10), "non-empty"),
        (("t", 11, 10), "11 bytes for task 't' exceeds the 10 bytes limit"),
    ],
)
def test_bad_assembler_arguments(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        Assembler(*args)


def test_format_size() -> None:
    assert format_size(17) == "17 bytes"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(5 * GiB) == "5 GiB"
    assert format_size(int(2.5 * GiB)) == "2.5 GiB"
    assert format_size(3 * 1024 * 1024 * GiB) == "3 PiB"


def test_buffers_grow_with_the_bytes_that_arrive() -> None:
    size, chunk_size = 32 * MiB, MiB
    payload = os.urandom(size)
    gc.collect()
    tracemalloc.start()
    try:
        asm = Assembler("t", size, max_size=size)
        after_init, _ = tracemalloc.get_traced_memory()
        held = []
        for chunk in split(payload, "t", chunk_size):
            asm.add(chunk)
            held.append(tracemalloc.get_traced_memory()[0] - after_init)
        view = asm.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bytes(view) == payload
    assert after_init < 64 * KiB  # the declaration alone costs nothing
    # After each chunk the buffer holds what arrived, plus bytearray's growth headroom
    # (an eighth) and the one chunk in flight; never the declared size ahead of the bytes.
    for received, grown in zip(range(chunk_size, size + 1, chunk_size), held, strict=True):
        assert grown < received * 9 // 8 + 2 * chunk_size, (received, grown)
    assert peak < size * 9 // 8 + 3 * chunk_size  # never a second payload


def test_a_huge_declaration_allocates_nothing_until_bytes_arrive() -> None:
    # A peer declares 3 GiB (within the limit) and sends 10 bytes: 10 bytes are held, at
    # once (no zeroed 3 GiB buffer, no seconds spent holding the GIL to fill it).
    tracemalloc.start()
    try:
        started = time.perf_counter()
        asm = Assembler("t", 3 * GiB, max_size=4 * GiB, buffers=ReceiveBuffers())
        asm.add(pb.Chunk(task_id="t", index=0, data=b"0123456789"))
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert asm.received == 10 and not asm.complete
    assert peak < MiB and elapsed < 0.5
    with pytest.raises(SerializationError, match="incomplete: 10 of 3221225472 bytes"):
        asm.finish()


@pytest.mark.skipif(
    os.environ.get("FEDLEARN_LARGE_TESTS") != "1",
    reason="moves a real 2.5 GiB payload (about 2.6 GiB RAM); set FEDLEARN_LARGE_TESTS=1",
)
def test_payload_over_2_gib_crosses_in_chunks() -> None:
    size = int(2.5 * GiB) + 12345
    # A private anonymous mapping reads as the shared zero page: the source costs no memory.
    source = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = memoryview(source)
        view[size - 5 :] = b"tail!"
        task = Task(Stage.TRAIN, 1, 1, 1)
        header = task_to_proto(task, task_id="big", payload_size=size)
        parsed = pb.TaskHeader.FromString(header.SerializeToString())
        asm = Assembler(parsed.task_id, parsed.payload_size, 3 * GiB)
        count = 0
        for chunk in split(view, "big"):
            asm.add(chunk)
            count += 1
        out = asm.finish()
        assert count == math.ceil(size / MAX_CHUNK) and count > 2**31 // MAX_CHUNK
        assert len(out) == size and bytes(out[-5:]) == b"tail!" and out[2**31] == 0
        del out, asm
        view.release()
    finally:
        source.close()


# --------------------------------------------------------------------------------- fuzz

MUTATIONS = [
    "shuffle",
    "drop",
    "duplicate",
    "swap",
    "flip",
    "truncate",
    "extend",
    "reindex",
    "toggle_last",
    "retask",
    "insert",
]


def mutate(chunks: list[pb.Chunk], op: str, rng: random.Random) -> list[pb.Chunk]:
    out = list(chunks)
    if op == "insert" or not out:
        fake = pb.Chunk(
            task_id=TID,
            index=rng.randrange(len(out) + 2),
            data=rng.randbytes(rng.randrange(5)),
            last=rng.random() < 0.5,
        )
        out.insert(rng.randrange(len(out) + 1), fake)
        return out
    i = rng.randrange(len(out))
    c = out[i]
    if op == "shuffle":
        rng.shuffle(out)
    elif op == "drop":
        del out[i]
    elif op == "duplicate":
        out.insert(rng.randrange(len(out) + 1), c)
    elif op == "swap":
        j = rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    elif op == "flip" and c.data:
        k = rng.randrange(len(c.data))
        bit = 1 << rng.randrange(8)
        out[i] = copy_chunk(c, data=c.data[:k] + bytes([c.data[k] ^ bit]) + c.data[k + 1 :])
    elif op == "truncate":
        out[i] = copy_chunk(c, data=c.data[: rng.randrange(len(c.data) + 1)])
    elif op == "extend":
        out[i] = copy_chunk(c, data=c.data + rng.randbytes(rng.randrange(1, 4)))
    elif op == "reindex":
        out[i] = copy_chunk(
            c, index=rng.choice([0, min(c.index + 1, UINT32_MAX), max(c.index - 1, 0), UINT32_MAX])
        )
    elif op == "toggle_last":
        out[i] = copy_chunk(c, last=not c.last)
    elif op == "retask":
        out[i] = copy_chunk(c, task_id=rng.choice(["t-70", "t", "T-7"]))
    return out


@settings(max_examples=1000)
@given(
    payload=st.binary(max_size=300),
    chunk_size=st.integers(1, 64),
    ops=st.lists(st.sampled_from(MUTATIONS), max_size=4),
    seed=st.integers(0, 2**32),
    size_delta=st.sampled_from([0, 0, 0, -1, 1]),
    bad_digest=st.booleans(),
)
def test_fuzzed_chunk_streams_fail_cleanly_or_return_the_exact_payload(
    payload: bytes,
    chunk_size: int,
    ops: list[str],
    seed: int,
    size_delta: int,
    bad_digest: bool,
) -> None:
    rng = random.Random(seed)
    chunks = list(split(payload, TID, chunk_size))
    if bad_digest and chunks:
        digest = chunks[-1].sha256
        chunks[-1] = copy_chunk(chunks[-1], sha256=bytes([digest[0] ^ 1]) + digest[1:])
    for op in ops:
        chunks = mutate(chunks, op, rng)
    declared = max(len(payload) + size_delta, 0)
    try:
        asm = Assembler(TID, declared, max_size=1024)
        result = assemble(chunks, asm)
    except SerializationError:
        return
    if declared == 0 and not chunks:
        # A header declaring an empty payload is answered by no chunk, hence no digest
        # (protocol 2 carries it on the last chunk): nothing is there to check.
        assert bytes(result) == b""
        return
    assert bytes(result) == payload
    assert not (bad_digest and payload)


# ------------------------------------------------------------- hand-built chunk frames


@settings(max_examples=100)
@given(
    parts=st.lists(st.binary(max_size=200), max_size=4),
    suffix=st.binary(max_size=20),
    chunk_size=st.integers(1, 90),
    task_id=st.sampled_from(["t", "r1-train-c0-abcd", "é" * 64, "x" * MAX_TASK_ID_BYTES]),
)
def test_frames_are_protobufs_bytes_and_parse_back_without_copies(
    parts: list[bytes], suffix: bytes, chunk_size: int, task_id: str
) -> None:
    from fedlearn.wire import codec
    from fedlearn.wire.chunks import ChunkMessage, Digest, frames, parse_chunk_message

    reference = list(split(b"".join(parts) + suffix, task_id, chunk_size))
    framed = list(frames(parts, task_id, Digest(parts), suffix, chunk_size))
    for kind in (pb.ServerMessage, pb.ClientMessage):
        assert framed == [kind(chunk=c).SerializeToString() for c in reference]
    for kind, parse in (
        (pb.ServerMessage, codec.ServerMessage.FromString),
        (pb.ClientMessage, codec.ClientMessage.FromString),
    ):
        for raw, c in zip(framed, reference, strict=True):
            message = parse(raw)
            assert isinstance(message, ChunkMessage) and message.WhichOneof("kind") == "chunk"
            got = message.chunk
            assert isinstance(got.data, memoryview) and got.data.obj is raw  # a view, no copy
            assert (got.task_id, got.index, bytes(got.data), got.last, got.sha256) == (
                c.task_id,
                c.index,
                c.data,
                c.last,
                c.sha256,
            )
            assert kind.FromString(raw).chunk == c
    # without a digest (TLS): the same frames, the last one without its sha256 field
    bare = [pb.Chunk(task_id=c.task_id, index=c.index, data=c.data, last=c.last) for c in reference]
    unhashed = list(frames(parts, task_id, None, suffix, chunk_size))
    assert unhashed == [pb.ServerMessage(chunk=c).SerializeToString() for c in bare]
    assert all(codec.ClientMessage.SerializeToString(f) is f for f in framed)
    if not reference:
        assert parse_chunk_message(b"") is None


def test_other_messages_and_odd_encodings_go_to_protobuf() -> None:
    from google.protobuf.message import DecodeError

    from fedlearn.wire import codec
    from fedlearn.wire.chunks import parse_chunk_message

    hello = pb.ClientMessage(hello=pb.Hello(protocol_version=2, site_name="s"))
    assert codec.ClientMessage.FromString(hello.SerializeToString()) == hello
    assert codec.ClientMessage.SerializeToString(hello) == hello.SerializeToString()
    header = pb.ServerMessage(task_header=pb.TaskHeader(task_id="t", payload_size=3))
    assert codec.ServerMessage.FromString(header.SerializeToString()) == header
    chunk = pb.Chunk(task_id="t", index=2, data=b"abc", last=True, sha256=bytes(32))
    raw = pb.ClientMessage(chunk=chunk).SerializeToString()
    assert parse_chunk_message(raw) is not None
    # Protobuf's rules decide whatever the fast path does not handle: two chunk fields
    # (merged), a repeated field (the last one wins), an unknown field (skipped), bad UTF-8.
    merged = codec.ClientMessage.FromString(raw + b"\x22\x02\x10\x05")
    assert parse_chunk_message(raw + b"\x22\x02\x10\x05") is None
    assert isinstance(merged, pb.ClientMessage) and merged.chunk.index == 5
    assert merged.chunk.data == b"abc"
    twice = raw[:1] + bytes([raw[1] + 3]) + raw[2:] + b"\x0a\x01u"
    assert parse_chunk_message(twice) is None
    assert codec.ClientMessage.FromString(twice).chunk.task_id == "u"
    unknown = pb.ClientMessage(chunk=pb.Chunk(task_id="t", data=b"x")).SerializeToString()
    unknown = unknown[:1] + bytes([unknown[1] + 2]) + unknown[2:] + b"\x38\x01"  # field 7
    assert parse_chunk_message(unknown) is None
    assert codec.ClientMessage.FromString(unknown).chunk.data == b"x"
    bad_utf8 = b"\x22\x03\x0a\x01\xff"
    assert parse_chunk_message(bad_utf8) is None
    with pytest.raises(DecodeError):  # as before: gRPC then ends the call
        codec.ClientMessage.FromString(bad_utf8)


def test_digest_hashes_in_the_background_and_serves_many_streams() -> None:
    from fedlearn.wire.chunks import BACKGROUND_HASH_MIN, Digest

    big = [os.urandom(BACKGROUND_HASH_MIN), memoryview(os.urandom(1000))]
    for parts in (big, [b"small", b""], []):
        digest = Digest(parts)
        whole = b"".join(bytes(p) for p in parts)
        assert digest.result() == hashlib.sha256(whole).digest()
        assert digest.result(b"msg") == hashlib.sha256(whole + b"msg").digest()
        assert digest.result() == hashlib.sha256(whole).digest()  # the suffix did not stick


def test_receive_buffers_are_reused_only_when_nothing_refers_to_them() -> None:
    from fedlearn.wire.chunks import ReceiveBuffers

    buffers = ReceiveBuffers()

    def receive(values: np.ndarray) -> dict[str, np.ndarray]:
        payload = encode_arrays({"w": values})
        asm = Assembler("t", len(payload), max_size=MiB, buffers=buffers)
        return decode_arrays(assemble(split(payload, "t", 100), asm))

    first = receive(np.arange(100.0))
    kept = first["w"]  # say, a strategy or an app holds on to an array
    del first
    second = receive(np.arange(100.0) + 1)  # must not land in the buffer `kept` lives in
    assert buffers.reused == 0
    assert np.array_equal(kept, np.arange(100.0)) and np.array_equal(second["w"], kept + 1)
    del kept, second
    gc.collect()
    third = receive(np.arange(100.0) + 2)  # the last buffer is free now: reused
    assert buffers.reused == 1 and np.array_equal(third["w"], np.arange(100.0) + 2)
    view = third["w"][10:20]  # any view (a slice, a memoryview) keeps it in use
    del third
    fourth = receive(np.arange(100.0) + 3)
    assert buffers.reused == 1 and np.array_equal(view, np.arange(10.0, 20.0) + 2)
    del fourth, view
    assert len(receive(np.arange(50.0))["w"]) == 50  # another size: a new buffer
    assert buffers.reused == 1


def test_over_tls_a_digest_is_optional_but_checked_when_sent() -> None:
    payload = bytes(range(256)) * 40
    chunks = list(split(payload, "t", chunk_size=1000))
    bare = [pb.Chunk(task_id=c.task_id, index=c.index, data=c.data, last=c.last) for c in chunks]
    # TLS: no digest is fine; a digest that is sent must match
    asm = Assembler("t", len(payload), max_size=MiB, require_digest=False)
    for c in bare:
        asm.add(c)
    assert bytes(asm.finish()) == payload
    asm = Assembler("t", len(payload), max_size=MiB, require_digest=False)
    for c in chunks:
        asm.add(c)
    assert bytes(asm.finish()) == payload
    wrong = [
        *chunks[:-1],
        pb.Chunk(
            task_id="t", index=chunks[-1].index, data=chunks[-1].data, last=True, sha256=bytes(32)
        ),
    ]
    asm = Assembler("t", len(payload), max_size=MiB, require_digest=False)
    for c in wrong:
        asm.add(c)
    with pytest.raises(SerializationError, match="digest mismatch"):
        asm.finish()
    # plaintext: the digest is required
    asm = Assembler("t", len(payload), max_size=MiB)
    for c in bare[:-1]:
        asm.add(c)
    with pytest.raises(SerializationError, match="does not carry"):
        asm.add(bare[-1])
