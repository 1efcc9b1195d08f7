"""Fixed-point quantization with clipping, weights folded in, and modular capacity checks.

A client with update ``x`` (flat floats) and weight ``w`` (its ``num_examples``) sends

    q_j = rint(w * clip(x_j) * 2^s)  mod 2^b      for every coordinate j,
    q_d = w                           mod 2^b      (one extra coordinate: the weight),

so the modular sum over clients decodes, coordinate by coordinate, to
``sum_i w_i clip(x_i)`` (in units of ``2^-s``) and to ``sum_i w_i``; the server divides the
first by the second. Signed values are carried in two's complement mod ``2^b``; the sum
decodes exactly as long as it cannot wrap, which :func:`check_capacity` proves at
configuration time: ``n * (max |q|) <= 2^(b-1) - 1`` and ``n * max_weight <= 2^(b-1) - 1``.

**Error bound.** Rounding to nearest moves each client's ``w * clip(x_j) * 2^s`` by at most
1/2, so per coordinate

    | decoded_sum_j - sum_i w_i clip(x_i)_j |  <=  n / 2^(s+1)

and the weighted mean is off by at most ``n / (2^(s+1) * sum_i w_i)``. The bound is exact
for float16/float32 updates and integer weights below 2^29 (the product ``w * x`` is
then exact in float64 and scaling by ``2^s`` is exact); float64 updates add at most one
float64 rounding of ``w * x * 2^s``, i.e. ``max|q| * 2^-53`` per client.

:func:`encode_integers` packs values that are already integers (distributed DP's noised
contributions, :mod:`fedlearn.privacy.distributed`) the same way, weight last.

:func:`flatten` / :func:`unflatten` turn named model arrays into the flat vector the
protocol masks and back.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedlearn.engine.records import Arrays
from fedlearn.errors import ConfigError, UpdateRejected
from fedlearn.secagg.crypto import CHUNK_WORDS, apply_masks, mask_dtype

MAX_SCALE_BITS = 52
_ROUND_MAGIC = 1.5 * 2.0**52
_ROUND_MAGIC_BITS = np.uint64(0x4338000000000000)  # the bits of 1.5 * 2^52
_LOW_WORD = 0 if sys.byteorder == "little" else 1
MAX_WEIGHT = 2**29
"""Largest weight the exact error bound covers (``w * float32`` is exact in float64)."""


def _check_common(clip: float, scale_bits: int, modulus_bits: int) -> None:
    if not isinstance(clip, int | float) or isinstance(clip, bool):
        raise ConfigError(f"clip must be a number, got {type(clip).__name__}")
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"clip must be a positive finite number, got {clip}")
    if not isinstance(scale_bits, int) or not 0 <= scale_bits <= MAX_SCALE_BITS:
        raise ConfigError(f"scale_bits must be an int in 0..{MAX_SCALE_BITS}, got {scale_bits}")
    if not isinstance(modulus_bits, int) or not 8 <= modulus_bits <= 64:
        raise ConfigError(f"modulus_bits must be an int in 8..64, got {modulus_bits}")


def max_abs_quantized(max_weight: int, clip: float, scale_bits: int) -> int:
    """Largest ``|q_j|`` one client can send: ``ceil(max_weight * clip * 2^s)``."""
    return math.ceil(max_weight * clip * 2.0**scale_bits)


def check_capacity(
    num_clients: int, max_weight: int, clip: float, scale_bits: int, modulus_bits: int
) -> None:
    """Raise :class:`ConfigError` unless the sum of ``num_clients`` inputs cannot wrap.

    Every client sends values in ``[-Q, Q]`` with ``Q = ceil(max_weight * clip * 2^s)`` and
    a weight in ``[0, max_weight]``; the signed sum is recovered from its residue mod ``2^b``
    iff it lies in ``[-2^(b-1), 2^(b-1))``, so ``num_clients * Q < 2^(b-1)`` and
    ``num_clients * max_weight < 2^(b-1)`` are required.
    """
    _check_common(clip, scale_bits, modulus_bits)
    if not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients must be a positive int, got {num_clients}")
    if not isinstance(max_weight, int) or isinstance(max_weight, bool) or max_weight < 1:
        raise ConfigError(f"max_weight must be a positive int, got {max_weight}")
    if max_weight > MAX_WEIGHT:
        raise ConfigError(f"max_weight must be at most 2^29, got {max_weight}")
    q = max_abs_quantized(max_weight, clip, scale_bits)
    if q > 2**53:
        raise ConfigError(
            f"max_weight * clip * 2^scale_bits = {q} exceeds 2^53, beyond exact float64 "
            "quantization; lower scale_bits"
        )
    half = 2 ** (modulus_bits - 1)
    if num_clients * q >= half or num_clients * max_weight >= half:
        best = max_scale_bits(num_clients, max_weight, clip, modulus_bits)
        hint = f"use scale_bits <= {best}" if best is not None else "use a larger modulus"
        raise ConfigError(
            f"secure sum can wrap: {num_clients} clients x |q| <= {q} does not fit in "
            f"{modulus_bits}-bit two's complement ({hint} or raise modulus_bits)"
        )


def max_scale_bits(num_clients: int, max_weight: int, clip: float, modulus_bits: int) -> int | None:
    """The largest ``scale_bits`` that passes :func:`check_capacity`, or None if none does."""
    half = 2 ** (modulus_bits - 1)
    if num_clients * max_weight >= half:
        return None
    best = None
    for s in range(MAX_SCALE_BITS + 1):
        q = max_abs_quantized(max_weight, clip, s)
        if num_clients * q >= half or q > 2**53:
            break
        best = s
    return best


def error_bound(num_clients: int, scale_bits: int) -> float:
    """Per-coordinate bound on ``|decoded sum - sum_i w_i clip(x_i)|``: ``n / 2^(s+1)``."""
    return num_clients / 2.0 ** (scale_bits + 1)


def _effective_clip(clip: float, dtype: np.dtype[Any]) -> float:
    """``clip`` rounded toward zero to the input's float type (so clipping is exact there)."""
    c = dtype.type(clip)
    if float(c) > clip:
        c = np.nextafter(c, dtype.type(0))
    return float(c)


def quantize(
    vector: np.ndarray,
    weight: int,
    *,
    clip: float,
    scale_bits: int,
    modulus_bits: int,
    masks: Sequence[tuple[bytes, int]] = (),
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Clip, weight, scale and round ``vector``; return ``len(vector) + 1`` words mod ``2^b``.

    The last word is ``weight``. ``masks`` (``(seed, sign)`` pairs) are added on the fly,
    block by block, exactly as :func:`fedlearn.secagg.crypto.apply_masks` would add them
    afterwards, only without a second pass over memory. ``out`` (optional) receives the
    result and must be a contiguous 1-D array of the modulus's word type (uint32 up to 32
    bits, else uint64). NaN coordinates raise :class:`UpdateRejected`; infinities are
    clipped like any other value.
    """
    _check_common(clip, scale_bits, modulus_bits)
    x = np.asarray(vector)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise UpdateRejected(
            f"secure aggregation needs a flat float vector, got {x.dtype}{x.shape}"
        )
    if not isinstance(weight, int | np.integer) or isinstance(weight, bool):
        raise UpdateRejected(f"weight must be an int (num_examples), got {type(weight).__name__}")
    w = int(weight)
    if not 0 <= w <= MAX_WEIGHT:
        raise UpdateRejected(f"weight must be in 0..2^29, got {w}")
    if max_abs_quantized(w, clip, scale_bits) > 2**53:
        raise ConfigError("weight * clip * 2^scale_bits exceeds 2^53; lower scale_bits")
    dtype = mask_dtype(modulus_bits)
    d = x.size
    if out is None:
        out = np.empty(d + 1, dtype=dtype)
    elif out.shape != (d + 1,) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ConfigError(f"out must be a contiguous ({d + 1},) {dtype} array")
    factor = float(w) * 2.0**scale_bits
    c = _effective_clip(clip, x.dtype)
    # Clipping happens in the input's own float type; w * clip(x) * 2^s is then exact in
    # float64 for float16/32 input (see the module docstring). Rounding to an integer
    # adds 1.5 * 2^52 (exact round-half-even while |value| < 2^51): the float64 bits then
    # hold the integer in their low word(s), so no separate rint / int conversion passes.
    fast = max_abs_quantized(w, clip, scale_bits) < 2**51
    size = min(d, CHUNK_WORDS)
    clipped = np.empty(size, dtype=x.dtype)
    scratch = np.empty(size, dtype=np.float64)
    low_words = scratch.view(np.uint32)[_LOW_WORD::2]
    bits = scratch.view(np.uint64)
    ints = np.empty(0 if fast else size, dtype=np.int64)
    wide = dtype.itemsize == 8

    def fill(start: int, stop: int, block: np.ndarray) -> None:
        end = min(stop, d)
        m = end - start
        if m > 0:
            xc = clipped[:m]
            f = scratch[:m]
            np.clip(x[start:end], -c, c, out=xc)
            np.multiply(xc, factor, out=f, dtype=np.float64)
            if fast:
                np.add(f, _ROUND_MAGIC, out=f)
            else:
                np.rint(f, out=f)
            if np.isnan(f.sum()):
                raise UpdateRejected("update contains NaN")
            if not fast:
                np.copyto(ints[:m], f, casting="unsafe")
                np.copyto(block[:m], ints[:m], casting="unsafe")  # two's complement wrap
            elif wide:
                np.subtract(bits[:m], _ROUND_MAGIC_BITS, out=block[:m])  # wraps mod 2^64
            else:
                np.copyto(block[:m], low_words[:m])  # low 32 bits = value mod 2^32
        if stop > d:
            block[d - start] = w

    return apply_masks(out, masks, modulus_bits, fill=fill)


def encode_integers(
    values: np.ndarray,
    weight: int,
    *,
    modulus_bits: int,
    masks: Sequence[tuple[bytes, int]] = (),
) -> np.ndarray:
    """Signed ``int64`` ``values`` (already quantized, e.g. noised by distributed DP) and
    ``weight`` as ``len(values) + 1`` words mod ``2^b`` (two's complement), masks added."""
    v = np.asarray(values)
    if v.ndim != 1 or v.dtype != np.int64:
        raise ConfigError(f"expected a 1-D int64 array, got {v.dtype}{v.shape}")
    dtype = mask_dtype(modulus_bits)
    d = v.size
    out = np.empty(d + 1, dtype=dtype)

    def fill(start: int, stop: int, block: np.ndarray) -> None:
        end = min(stop, d)
        if end > start:
            np.copyto(block[: end - start], v[start:end], casting="unsafe")  # wraps mod 2^b
        if stop > d:
            block[d - start] = weight

    return apply_masks(out, masks, modulus_bits, fill=fill)


def decode_signed(total: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Residues mod ``2^b`` as signed int64 in ``[-2^(b-1), 2^(b-1))``."""
    t = np.asarray(total)
    if t.dtype != mask_dtype(modulus_bits) or t.ndim != 1:
        raise ConfigError(f"expected a 1-D {mask_dtype(modulus_bits)} array")
    if modulus_bits == 64:
        return t.view(np.int64).copy()
    v = t.astype(np.int64)
    v[v >= 2 ** (modulus_bits - 1)] -= 2**modulus_bits
    return v


def dequantize(total: np.ndarray, *, scale_bits: int, modulus_bits: int) -> tuple[np.ndarray, int]:
    """Decode a modular sum of :func:`quantize` outputs to ``(sum_i w_i x_i, sum_i w_i)``.

    The first element is float64 of length ``len(total) - 1``. Divide it by the second for
    the weighted mean (see :func:`weighted_mean`).
    """
    if total.size < 1:
        raise ConfigError("a quantized sum has at least the weight coordinate")
    signed = decode_signed(total, modulus_bits)
    weight = int(signed[-1])
    values = signed[:-1].astype(np.float64)
    values /= 2.0**scale_bits
    return values, weight


def weighted_mean(weighted_sum: np.ndarray, total_weight: int) -> np.ndarray:
    """``weighted_sum / total_weight``; a zero total weight raises :class:`ConfigError`."""
    if total_weight <= 0:
        raise ConfigError("total weight is zero; there is no mean to take")
    return weighted_sum / float(total_weight)


@dataclass(frozen=True, slots=True)
class ArraySpec:
    """Names, dtypes and shapes of the arrays packed into a flat vector, in order."""

    entries: tuple[tuple[str, str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, _, shape in self.entries)


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ArraySpec]:
    """Concatenate ``arrays`` into one flat float vector (float32 unless a float64 is present)."""
    parts = [np.asarray(a) for a in arrays.values()]
    wide = any(p.dtype == np.float64 for p in parts)
    dtype = np.float64 if wide else np.float32
    spec = ArraySpec(
        tuple((name, np.asarray(a).dtype.str, tuple(np.shape(a))) for name, a in arrays.items())
    )
    vec = np.empty(spec.size, dtype=dtype)
    offset = 0
    for p in parts:
        vec[offset : offset + p.size] = p.reshape(-1)
        offset += p.size
    return vec, spec


def unflatten(vector: np.ndarray, spec: ArraySpec) -> Arrays:
    """Split a flat vector back into named arrays of the dtypes and shapes in ``spec``."""
    v = np.asarray(vector)
    if v.ndim != 1 or v.size != spec.size:
        raise ConfigError(f"vector of {v.size} values does not match a spec of {spec.size}")
    out: Arrays = {}
    offset = 0
    for name, dtype_str, shape in spec.entries:
        dtype = np.dtype(dtype_str)
        count = math.prod(shape)
        piece = v[offset : offset + count]
        if dtype.kind in "iub":
            piece = np.rint(piece)
        out[name] = piece.astype(dtype).reshape(shape)
        offset += count
    return out
