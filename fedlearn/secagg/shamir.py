"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

A secret is read as a 256-bit big-endian integer, which is always smaller than the
prime, so one field element holds a whole secret and no splitting into limbs is needed.
``split`` draws a random polynomial of degree ``t - 1`` whose constant term is the secret
and hands out its values at ``x = index``; ``combine`` interpolates the constant term
(Lagrange at 0) from any ``t`` shares. Fewer than ``t`` shares are consistent with every
secret, so they reveal nothing.

Each share carries its threshold, so ``combine`` can refuse too few shares instead of
returning a wrong secret silently; given more than ``t`` shares it also checks that
they all lie on one polynomial, which catches a corrupted share.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedlearn.errors import ConfigError, SecAggError, SerializationError

PRIME = 2**256 + 297
"""The field modulus: the smallest prime above 2^256."""

SECRET_SIZE = 32
"""Length in bytes of every secret that is shared."""

MAX_INDEX = 2**63 - 1
"""Largest share index (x coordinate); index 0 would be the secret itself."""

_VALUE_SIZE = 33
_HEAD = struct.Struct(">QH")
SHARE_SIZE = _HEAD.size + _VALUE_SIZE
"""Length in bytes of an encoded share (index, threshold, value)."""

RandBelow = Callable[[int], int]


@dataclass(frozen=True, slots=True)
class Share:
    """One point ``(index, value)`` of a degree ``threshold - 1`` polynomial."""

    index: int
    threshold: int
    value: int

    def __post_init__(self) -> None:
        _check_share_fields(self.index, self.threshold, self.value)

    def to_bytes(self) -> bytes:
        """Fixed-size encoding: 8-byte index, 2-byte threshold, 33-byte value (big-endian)."""
        return _HEAD.pack(self.index, self.threshold) + self.value.to_bytes(_VALUE_SIZE, "big")

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Share:
        """Decode :meth:`to_bytes`; malformed input raises :class:`SerializationError`."""
        raw = bytes(data)
        if len(raw) != SHARE_SIZE:
            raise SerializationError(f"a share is {SHARE_SIZE} bytes, got {len(raw)}")
        index, threshold = _HEAD.unpack_from(raw)
        value = int.from_bytes(raw[_HEAD.size :], "big")
        return cls(index, threshold, value)


def _check_share_fields(index: object, threshold: object, value: object) -> None:
    for name, field in (("index", index), ("threshold", threshold), ("value", value)):
        if not isinstance(field, int) or isinstance(field, bool):
            raise SerializationError(f"share {name} must be an int, got {type(field).__name__}")
    assert isinstance(index, int) and isinstance(threshold, int) and isinstance(value, int)
    if not 1 <= index <= MAX_INDEX:
        raise SerializationError(f"share index {index} is outside 1..{MAX_INDEX}")
    if not 2 <= threshold <= 0xFFFF:
        raise SerializationError(f"share threshold {threshold} is outside 2..65535")
    if not 0 <= value < PRIME:
        raise SerializationError("share value is not a field element")


def split(
    secret: bytes,
    threshold: int,
    indices: int | Sequence[int],
    randbelow: RandBelow = secrets.randbelow,
) -> list[Share]:
    """Share ``secret`` so that any ``threshold`` of the shares reconstruct it.

    ``indices`` is either a count ``n`` (shares get indices ``1..n``) or the explicit,
    distinct, non-zero x coordinates to use (the protocol uses ``holder_id + 1``).
    ``randbelow(m)`` must return a uniform integer in ``[0, m)``; the default draws from
    the operating system's CSPRNG and anything else is for tests only.
    """
    if len(secret) != SECRET_SIZE:
        raise ConfigError(f"a secret to share must be {SECRET_SIZE} bytes, got {len(secret)}")
    xs = list(range(1, indices + 1)) if isinstance(indices, int) else [int(i) for i in indices]
    n = len(xs)
    if not 2 <= threshold <= 0xFFFF:
        raise ConfigError(f"threshold must be between 2 and 65535, got {threshold}")
    if threshold > n:
        raise ConfigError(f"threshold {threshold} exceeds the number of shares {n}")
    if len(set(xs)) != n:
        raise ConfigError("share indices must be distinct")
    if any(not 1 <= x <= MAX_INDEX for x in xs):
        raise ConfigError(f"share indices must lie in 1..{MAX_INDEX}")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs.extend(randbelow(PRIME) for _ in range(threshold - 1))
    return [Share(x, threshold, _evaluate(coeffs, x)) for x in xs]


def _evaluate(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def _lagrange_at(points: Sequence[tuple[int, int]], at: int) -> int:
    """Value at ``at`` of the unique polynomial of degree < len(points) through ``points``."""
    num_total = 0
    for i, (xi, yi) in enumerate(points):
        num = 1
        den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        num_total = (num_total + yi * num * pow(den, -1, PRIME)) % PRIME
    return num_total


def combine(shares: Sequence[Share]) -> bytes:
    """Reconstruct the secret from at least ``threshold`` shares of it.

    Raises :class:`SecAggError` for too few shares, mixed thresholds, repeated indices,
    shares beyond the first ``threshold`` that do not lie on the same polynomial, or a
    result that cannot be a 32-byte secret (a corrupted share, most likely).
    """
    if not shares:
        raise SecAggError("no shares to combine")
    for share in shares:
        if not isinstance(share, Share):
            raise SerializationError(f"expected a Share, got {type(share).__name__}")
    threshold = shares[0].threshold
    if any(s.threshold != threshold for s in shares):
        raise SecAggError("shares disagree on the threshold")
    if len({s.index for s in shares}) != len(shares):
        raise SecAggError("two shares have the same index")
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot reconstruct a {threshold}-of-n secret")
    points = [(s.index, s.value) for s in shares]
    basis = points[:threshold]
    for x, y in points[threshold:]:
        if _lagrange_at(basis, x) != y:
            raise SecAggError(f"share {x} is inconsistent with the others")
    value = _lagrange_at(basis, 0)
    if value >= 2 ** (8 * SECRET_SIZE):
        raise SecAggError("shares reconstruct to a value that is not a secret (corrupted share)")
    return value.to_bytes(SECRET_SIZE, "big")
