"""Cryptographic primitives of secure aggregation, all from ``cryptography``.

* X25519 key pairs and key agreement (:func:`generate_keypair`, :func:`agree`);
* HKDF-SHA256 derivations of a pairwise AEAD key (:func:`derive_share_key`) and a pairwise
  mask seed (:func:`derive_mask_seed`), both bound to the round and the (unordered) pair;
* ChaCha20-Poly1305 encryption with a random 96-bit nonce and associated data binding
  sender, receiver and round (:func:`encrypt`, :func:`decrypt`);
* mask expansion from a 256-bit seed by the ChaCha20 keystream (:func:`expand_mask`,
  and the in-place, cache-blocked :func:`apply_masks` used on the hot path).

Masks are never drawn from numpy's generators.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from fedlearn.errors import ConfigError, SecAggError, SerializationError

KEY_SIZE = 32
"""Length of raw X25519 keys, AEAD keys and mask seeds."""

NONCE_SIZE = 12
TAG_SIZE = 16
_DOMAIN = b"fedlearn-secagg/v1"
_PAIR = struct.Struct(">QQQ")
_ZERO_IV = bytes(16)
CHUNK_WORDS = 1 << 15
"""Mask words processed per block in :func:`apply_masks` (128/256 KiB, cache-resident)."""

_ZERO_CHUNK = bytes(CHUNK_WORDS * 8)


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair; ``public`` is the 32-byte raw public key."""

    private: X25519PrivateKey
    public: bytes

    def private_bytes(self) -> bytes:
        """The raw 32-byte private key (the secret that is Shamir-shared)."""
        return private_key_bytes(self.private)


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair."""
    private = X25519PrivateKey.generate()
    return KeyPair(private, public_key_bytes(private))


def private_key_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte form of an X25519 private key."""
    return private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def public_key_bytes(private: X25519PrivateKey) -> bytes:
    """The raw public key belonging to ``private``."""
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    """Load a raw 32-byte X25519 private key (e.g. one reconstructed from shares)."""
    if len(raw) != KEY_SIZE:
        raise SerializationError(f"an X25519 private key is {KEY_SIZE} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private: X25519PrivateKey | bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret of ``private`` and ``peer_public``.

    A malformed public key raises :class:`SerializationError`; a low-order point (which
    would give an all-zero secret) raises :class:`SecAggError`.
    """
    key = load_private(private) if isinstance(private, bytes) else private
    if not isinstance(peer_public, bytes) or len(peer_public) != KEY_SIZE:
        raise SerializationError(f"an X25519 public key is {KEY_SIZE} bytes")
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise SecAggError(f"key agreement refused the peer's public key: {exc}") from exc


def _pair_info(label: bytes, round: int, a: int, b: int) -> bytes:
    lo, hi = (a, b) if a <= b else (b, a)
    return b"%s/%s/" % (_DOMAIN, label) + _PAIR.pack(round, lo, hi)


def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=info).derive(shared)


def derive_share_key(shared: bytes, *, round: int, a: int, b: int) -> bytes:
    """32-byte AEAD key for the shares exchanged by clients ``a`` and ``b`` in ``round``."""
    return _hkdf(shared, _pair_info(b"share-key", round, a, b))


def derive_mask_seed(shared: bytes, *, round: int, a: int, b: int) -> bytes:
    """32-byte seed of the pairwise mask of clients ``a`` and ``b`` in ``round``."""
    return _hkdf(shared, _pair_info(b"mask-seed", round, a, b))


def _associated_data(sender: int, receiver: int, round: int) -> bytes:
    return _DOMAIN + b"/shares/" + _PAIR.pack(round, sender, receiver)


def encrypt(key: bytes, plaintext: bytes, *, sender: int, receiver: int, round: int) -> bytes:
    """``nonce || ciphertext || tag`` under ChaCha20-Poly1305 with a random 96-bit nonce.

    The associated data binds the sender, the receiver and the round, so the relaying
    server cannot redirect or replay a ciphertext without :func:`decrypt` noticing.
    """
    nonce = secrets.token_bytes(NONCE_SIZE)
    body = ChaCha20Poly1305(key).encrypt(
        nonce, plaintext, _associated_data(sender, receiver, round)
    )
    return nonce + body


def decrypt(key: bytes, blob: bytes, *, sender: int, receiver: int, round: int) -> bytes:
    """Open :func:`encrypt`'s output; any tampering raises :class:`SecAggError`."""
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise SecAggError("ciphertext is shorter than a nonce and a tag")
    try:
        return ChaCha20Poly1305(key).decrypt(
            blob[:NONCE_SIZE], blob[NONCE_SIZE:], _associated_data(sender, receiver, round)
        )
    except InvalidTag as exc:
        raise SecAggError(
            f"share ciphertext from client {sender} to client {receiver} failed authentication"
        ) from exc


def mask_dtype(modulus_bits: int) -> np.dtype[Any]:
    """uint32 for moduli up to 2^32, uint64 up to 2^64."""
    if not 1 <= modulus_bits <= 64:
        raise ConfigError(f"modulus_bits must be between 1 and 64, got {modulus_bits}")
    return np.dtype(np.uint32 if modulus_bits <= 32 else np.uint64)


def _keystream(seed: bytes) -> Any:
    if len(seed) != KEY_SIZE:
        raise SecAggError(f"a mask seed is {KEY_SIZE} bytes, got {len(seed)}")
    return Cipher(algorithms.ChaCha20(seed, _ZERO_IV), mode=None).encryptor()


def expand_mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` uniform integers mod ``2^modulus_bits`` from the ChaCha20 keystream of ``seed``.

    The words are the keystream read as little-endian uint32 (uint64 above 32 bits) with
    the top bits cleared; a power-of-two modulus keeps them exactly uniform. The result
    equals what :func:`apply_masks` adds for the same seed.
    """
    dtype = mask_dtype(modulus_bits)
    if length < 0:
        raise ConfigError("mask length must be non-negative")
    out = np.zeros(length, dtype=dtype)
    apply_masks(out, [(seed, 1)], modulus_bits)
    return out


def apply_masks(
    acc: np.ndarray,
    masks: Sequence[tuple[bytes, int]],
    modulus_bits: int,
    *,
    fill: Callable[[int, int, np.ndarray], None] | None = None,
) -> np.ndarray:
    """Add ``sign * expand_mask(seed)`` for each ``(seed, sign)`` to ``acc`` in place, mod 2^bits.

    ``acc`` must be a contiguous 1-D array of :func:`mask_dtype` ``(modulus_bits)``; signs are
    +1 or -1. The work is blocked so each keystream block is added while it is still in
    cache, and the unsigned wraparound of numpy does the reduction for free when the
    modulus is 2^32 or 2^64. ``fill(start, stop, block)``, if given, first writes the
    initial values of ``acc[start:stop]`` into ``block`` (a view of it), so that producing
    the plaintext (e.g. quantization) shares the cache-resident pass with the masking.
    """
    dtype = mask_dtype(modulus_bits)
    if acc.dtype != dtype or acc.ndim != 1 or not acc.flags.c_contiguous:
        raise ConfigError(f"mask accumulator must be a contiguous 1-D {dtype} array")
    if not acc.flags.writeable:
        raise ConfigError("mask accumulator must be writeable")
    for _, sign in masks:
        if sign not in (1, -1):
            raise ConfigError(f"mask sign must be +1 or -1, got {sign}")
    streams = [(_keystream(seed), np.add if sign > 0 else np.subtract) for seed, sign in masks]
    if (not streams and fill is None) or acc.size == 0:
        return acc
    itemsize = dtype.itemsize
    chunk = CHUNK_WORDS
    block = bytearray(chunk * itemsize + 64)  # update_into wants slack past the data
    words = np.frombuffer(block, dtype=dtype, count=chunk)
    zero = memoryview(_ZERO_CHUNK)
    n = acc.size
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        m = stop - start
        view = acc[start:stop]
        if fill is not None:
            fill(start, stop, view)
        ks = words[:m]
        zin = zero[: m * itemsize]
        for stream, op in streams:
            stream.update_into(zin, block)
            op(view, ks, out=view)
    reduce_inplace(acc, modulus_bits)
    return acc


def reduce_inplace(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Clear the bits of ``values`` above ``modulus_bits`` (a no-op for 32 and 64)."""
    if modulus_bits not in (32, 64):
        np.bitwise_and(values, values.dtype.type((1 << modulus_bits) - 1), out=values)
    return values
