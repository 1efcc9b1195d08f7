"""Open Inference Protocol v2 tensors: datatypes, signatures and request checks.

Both endpoints (REST and gRPC) turn a request into ``{name: numpy array}`` and hand it to
:meth:`Signature.check_inputs`, which names every mismatch in an :class:`InvalidInput`.
``BYTES`` tensors are not supported: every fedlearn model takes numeric tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError, InvalidInput
from fedlearn.registry.spec import DATATYPES, datatype_of


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype; InvalidInput for unknown or unsupported ones."""
    try:
        return DATATYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(
            f"unsupported datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, OIP datatype and shape (``-1``: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ConfigError(
                f"tensor {self.name!r}: unsupported datatype {self.datatype!r}; "
                f"use one of {', '.join(DATATYPES)}"
            )

    def accepts(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of ``shape`` fits this spec."""
        return len(shape) == len(self.shape) and all(
            want == -1 or want == got for want, got in zip(self.shape, shape, strict=True)
        )

    def as_dict(self) -> dict[str, Any]:
        """The OIP metadata form ``{"name", "datatype", "shape"}``."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, in the order its forward takes and returns them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Signature:
        """From the registry form ``{"inputs": [{name, datatype, shape}], "outputs": [...]}``."""

        def specs(side: str) -> tuple[TensorSpec, ...]:
            return tuple(
                TensorSpec(str(e["name"]), str(e["datatype"]), tuple(int(d) for d in e["shape"]))
                for e in raw[side]
            )

        return cls(specs("inputs"), specs("outputs"))

    def as_dict(self) -> dict[str, Any]:
        """The registry form (see :meth:`from_dict`)."""
        return {
            "inputs": [s.as_dict() for s in self.inputs],
            "outputs": [s.as_dict() for s in self.outputs],
        }

    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The request's arrays in signature order; InvalidInput names any mismatch."""
        known = {s.name for s in self.inputs}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise InvalidInput(f"unknown input {unknown[0]!r}; the model takes {sorted(known)}")
        ordered = []
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InvalidInput(f"missing input {spec.name!r}")
            array = inputs[spec.name]
            got = datatype_of(array)
            if got != spec.datatype:
                raise InvalidInput(f"input {spec.name!r}: datatype {got}, expected {spec.datatype}")
            if not spec.accepts(array.shape):
                raise InvalidInput(
                    f"input {spec.name!r}: shape {list(array.shape)}, expected "
                    f"{list(spec.shape)} (-1: any size)"
                )
            ordered.append(array)
        return ordered

    def select_outputs(self, requested: Sequence[str] | None) -> tuple[TensorSpec, ...]:
        """The output specs a request asks for (all when ``requested`` is None or empty)."""
        if not requested:
            return self.outputs
        by_name = {s.name: s for s in self.outputs}
        chosen = []
        for name in requested:
            if name not in by_name:
                raise InvalidInput(f"unknown output {name!r}; the model returns {sorted(by_name)}")
            chosen.append(by_name[name])
        return tuple(chosen)


def array_from_bytes(
    raw: bytes | bytearray | memoryview, datatype: str, shape: Sequence[int]
) -> np.ndarray:
    """A tensor from its raw little-endian bytes (the binary extension and gRPC raw contents)."""
    dtype = numpy_dtype(datatype)
    count = _element_count(shape)
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"raw data holds {len(raw)} bytes; shape {list(shape)} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def array_from_list(data: Any, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """A tensor from JSON ``data`` (flat or nested, row-major), checked against ``shape``."""
    dtype = numpy_dtype(datatype)
    count = _element_count(shape)
    fast = _numeric_array(data, dtype)
    if fast is not None:
        if fast.size != count:
            raise InvalidInput(
                f"data holds {fast.size} elements; shape {list(shape)} needs {count}"
            )
        return fast.reshape(tuple(shape))
    return _checked_array(data, datatype, dtype, count, shape)


def _numeric_array(data: Any, dtype: np.dtype[Any]) -> np.ndarray | None:
    """``data`` as ``dtype`` when numpy reads it as plain numbers of a fitting kind (the
    common case, without a Python loop per element); None sends it to the slow path,
    which names what is wrong."""
    if not isinstance(data, list):
        return None
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        return None
    kind = raw.dtype.kind
    if dtype.kind == "b":
        return raw.astype(dtype) if kind == "b" else None
    if dtype.kind == "f":
        if kind not in "iuf" or (kind == "f" and raw.dtype.itemsize > 8):
            return None
        with np.errstate(over="ignore", invalid="ignore"):
            out = raw.astype(dtype)
        # a finite number that overflows the datatype goes to the slow path's error
        return out if np.array_equal(np.isfinite(out), np.isfinite(raw)) else None
    if kind not in "iu":  # integer datatypes: integer data only on the fast path
        return None
    info = np.iinfo(dtype)
    if raw.size and (raw.min() < info.min or raw.max() > info.max):
        return None
    return raw.astype(dtype)


def _checked_array(
    data: Any, datatype: str, dtype: np.dtype[Any], count: int, shape: Sequence[int]
) -> np.ndarray:
    try:
        flat = np.asarray(data, dtype=object).reshape(-1)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"data is not a rectangular list of numbers: {exc}") from None
    if flat.size != count:
        raise InvalidInput(f"data holds {flat.size} elements; shape {list(shape)} needs {count}")
    for value in flat:
        if datatype == "BOOL":
            if not isinstance(value, bool):
                raise InvalidInput(f"BOOL data must be true/false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidInput(f"{datatype} data must be numbers, got {value!r}")
        elif dtype.kind in "iu" and not (isinstance(value, int) or float(value).is_integer()):
            raise InvalidInput(f"{datatype} data must be integers, got {value!r}")
    try:
        with np.errstate(over="raise", invalid="raise"):
            array = np.array(flat.tolist(), dtype=dtype)
    except (OverflowError, FloatingPointError, ValueError) as exc:
        raise InvalidInput(f"data does not fit {datatype}: {exc}") from None
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if any(not info.min <= int(v) <= info.max for v in flat):
            raise InvalidInput(f"data does not fit {datatype}")
    return array.reshape(tuple(shape))


def _element_count(shape: Sequence[int]) -> int:
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidInput(f"shape must be a list of non-negative integers, got {shape!r}")
    count = 1
    for d in shape:
        count *= d
    if count > 2**40 or any(d > 2**40 for d in shape):
        raise InvalidInput(f"shape {list(shape)} is too large")
    return count
