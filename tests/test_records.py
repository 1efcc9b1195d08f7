"""Byte encodings of arrays, tasks and replies: exact round trips, clean failures."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlearn.engine.messages import (
    Reply,
    Stage,
    Task,
    decode_reply,
    decode_task,
    encode_reply,
    encode_task,
    seed_for,
)
from fedlearn.engine.records import ALLOWED_DTYPES, decode_arrays, encode_arrays
from fedlearn.errors import SerializationError

dtypes = st.sampled_from(sorted(ALLOWED_DTYPES)).map(np.dtype)
arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, max_side=5))
)
named = st.dictionaries(st.text(min_size=1, max_size=12), arrays, max_size=5)


@given(named)
def test_arrays_round_trip_bit_exact(values: dict[str, np.ndarray]) -> None:
    decoded = decode_arrays(encode_arrays(values))
    assert list(decoded) == list(values)
    for name, a in values.items():
        b = decoded[name]
        assert b.dtype == a.dtype and b.shape == a.shape
        assert b.tobytes() == np.ascontiguousarray(a).tobytes()


def test_decoded_arrays_are_read_only_views() -> None:
    decoded = decode_arrays(encode_arrays({"w": np.arange(4.0)}))
    with pytest.raises(ValueError):
        decoded["w"][0] = 1.0


def test_big_endian_and_non_contiguous_inputs() -> None:
    a = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    decoded = decode_arrays(encode_arrays({"a": a}))["a"]
    np.testing.assert_array_equal(decoded, a)
    assert decoded.dtype == np.dtype("<i4")


def test_object_dtype_is_refused() -> None:
    with pytest.raises(SerializationError, match="cannot be encoded"):
        encode_arrays({"x": np.array([object()])})


def _payload(header: bytes, body: bytes = b"") -> bytes:
    return b"FLA1" + struct.pack("<I", len(header)) + header + body


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "shorter"),
        (b"XXXX\x00\x00\x00\x00", "magic"),
        (b"FLA1\xff\x00\x00\x00[]", "past the end"),
        (b"FLA1\x02\x00\x00\x00{}", "must be a list"),
        (_payload(b'[{"name":"a","dtype":"|O","shape":[1]}]'), "not allowed"),
        (_payload(b'[{"name":"a","dtype":"<f8","shape":[10]}]'), "runs past"),
        (_payload(b'[{"name":"a","dtype":"<f8","shape":[-1]}]'), "non-negative"),
        (_payload(b'[{"name":"a","dtype":"<f8"}]'), "exactly"),
        (_payload(b"[not json"), "not valid JSON"),
    ],
)
def test_malformed_array_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(SerializationError, match=message):
        decode_arrays(payload)


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(SerializationError, match="trailing"):
        decode_arrays(encode_arrays({"a": np.zeros(2)}) + b"x")


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_decoders(data: bytes) -> None:
    for decode in (decode_arrays, decode_reply, decode_task):
        with contextlib.suppress(SerializationError):
            decode(data)


@given(named)
def test_mutated_payload_fails_cleanly_or_decodes(values: dict[str, np.ndarray]) -> None:
    data = bytearray(encode_arrays(values))
    for i in range(0, len(data), 7):
        corrupted = bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :])
        with contextlib.suppress(SerializationError):
            decode_arrays(corrupted)


def test_task_and_reply_round_trip() -> None:
    task = Task(Stage.TRAIN, 3, 17, 12345, {"lr": 0.1, "name": "x", "flag": True})
    assert decode_task(encode_task(task)) == task
    reply = Reply(Stage.TRAIN, 3, 17, 40, {"w": np.arange(3.0)}, None, {"train_loss": 0.5})
    back = decode_reply(encode_reply(reply))
    assert back.num_examples == 40 and back.metrics == {"train_loss": 0.5}
    assert back.arrays is not None
    np.testing.assert_array_equal(back.arrays["w"], [0.0, 1.0, 2.0])
    failed = Reply(Stage.EVALUATE, 1, 2, error="boom")
    assert decode_reply(encode_reply(failed)) == failed


def test_task_seeds_are_distinct_and_stable() -> None:
    seeds = {seed_for(0, r, s, c) for r in range(3) for s in Stage for c in range(50)}
    assert len(seeds) == 3 * len(Stage) * 50
    assert seed_for(7, 2, Stage.TRAIN, 5) == seed_for(7, 2, Stage.TRAIN, 5)
    assert all(0 <= s < 2**63 for s in seeds)
