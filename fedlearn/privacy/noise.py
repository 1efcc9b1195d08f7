"""Where differential-privacy noise comes from: a cryptographic stream, or a seeded one.

Two sources with one interface, :class:`NoiseSource`:

* :func:`secure_noise` - the ChaCha20 keystream (``cryptography``) under a 256-bit key
  from the operating system's CSPRNG (:mod:`secrets`): what protects a real run. Nobody
  can reproduce or predict the noise, not even with the run's seed. One source per thread
  and process: a forked child (a pool worker) never continues its parent's stream but
  keys its own, and a source takes a new key after 64 GiB of keystream.
* :func:`seeded_noise` - numpy's PCG64 from a seed sequence: the same noise for the same
  key, so a seeded run (a test, a replay) is reproducible bit for bit. Chosen explicitly
  (``privacy.noise = "seeded"``); its noise protects nobody from whoever knows the seed.

Both draw standard normals by the Box-Muller transform of uniform doubles made from 52
random bits each, so the two differ only in where the bits come from. The transform's
cosine and sine are torch's (SLEEF, vectorized, within 1 ulp in float64: numpy's scalar
libm calls cost 4-5 times as much and were most of local DP's cost per update, BENCHMARKS.md
section 8). The secure source draws normals in blocks of :data:`NORMAL_BLOCK` and hands
out small requests from the block, so a 21-parameter update does not pay a dozen numpy
calls for its noise; every draw is still fresh keystream, never handed out twice.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedlearn.engine.threads import single_thread

_TWO_PI = 2.0 * np.pi
_SHIFT = np.uint64(12)
_ONE = np.uint64(0x3FF0000000000000)
"""The bits of 1.0: sign 0, exponent 1023, fraction 0."""
_ONE_MINUS_HALF_ULP = 1.0 - 2.0**-53
_BLOCK = 1 << 16
_ZEROS = memoryview(bytes(_BLOCK))
NORMAL_BLOCK = 1 << 14
"""How many normals the secure source draws at a time for requests of at most a quarter
of it (128 KiB per thread)."""
REKEY_BYTES = 1 << 36
"""A secure source takes a fresh key after this much keystream (64 GiB, a quarter of what
ChaCha20's 32-bit block counter can address)."""


class NoiseSource(Protocol):
    """Random bits and the distributions DP mechanisms draw from them."""

    secure: bool
    """True when the bits come from a CSPRNG under a secret key."""

    def bits(self, size: int) -> np.ndarray:
        """``size`` independent uniform 64-bit words (``uint64``)."""
        ...

    def uniform(self, size: int) -> np.ndarray:
        """``size`` uniform doubles in the open interval (0, 1)."""
        ...

    def normal(self, size: int, std: float = 1.0) -> np.ndarray:
        """``size`` independent N(0, std^2) samples (``float64``)."""
        ...


class _BoxMuller:
    """Uniforms and normals from :meth:`bits` (shared by both sources)."""

    def bits(self, size: int) -> np.ndarray:
        raise NotImplementedError

    def uniform(self, size: int) -> np.ndarray:
        """Doubles ``(k + 0.5) / 2^52`` for 52 random bits ``k``: never 0, never 1.

        The bits become the fraction of a double in [1, 2) (exponent bits set in place),
        from which ``1 - 2^-53`` is subtracted exactly: three passes over one buffer.
        """
        k = self.bits(size)
        k >>= _SHIFT
        k |= _ONE
        u = k.view(np.float64)
        u -= _ONE_MINUS_HALF_ULP
        return u

    def normal(self, size: int, std: float = 1.0) -> np.ndarray:
        """Box-Muller: each pair of uniforms gives two independent standard normals."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        out = self._standard_normal(size)
        if std != 1.0:
            out *= std
        return out

    def _standard_normal(self, size: int) -> np.ndarray:
        import torch

        pairs = (size + 1) // 2
        u = self.uniform(2 * pairs)
        radius, angle = u[:pairs], u[pairs:]  # each computed in place
        np.log(radius, out=radius)
        radius *= -2.0
        np.sqrt(radius, out=radius)
        angle *= _TWO_PI
        out = np.empty(2 * pairs, np.float64)
        turn = torch.from_numpy(angle)
        with single_thread():  # fork-safe and deterministic (fedlearn.engine.threads)
            torch.sin(turn, out=torch.from_numpy(out[pairs:]))
            turn.cos_()
        out[pairs:] *= radius
        np.multiply(radius, angle, out=out[:pairs])
        return out[:size]


class SecureNoise(_BoxMuller):
    """The ChaCha20 keystream under a fresh 256-bit key from :mod:`secrets`."""

    secure = True

    def __init__(self) -> None:
        self._rekey()
        self._normals = np.empty(0)
        self._taken = 0

    def _rekey(self) -> None:
        key = secrets.token_bytes(32)
        nonce = secrets.token_bytes(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        self._used = 0

    def _standard_normal(self, size: int) -> np.ndarray:
        """Small requests come from a block of normals drawn ahead; large ones directly."""
        if 4 * size > NORMAL_BLOCK:
            return super()._standard_normal(size)
        if self._taken + size > self._normals.size:
            self._normals = super()._standard_normal(NORMAL_BLOCK)
            self._taken = 0
        start = self._taken
        self._taken += size
        out = self._normals[start : self._taken].copy()
        self._normals[start : self._taken] = 0.0  # handed out: not kept in memory
        return out

    def bits(self, size: int) -> np.ndarray:
        """The next ``8 * size`` keystream bytes as ``uint64`` words (little-endian).

        The keystream is written block by block straight into the result (the 64 bytes
        of slack are what ``update_into`` asks for), with no full-size temporaries.
        """
        out = np.empty(size + 8, dtype="<u8")
        view = memoryview(out.data).cast("B")
        total = 8 * size
        self._used += total
        if self._used > REKEY_BYTES:
            self._rekey()
            self._used = total
        for start in range(0, total, _BLOCK):
            m = min(_BLOCK, total - start)
            self._stream.update_into(_ZEROS[:m], view[start : start + m + 64])
        return out[:size].astype(np.uint64, copy=False)

    def __repr__(self) -> str:  # never shows the key
        return "SecureNoise()"


class SeededNoise(_BoxMuller):
    """numpy's PCG64 from ``SeedSequence(key)``: reproducible, for tests and replays."""

    secure = False

    def __init__(self, key: Sequence[int]) -> None:
        self.key = tuple(int(k) for k in key)
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self.key)))

    def bits(self, size: int) -> np.ndarray:
        """``size`` words from the generator."""
        return self._rng.integers(0, 2**64, size=size, dtype=np.uint64, endpoint=False)

    def __repr__(self) -> str:
        return f"SeededNoise({self.key})"


class _PerThread(threading.local):
    source: SecureNoise | None = None
    pid: int = -1


_SHARED = _PerThread()


def secure_noise() -> NoiseSource:
    """This thread's cryptographic noise source (keyed afresh in each process)."""
    pid = os.getpid()
    if _SHARED.source is None or _SHARED.pid != pid:
        _SHARED.source = SecureNoise()
        _SHARED.pid = pid
    return _SHARED.source


def seeded_noise(*key: int) -> NoiseSource:
    """A reproducible noise source for ``key`` (e.g. ``(seed, round, client_id)``)."""
    return SeededNoise(key)


def noise_source(kind: str, *key: int) -> NoiseSource:
    """``privacy.noise``: ``"secure"`` (``key`` unused) or ``"seeded"`` (from ``key``)."""
    if kind == "secure":
        return secure_noise()
    if kind == "seeded":
        return seeded_noise(*key)
    raise ValueError(f"noise source must be 'secure' or 'seeded', got {kind!r}")
