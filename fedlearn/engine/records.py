"""Records: named arrays, config and metric values, and their pickle-free byte encoding.

``Arrays`` is an ordered mapping from a name to a numpy array (a model's tensors).
Encoding is a small header (names, dtypes, shapes) followed by the raw bytes of each
array; decoding never runs code and round-trips bit-exactly.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any, TypeAlias

import numpy as np

from fedlearn.errors import SerializationError

Scalar: TypeAlias = bool | int | float | str
Config: TypeAlias = dict[str, Scalar]
Metrics: TypeAlias = dict[str, Scalar]
Arrays: TypeAlias = dict[str, np.ndarray]

MAGIC = b"FLA1"
_HEADER = struct.Struct("<4sI")
ALLOWED_DTYPES = frozenset(
    np.dtype(t).str
    for t in (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    )
)


def arrays_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Total payload size of ``arrays`` in bytes."""
    return sum(a.nbytes for a in arrays.values())


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Encode named arrays as header + raw little-endian bytes (no pickle)."""
    return b"".join(encode_arrays_parts(arrays))


def encode_arrays_parts(arrays: Mapping[str, np.ndarray]) -> list[bytes | memoryview]:
    """The pieces of :func:`encode_arrays`, without joining them: the header, then a view
    of each array's bytes (no copy for C-contiguous little-endian arrays). The views
    share memory with ``arrays``, which must not change until the parts are used."""
    entries = []
    chunks: list[bytes | memoryview] = []
    for name, array in arrays.items():
        a = np.asarray(array)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        dtype = a.dtype.str
        if dtype not in ALLOWED_DTYPES:
            raise SerializationError(f"array {name!r}: dtype {a.dtype} cannot be encoded")
        entries.append({"name": name, "dtype": dtype, "shape": list(a.shape)})
        chunks.append(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    header = json.dumps(entries, separators=(",", ":")).encode()
    return [_HEADER.pack(MAGIC, len(header)) + header, *chunks]


def decode_arrays(data: bytes | memoryview) -> Arrays:
    """Decode bytes made by :func:`encode_arrays`; arrays are read-only views of ``data``."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise SerializationError("array payload shorter than its header")
    magic, header_len = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise SerializationError("array payload has a bad magic number")
    start = _HEADER.size + header_len
    if start > len(view):
        raise SerializationError("array header runs past the end of the payload")
    try:
        entries = json.loads(bytes(view[_HEADER.size : start]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SerializationError(f"array header is not valid JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise SerializationError("array header must be a list")
    out: Arrays = {}
    offset = start
    for entry in entries:
        name, dtype, shape = _check_entry(entry)
        if name in out:
            raise SerializationError(f"array {name!r} appears twice")
        count = math.prod(shape)
        size = count * dtype.itemsize
        if offset + size > len(view):
            raise SerializationError(f"array {name!r} runs past the end of the payload")
        out[name] = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += size
    if offset != len(view):
        raise SerializationError(f"{len(view) - offset} trailing bytes after the last array")
    return out


def _check_entry(entry: Any) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
        raise SerializationError("array header entry must have exactly name, dtype, shape")
    name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str):
        raise SerializationError("array name must be a string")
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise SerializationError(f"array {name!r}: dtype {dtype!r} is not allowed")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape
    ):
        raise SerializationError(f"array {name!r}: shape must be a list of non-negative ints")
    return name, np.dtype(dtype), tuple(shape)


def check_scalars(values: Mapping[str, Any], what: str) -> dict[str, Scalar]:
    """Return ``values`` as a plain dict after checking every value is a scalar."""
    out: dict[str, Scalar] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise SerializationError(f"{what} key {key!r} is not a string")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, bool | int | float | str):
            raise SerializationError(
                f"{what} value {key!r} has type {type(value).__name__}; "
                "expected bool, int, float or str"
            )
        out[key] = value
    return out


def encode_json(obj: Any) -> bytes:
    """Encode a JSON value (config, metrics, small headers); NaN/Inf allowed."""
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_json(data: bytes | memoryview) -> Any:
    """Decode bytes made by :func:`encode_json`."""
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SerializationError(f"invalid JSON payload: {exc}") from exc
