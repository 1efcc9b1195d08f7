"""Where differential-privacy noise comes from: a cryptographic stream, or a seeded one.

Two sources with one interface, :class:`NoiseSource`:

* :func:`secure_noise` - the ChaCha20 keystream (``cryptography``) under a 256-bit key
  from the operating system's CSPRNG (:mod:`secrets`): what protects a real run. Nobody
  can reproduce or predict the noise, not even with the run's seed.
* :func:`seeded_noise` - numpy's PCG64 from a seed sequence: the same noise for the same
  key, so a seeded run (a test, a replay) is reproducible bit for bit. Chosen explicitly
  (``privacy.noise = "seeded"``); its noise protects nobody from whoever knows the seed.

Both draw standard normals by the Box-Muller transform of uniform doubles made from 53
random bits each, so the two differ only in where the bits come from.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_TWO_PI = 2.0 * np.pi
_INV_2_53 = 1.0 / float(1 << 53)
_BLOCK = 1 << 16
_ZEROS = memoryview(bytes(_BLOCK))


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
        """Doubles ``(k + 0.5) / 2^53`` for 53 random bits ``k``: never 0, never 1."""
        k = self.bits(size) >> np.uint64(11)
        return (k.astype(np.float64) + 0.5) * _INV_2_53

    def normal(self, size: int, std: float = 1.0) -> np.ndarray:
        """Box-Muller: each pair of uniforms gives two independent standard normals."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        pairs = (size + 1) // 2
        u = self.uniform(2 * pairs)
        radius = np.sqrt(-2.0 * np.log(u[:pairs]))
        angle = _TWO_PI * u[pairs:]
        out = np.empty(2 * pairs, np.float64)
        np.multiply(radius, np.cos(angle), out=out[:pairs])
        np.multiply(radius, np.sin(angle), out=out[pairs:])
        out = out[:size]
        if std != 1.0:
            out *= std
        return out


class SecureNoise(_BoxMuller):
    """The ChaCha20 keystream under a fresh 256-bit key from :mod:`secrets`."""

    secure = True

    def __init__(self) -> None:
        key = secrets.token_bytes(32)
        nonce = secrets.token_bytes(16)
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()

    def bits(self, size: int) -> np.ndarray:
        """The next ``8 * size`` keystream bytes as ``uint64`` words (little-endian).

        The keystream is written block by block straight into the result (the 64 bytes
        of slack are what ``update_into`` asks for), with no full-size temporaries.
        """
        out = np.empty(size + 8, dtype="<u8")
        view = memoryview(out.data).cast("B")
        total = 8 * size
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


def secure_noise() -> NoiseSource:
    """A fresh cryptographic noise source."""
    return SecureNoise()


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
