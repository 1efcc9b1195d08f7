"""Flower records as bytes without pickle, and a Flower client's ``context.state``.

A Flower ``Context.state`` is a ``RecordDict`` a ClientApp keeps for itself across rounds.
fedlearn keeps it as the client's own state (``ctx.state``, a
:class:`~fedlearn.engine.client_state.ClientState`), so it lives wherever the runtime keeps
client states: in this process, in the directory the pool's workers and Ray's actors
share, in a ``fedlearn simulate`` run's directory (a resumed run finds it), at a site in
``client.state_dir``. :func:`recorddict_to_state` and :func:`recorddict_from_state`
convert: the state's values hold a JSON header (record names, kinds, keys and the scalar
values, with type tags so ``1`` and ``1.0``, ``True`` and ``1`` stay distinct, and
``bytes`` as base64) and its arrays every ``ArrayRecord``'s arrays, raw. Decoding runs no
code. Arrays must have a bool, integer or float dtype.

flwr is imported when a function here first needs it (``pip install 'fedlearn[flower]'``).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from fedlearn.engine.client_state import ClientState
from fedlearn.engine.records import Arrays
from fedlearn.errors import SerializationError

__all__ = [
    "array_to_numpy",
    "decode_recorddict",
    "encode_recorddict",
    "from_array_record",
    "recorddict_from_state",
    "recorddict_to_state",
    "to_array_record",
]

_STATE_KEY = "flower.recorddict"
"""The ClientState value holding a RecordDict's header."""

_TAGS: dict[type, str] = {bool: "b", int: "i", float: "f", str: "s", bytes: "y"}


def to_array_record(arrays: Arrays) -> Any:
    """A Flower ``ArrayRecord`` of copies of ``arrays``, under the same names and order.

    Its ``Array`` objects are Flower's own, with one difference an app cannot observe:
    ``numpy()`` returns a fresh copy of the ndarray they were made from instead of
    parsing their ``.npy`` bytes again (``np.load``'s header parse, ~60 us an array, was
    a fifth of a small app's step); setting ``data``, ``dtype``, ``shape`` or ``stype``
    drops that copy, and ``numpy()`` reads the bytes as Flower does.
    """
    from flwr.app import ArrayRecord

    record = ArrayRecord()  # ArrayRecord(dict) would rebuild each Array as a plain one
    for name, a in arrays.items():
        record[name] = _known_array(np.asarray(a))
    return record


_KNOWN = "_fedlearn_ndarray"
_KNOWN_ARRAY: type | None = None


def _known_array(ndarray: np.ndarray) -> Any:
    """A Flower ``Array`` of ``ndarray`` that remembers it (see :func:`to_array_record`)."""
    global _KNOWN_ARRAY
    from flwr.app import Array

    if _KNOWN_ARRAY is None:

        class KnownArray(Array):
            """``Array`` whose ``numpy()`` copies the ndarray it was made from."""

            def numpy(self) -> np.ndarray:
                known = self.__dict__.get(_KNOWN)
                if known is None:
                    return np.asarray(super().numpy())
                return np.array(known)

            def __setattr__(self, name: str, value: Any) -> None:
                if name in ("dtype", "shape", "stype", "data"):
                    self.__dict__.pop(_KNOWN, None)
                super().__setattr__(name, value)

        _KNOWN_ARRAY = KnownArray
    array = Array.from_numpy_ndarray(ndarray)
    array.__class__ = _KNOWN_ARRAY
    kept = np.array(ndarray)  # the caller may change its array later; this stays
    kept.flags.writeable = False
    array.__dict__[_KNOWN] = kept
    return array


def from_array_record(record: Any) -> Arrays:
    """The numpy arrays of a Flower ``ArrayRecord`` by key, in its order."""
    return {str(key): array_to_numpy(array) for key, array in record.items()}


_NPY_V1 = b"\x93NUMPY\x01\x00"  # np.save's magic string and format version 1.0


def array_to_numpy(array: Any) -> np.ndarray:
    """A Flower ``Array``'s ndarray (a writable copy), as ``Array.numpy()`` gives it.

    ``Array.numpy()`` runs ``np.load`` on the ``.npy`` bytes, whose header parse
    (``ast.literal_eval``) costs more than the copy for small arrays (~60 us an array).
    When the bytes carry exactly the header ``np.save`` writes for the Array's own dtype
    and shape in C order, with that many bytes after it, they are read directly;
    anything else (Fortran order, another format version, a structured or object
    dtype, a size mismatch) goes through ``Array.numpy()``."""
    data = array.data
    if array.stype == "numpy.ndarray" and data[:8] == _NPY_V1:
        try:
            dtype = np.dtype(array.dtype)
            shape = tuple(int(n) for n in array.shape)
        except (TypeError, ValueError):
            return np.asarray(array.numpy())
        if dtype.kind in "biuf" and dtype.fields is None:
            end = 10 + int.from_bytes(data[8:10], "little")
            descr = np.lib.format.dtype_to_descr(dtype)
            header = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
            count = int(np.prod(shape, dtype=np.int64))
            if (
                count > 0
                and bytes(data[10:end]).rstrip(b" \n") == header.encode("latin1")
                and len(data) - end == count * dtype.itemsize
            ):
                return np.frombuffer(data, dtype, count, end).reshape(shape).copy()
    return np.asarray(array.numpy())


def encode_recorddict(records: Any) -> bytes:
    """A Flower ``RecordDict`` (Array, Metric and Config records) as bytes, no pickle."""
    return recorddict_to_state(records).encode()


def decode_recorddict(data: bytes | memoryview) -> Any:
    """Bytes made by :func:`encode_recorddict` back to a ``RecordDict`` (writable arrays)."""
    return recorddict_from_state(ClientState.decode(data))


def recorddict_to_state(records: Any) -> ClientState:
    """A Flower ``RecordDict`` as a client state (an empty one for an empty dict)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    if len(records) == 0:
        return ClientState()
    header: list[list[Any]] = []
    arrays: Arrays = {}
    for index, (name, record) in enumerate(records.items()):
        if isinstance(record, ArrayRecord):
            keys = [str(k) for k in record]
            for key, a in from_array_record(record).items():
                arrays[f"{index}/{key}"] = a
            header.append([name, "arrays", keys])
        elif isinstance(record, MetricRecord | ConfigRecord):
            kind = "metrics" if isinstance(record, MetricRecord) else "config"
            items = [[k, *_tagged(v, f"{name}[{k!r}]")] for k, v in record.items()]
            header.append([name, kind, items])
        else:
            raise SerializationError(f"record {name!r} of type {type(record).__name__}")
    return ClientState(arrays, {_STATE_KEY: header})


def recorddict_from_state(state: ClientState) -> Any:
    """A client state made by :func:`recorddict_to_state` back to a ``RecordDict``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    if not state:
        return RecordDict()
    header = state.values.get(_STATE_KEY)
    arrays = state.arrays
    if not isinstance(header, list):
        raise SerializationError("a record dict header must be a list")
    out = RecordDict()
    try:
        for index, (name, kind, items) in enumerate(header):
            if kind == "arrays":
                out[name] = ArrayRecord({k: Array(np.array(arrays[f"{index}/{k}"])) for k in items})
            elif kind in ("metrics", "config"):
                values = {str(k): _untagged(tag, v) for k, tag, v in items}
                out[name] = MetricRecord(values) if kind == "metrics" else ConfigRecord(values)
            else:
                raise SerializationError(f"record {name!r} has unknown kind {kind!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise SerializationError(f"malformed record dict: {exc}") from exc
    return out


def _tagged(value: Any, where: str) -> list[Any]:
    if isinstance(value, list):
        inner = [_tagged(v, where) for v in value]
        tags = {t for t, _ in inner}
        return ["l" + (tags.pop() if len(tags) == 1 else "s"), [v for _, v in inner]]
    tag = _TAGS.get(type(value))
    if tag is None:
        raise SerializationError(f"{where} has type {type(value).__name__}")
    if tag == "y":
        return [tag, base64.b64encode(value).decode()]
    return [tag, value]


def _untagged(tag: str, value: Any) -> Any:
    if tag.startswith("l"):
        return [_untagged(tag[1:], v) for v in value]
    if tag == "y":
        return base64.b64decode(value)
    kind: Any = {"b": bool, "i": int, "f": float, "s": str}[tag]
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise SerializationError(f"value {value!r} is not {kind.__name__}")
    return kind(value)
