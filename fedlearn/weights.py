"""Model weights on disk: safetensors only (no pickle), array order preserved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fedlearn.errors import SerializationError
from fedlearn.records import Arrays

_ORDER_KEY = "fedlearn.order"


def save_weights(arrays: Arrays, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``arrays`` to a safetensors file (their order goes in the metadata)."""
    meta = dict(metadata or {})
    meta[_ORDER_KEY] = json.dumps(list(arrays))
    save_file({k: np.asarray(v, order="C") for k, v in arrays.items()}, str(path), meta)


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
