"""Model weights on disk: safetensors only (no pickle), array order preserved."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from fedlearn.engine.records import Arrays
from fedlearn.errors import SerializationError

_ORDER_KEY = "fedlearn.order"


# safetensors' dtype names (the format's header field "dtype")
_DTYPES: dict[np.dtype[Any], str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype("<u1"): "U8",
    np.dtype("<i1"): "I8",
    np.dtype("<u2"): "U16",
    np.dtype("<i2"): "I16",
    np.dtype("<f2"): "F16",
    np.dtype("<u4"): "U32",
    np.dtype("<i4"): "I32",
    np.dtype("<f4"): "F32",
    np.dtype("<u8"): "U64",
    np.dtype("<i8"): "I64",
    np.dtype("<f8"): "F64",
}


def save_weights(arrays: Arrays, path: str | Path, metadata: dict[str, str] | None = None) -> str:
    """Write ``arrays`` to a safetensors file (their order goes in the metadata); returns
    the file's sha256.

    The file is the safetensors format (an 8-byte little-endian header size, a JSON
    header, then each tensor's bytes back to back) written straight from the arrays:
    ``safetensors.numpy.save_file`` first copies every tensor into a bytes object, a
    whole model's worth of extra memory for a 1 GiB checkpoint. Files are read back with
    the safetensors library, which validates them.
    """
    meta = dict(metadata or {})
    meta[_ORDER_KEY] = json.dumps(list(arrays))
    header: dict[str, Any] = {"__metadata__": meta}
    blocks: list[memoryview] = []
    offset = 0
    for name, value in arrays.items():
        a = np.asarray(value)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        code = _DTYPES.get(a.dtype)
        if code is None:
            raise SerializationError(f"array {name!r}: dtype {a.dtype} cannot be stored")
        if not a.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
            a = a.copy(order="C")
        header[name] = {
            "dtype": code,
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        blocks.append(memoryview(a.reshape(-1).view(np.uint8).data))
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for block in (memoryview(struct.pack("<Q", len(raw))), memoryview(raw), *blocks):
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def save_weights_atomically(
    arrays: Arrays, path: Path, metadata: dict[str, str] | None = None
) -> str:
    """:func:`save_weights` to a temporary name, synced, then renamed over ``path`` (and the
    rename synced where the directory can be opened); returns the file's sha256. A crash
    leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        digest = save_weights(arrays, tmp, metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_verified(path: Path, sha256: str, what: str) -> Arrays:
    """:func:`load_weights` after checking the file's sha256 against ``sha256`` (hashed in
    4 MiB blocks, never the whole file in memory); SerializationError names ``what``."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    except OSError as exc:
        raise SerializationError(f"{what} {path} is unreadable: {exc}") from exc
    if digest.hexdigest() != sha256:
        raise SerializationError(f"{what} {path} does not match its recorded sha256 digest")
    return load_weights(path)


def load_weights(path: str | Path) -> Arrays:
    """Read a safetensors file written by :func:`save_weights` (or any safetensors file)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            meta = f.metadata() or {}
            if _ORDER_KEY in meta:
                order = json.loads(meta[_ORDER_KEY])
                if sorted(order) == sorted(names):
                    names = order
            return {name: f.get_tensor(name) for name in names}
    except (OSError, ValueError, json.JSONDecodeError, SafetensorError) as exc:
        raise SerializationError(f"cannot read weights from {path}: {exc}") from exc
