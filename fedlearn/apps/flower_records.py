"""Flower records as bytes without pickle, and a Flower client's ``context.state`` store.

A Flower ``Context.state`` is a ``RecordDict`` a ClientApp keeps for itself across rounds.
fedlearn keeps one per client id in a :class:`ClientStates` store:

* :class:`MemoryStates` holds them in this process: the in-process backend and a site
  daemon (one long-lived process per site).
* :class:`DirectoryStates` holds them as files in a directory, one per client id
  (``<client id>.state``): the worker pool, whose workers take any client's task, so a
  client may train in one worker in round 1 and in another in round 2. Every worker
  reads the client's state before calling the app and writes it back after; a client
  has one task at a time and stages run one after another, so no two processes touch
  the same file at once. An empty state writes nothing (and removes a stale file), so
  apps that keep no state cost one failed ``open`` per task.

The bytes are :func:`encode_recorddict`'s: a JSON header (record names, kinds, keys and
the scalar values, with type tags so ``1`` and ``1.0``, ``True`` and ``1`` stay distinct,
and ``bytes`` as base64) framed with one :func:`~fedlearn.engine.records.encode_arrays`
payload holding every ``ArrayRecord``'s arrays as raw little-endian bytes. Decoding runs
no code. Arrays must have a bool, integer or float dtype.

flwr is imported when a function here first needs it (``pip install 'fedlearn[flower]'``).
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedlearn.engine.messages import frame, unframe
from fedlearn.engine.records import (
    Arrays,
    decode_arrays,
    decode_json,
    encode_arrays,
    encode_json,
)
from fedlearn.errors import SerializationError

__all__ = [
    "ClientStates",
    "DirectoryStates",
    "MemoryStates",
    "array_to_numpy",
    "decode_recorddict",
    "encode_recorddict",
    "from_array_record",
    "to_array_record",
]

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

    return ArrayRecord({name: _known_array(np.asarray(a)) for name, a in arrays.items()})


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
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

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
    return frame([encode_json(header), encode_arrays(arrays)])


def decode_recorddict(data: bytes | memoryview) -> Any:
    """Bytes made by :func:`encode_recorddict` back to a ``RecordDict`` (writable arrays)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    parts = list(unframe(data))
    if len(parts) != 2:
        raise SerializationError("a record dict has two frames")
    header = decode_json(parts[0])
    arrays = decode_arrays(parts[1])
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


class ClientStates(Protocol):
    """Where each client's ``context.state`` lives between its tasks."""

    def load(self, client_id: int) -> Any:
        """The client's ``RecordDict`` (an empty one the first time)."""
        ...

    def save(self, client_id: int, state: Any) -> None:
        """Keep ``state`` for the client's next task."""
        ...


class MemoryStates:
    """States held in this process, by client id."""

    def __init__(self) -> None:
        self._states: dict[int, Any] = {}

    def load(self, client_id: int) -> Any:
        """The client's state object itself (the app's own, kept as it left it)."""
        state = self._states.get(client_id)
        if state is None:
            from flwr.app import RecordDict

            state = self._states[client_id] = RecordDict()
        return state

    def save(self, client_id: int, state: Any) -> None:
        """Hold ``state`` (the app may have replaced ``context.state`` altogether)."""
        self._states[client_id] = state


class DirectoryStates:
    """States as files ``<client id>.state`` in ``directory`` (made if missing), shared
    by every process that opens the same directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        return self.directory / f"{int(client_id)}.state"

    def load(self, client_id: int) -> Any:
        """The client's last saved state, decoded; an empty one if it has none."""
        try:
            data = self._path(client_id).read_bytes()
        except FileNotFoundError:
            from flwr.app import RecordDict

            return RecordDict()
        return decode_recorddict(data)

    def save(self, client_id: int, state: Any) -> None:
        """Write ``state`` atomically (an empty state removes the file)."""
        path = self._path(client_id)
        if len(state) == 0:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode_recorddict(state))
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
