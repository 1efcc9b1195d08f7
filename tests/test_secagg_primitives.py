"""Secure-aggregation primitives: Shamir sharing, X25519/HKDF/AEAD, ChaCha20 masks,
fixed-point quantization with its capacity check, and the neighbour graph."""

from __future__ import annotations

import contextlib
import math
import os
import random

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlearn.errors import ConfigError, SecAggError, SerializationError, UpdateRejected
from fedlearn.secagg import crypto, graph, quantize, shamir
from fedlearn.secagg.quantize import (
    check_capacity,
    dequantize,
    error_bound,
    flatten,
    max_scale_bits,
    unflatten,
)

# ------------------------------------------------------------------------- helpers


def _is_probable_prime(n: int) -> bool:
    if n < 2:
        return False
    small = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    rng = random.Random(1)
    for a in small + [rng.randrange(2, n - 1) for _ in range(32)]:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _chi_square_z(counts: np.ndarray) -> float:
    """Wilson-Hilferty z-score of a chi-square goodness-of-fit test against uniform."""
    expected = float(counts.sum()) / counts.size
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = int(counts.size) - 1
    return float((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


secrets32 = st.binary(min_size=32, max_size=32)


# -------------------------------------------------------------------------- Shamir


def test_field_is_a_prime_above_every_secret() -> None:
    assert shamir.PRIME > 2**256
    assert _is_probable_prime(shamir.PRIME)


@settings(max_examples=60, deadline=None)
@given(secret=secrets32, t=st.integers(2, 8), extra=st.integers(0, 5), data=st.data())
def test_any_t_shares_reconstruct(secret: bytes, t: int, extra: int, data: st.DataObject) -> None:
    shares = shamir.split(secret, t, t + extra)
    chosen = data.draw(st.permutations(shares))[: data.draw(st.integers(t, t + extra))]
    assert shamir.combine(chosen) == secret


@settings(max_examples=30, deadline=None)
@given(secret=secrets32, other=secrets32, t=st.integers(2, 7))
def test_t_minus_one_shares_are_consistent_with_every_secret(
    secret: bytes, other: bytes, t: int
) -> None:
    """Perfect secrecy: for t-1 shares and *any* candidate secret there is exactly one
    completing share (a bijection), so the t-1 shares say nothing about the secret."""
    seen = shamir.split(secret, t, t + 2)[: t - 1]
    points = [(s.index, s.value) for s in seen]
    x_star = t + 2
    for candidate in (secret, other, bytes(32), b"\xff" * 32):
        y = shamir._lagrange_at([*points, (0, int.from_bytes(candidate, "big"))], x_star)
        assert shamir.combine([*seen, shamir.Share(x_star, t, y)]) == candidate
    with pytest.raises(SecAggError, match="cannot reconstruct"):
        shamir.combine(seen)


def test_share_values_do_not_depend_on_the_secret() -> None:
    """Statistical check for t = 2: a single share of 0...0 and of 1...1 look alike."""
    rng = random.Random(7)
    tops = {b"\x00" * 32: np.zeros(16), b"\xff" * 32: np.zeros(16)}
    for secret, hist in tops.items():
        for _ in range(4000):
            share = shamir.split(secret, 2, 3, randbelow=rng.randrange)[0]
            hist[share.value * 16 // shamir.PRIME] += 1
        assert abs(_chi_square_z(hist)) < 5


def test_wrong_share_gives_wrong_secret_or_error() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, 5)
    bad = shamir.Share(shares[0].index, 3, (shares[0].value + 1) % shamir.PRIME)
    with contextlib.suppress(SecAggError):  # or a value that is not a 32-byte secret
        assert shamir.combine([bad, *shares[1:3]]) != secret
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir.combine([*shares[1:4], bad])


def test_combine_refuses_bad_share_sets() -> None:
    shares = shamir.split(os.urandom(32), 3, 5)
    with pytest.raises(SecAggError, match="same index"):
        shamir.combine([shares[0], shares[0], shares[1]])
    other = shamir.split(os.urandom(32), 2, 5)
    with pytest.raises(SecAggError, match="threshold"):
        shamir.combine([shares[0], shares[1], other[2]])
    with pytest.raises(SecAggError):
        shamir.combine([])


def test_split_validates_its_arguments() -> None:
    with pytest.raises(ConfigError):
        shamir.split(os.urandom(32), 4, 3)
    with pytest.raises(ConfigError):
        shamir.split(os.urandom(32), 1, 3)
    with pytest.raises(ConfigError):
        shamir.split(os.urandom(31), 2, 3)
    with pytest.raises(ConfigError):
        shamir.split(os.urandom(32), 2, [1, 1, 2])
    with pytest.raises(ConfigError):
        shamir.split(os.urandom(32), 2, [0, 1, 2])


def test_share_encoding_round_trips_and_rejects_malformed_bytes() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 2, [10, 2**40, 7])
    decoded = [shamir.Share.from_bytes(s.to_bytes()) for s in shares]
    assert decoded == shares
    assert shamir.combine(decoded[1:]) == secret
    raw = shares[0].to_bytes()
    assert len(raw) == shamir.SHARE_SIZE
    with pytest.raises(SerializationError):
        shamir.Share.from_bytes(raw[:-1])
    with pytest.raises(SerializationError):
        shamir.Share.from_bytes(raw[:10] + shamir.PRIME.to_bytes(33, "big"))  # value >= p
    with pytest.raises(SerializationError):
        shamir.Share.from_bytes(bytes(8) + raw[8:])  # index 0
    with pytest.raises(SerializationError):
        shamir.Share.from_bytes(raw[:8] + b"\x00\x01" + raw[10:])  # threshold 1
    with pytest.raises(SerializationError):
        shamir.combine([b"junk"])  # type: ignore[list-item]


def test_split_is_deterministic_under_a_given_rng() -> None:
    secret = os.urandom(32)
    a = shamir.split(secret, 3, 4, randbelow=random.Random(3).randrange)
    b = shamir.split(secret, 3, 4, randbelow=random.Random(3).randrange)
    assert a == b


# -------------------------------------------------------------------------- crypto


def test_agreement_and_derivations_are_symmetric_and_separated() -> None:
    a, b = crypto.generate_keypair(), crypto.generate_keypair()
    shared = crypto.agree(a.private, b.public)
    assert shared == crypto.agree(b.private_bytes(), a.public)
    k1 = crypto.derive_share_key(shared, round=3, a=1, b=2)
    assert k1 == crypto.derive_share_key(shared, round=3, a=2, b=1)
    assert k1 != crypto.derive_share_key(shared, round=4, a=1, b=2)
    assert k1 != crypto.derive_mask_seed(shared, round=3, a=1, b=2)
    assert len(k1) == 32
    assert crypto.public_key_bytes(crypto.load_private(a.private_bytes())) == a.public


def test_agreement_rejects_bad_public_keys() -> None:
    a = crypto.generate_keypair()
    with pytest.raises(SerializationError):
        crypto.agree(a.private, b"short")
    with pytest.raises(SecAggError):
        crypto.agree(a.private, bytes(32))  # low-order point: all-zero shared secret


def test_aead_round_trip_and_tampering() -> None:
    key = os.urandom(32)
    blob = crypto.encrypt(key, b"share bundle", sender=1, receiver=2, round=5)
    assert crypto.decrypt(key, blob, sender=1, receiver=2, round=5) == b"share bundle"
    assert blob[:12] != crypto.encrypt(key, b"share bundle", sender=1, receiver=2, round=5)[:12]
    for pos in (0, 12, len(blob) - 1):  # nonce, ciphertext, tag
        bad = bytearray(blob)
        bad[pos] ^= 1
        with pytest.raises(SecAggError, match="authentication"):
            crypto.decrypt(key, bytes(bad), sender=1, receiver=2, round=5)
    for kw in (
        {"sender": 3, "receiver": 2, "round": 5},
        {"sender": 1, "receiver": 3, "round": 5},
        {"sender": 1, "receiver": 2, "round": 6},
    ):
        with pytest.raises(SecAggError):
            crypto.decrypt(key, blob, **kw)
    with pytest.raises(SecAggError):
        crypto.decrypt(os.urandom(32), blob, sender=1, receiver=2, round=5)
    with pytest.raises(SecAggError):
        crypto.decrypt(key, blob[:20], sender=1, receiver=2, round=5)


def test_expand_mask_is_the_chacha20_keystream() -> None:
    seed = os.urandom(32)
    n = crypto.CHUNK_WORDS * 2 + 7  # crosses block boundaries
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    want32 = np.frombuffer(enc.update(bytes(4 * n)), dtype="<u4")
    assert np.array_equal(crypto.expand_mask(seed, n, 32), want32)
    assert np.array_equal(crypto.expand_mask(seed, n, 20), want32 & ((1 << 20) - 1))
    enc = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    want64 = np.frombuffer(enc.update(bytes(8 * n)), dtype="<u8")
    m64 = crypto.expand_mask(seed, n, 64)
    assert m64.dtype == np.uint64 and np.array_equal(m64, want64)
    assert np.array_equal(crypto.expand_mask(seed, n, 40), want64 & ((1 << 40) - 1))
    assert not np.array_equal(crypto.expand_mask(os.urandom(32), 64, 32), want32[:64])


def test_masks_are_uniform() -> None:
    mask = crypto.expand_mask(b"\x01" * 32, 100_000, 32)
    assert abs(_chi_square_z(np.bincount(mask.view(np.uint8), minlength=256))) < 5
    bits = np.unpackbits(mask.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(bits - 0.5) < 5 * 0.5 / math.sqrt(mask.size))


@pytest.mark.parametrize("bits", [16, 24, 32, 48, 64])
def test_apply_masks_adds_and_cancels(bits: int) -> None:
    n = crypto.CHUNK_WORDS + 5
    dtype = crypto.mask_dtype(bits)
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 2**62, n, dtype=np.uint64) & ((1 << bits) - 1)).astype(dtype)
    s1, s2 = os.urandom(32), os.urandom(32)
    acc = x.copy()
    crypto.apply_masks(acc, [(s1, 1), (s2, -1)], bits)
    modulus = 1 << bits
    want = (
        x.astype(object)
        + crypto.expand_mask(s1, n, bits).astype(object)
        - crypto.expand_mask(s2, n, bits).astype(object)
    ) % modulus
    assert np.array_equal(acc.astype(object), want)
    crypto.apply_masks(acc, [(s2, 1), (s1, -1)], bits)
    assert np.array_equal(acc, x)


def test_apply_masks_validates_its_accumulator() -> None:
    with pytest.raises(ConfigError):
        crypto.apply_masks(np.zeros(4, np.uint64), [(os.urandom(32), 1)], 32)
    ro = np.zeros(4, np.uint32)
    ro.flags.writeable = False
    with pytest.raises(ConfigError):
        crypto.apply_masks(ro, [(os.urandom(32), 1)], 32)
    with pytest.raises(ConfigError):
        crypto.apply_masks(np.zeros(4, np.uint32), [(os.urandom(32), 2)], 32)
    with pytest.raises(SecAggError):
        crypto.apply_masks(np.zeros(4, np.uint32), [(b"short", 1)], 32)


# ------------------------------------------------------------------------ quantize


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 40),
    scale_bits=st.integers(0, 16),
    bits=st.sampled_from([32, 40, 64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantized_sum_is_within_the_bound(
    n: int, d: int, scale_bits: int, bits: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    clip, max_weight = 2.0, 500
    check_capacity(n, max_weight, clip, scale_bits, bits)
    dtype = crypto.mask_dtype(bits)
    total = np.zeros(d + 1, dtype=dtype)
    exact = np.zeros(d)
    weights = 0
    for _ in range(n):
        x = (rng.normal(scale=2.0, size=d)).astype(np.float32)
        w = int(rng.integers(0, max_weight + 1))
        q = quantize.quantize(x, w, clip=clip, scale_bits=scale_bits, modulus_bits=bits)
        np.add(total, q, out=total)
        crypto.reduce_inplace(total, bits)
        exact += w * np.clip(x, -clip, clip).astype(np.float64)
        weights += w
    got, got_w = dequantize(total, scale_bits=scale_bits, modulus_bits=bits)
    assert got_w == weights
    assert np.max(np.abs(got - exact)) <= error_bound(n, scale_bits)


def test_quantize_clips_rounds_and_rejects_nan() -> None:
    x = np.array([-5.0, -1.0, -0.3, 0.0, 0.3, 1.0, 5.0, np.inf, -np.inf], dtype=np.float32)
    q = quantize.quantize(x, 3, clip=1.0, scale_bits=4, modulus_bits=32)
    signed = quantize.decode_signed(q, 32)
    assert signed.tolist() == [-48, -48, -14, 0, 14, 48, 48, 48, -48, 3]
    with pytest.raises(UpdateRejected, match="NaN"):
        quantize.quantize(
            np.array([0.0, np.nan], np.float32), 1, clip=1.0, scale_bits=4, modulus_bits=32
        )
    with pytest.raises(UpdateRejected):
        quantize.quantize(np.zeros((2, 2)), 1, clip=1.0, scale_bits=4, modulus_bits=32)
    with pytest.raises(UpdateRejected):
        quantize.quantize(np.zeros(2), -1, clip=1.0, scale_bits=4, modulus_bits=32)


def test_quantize_float64_and_the_slow_rounding_path() -> None:
    x = np.array([0.123456789012345, -0.5, 1e-9], dtype=np.float64)
    q = quantize.quantize(x, 1, clip=1.0, scale_bits=52, modulus_bits=64)  # |q| up to 2^52
    got, w = dequantize(q, scale_bits=52, modulus_bits=64)
    assert w == 1
    assert np.max(np.abs(got - x)) <= 2.0**-52


def test_capacity_check_is_exactly_the_wrap_condition() -> None:
    n, max_weight, clip, bits = 10, 100, 1.0, 32
    s = max_scale_bits(n, max_weight, clip, bits)
    assert s is not None
    check_capacity(n, max_weight, clip, s, bits)
    with pytest.raises(ConfigError, match="wrap"):
        check_capacity(n, max_weight, clip, s + 1, bits)
    # At the largest safe scale the worst case decodes; one bit more and it wraps.
    for scale, ok in ((s, True), (s + 1, False)):
        total = np.zeros(2, np.uint32)
        for _ in range(n):
            total += quantize.quantize(
                np.array([clip], np.float32),
                max_weight,
                clip=clip,
                scale_bits=scale,
                modulus_bits=bits,
            )
        got, _ = dequantize(total, scale_bits=scale, modulus_bits=bits)
        assert bool(got[0] == n * max_weight * clip) is ok
    with pytest.raises(ConfigError):
        check_capacity(2**20, 2**12, 1.0, 0, 32)  # the weights alone overflow
    with pytest.raises(ConfigError):
        check_capacity(1, 1, -1.0, 0, 32)
    with pytest.raises(ConfigError):
        check_capacity(1, 1, 1.0, 60, 64)


def test_flatten_round_trip() -> None:
    arrays: dict[str, np.ndarray] = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([0.5], dtype=np.float32),
        "steps": np.array(7, dtype=np.int64),
    }
    vec, spec = flatten(arrays)
    assert vec.dtype == np.float32 and vec.shape == (8,) and spec.size == 8
    back = unflatten(vec, spec)
    assert list(back) == ["w", "b", "steps"]
    for name, a in arrays.items():
        assert back[name].dtype == a.dtype and np.array_equal(back[name], a)
    with pytest.raises(ConfigError):
        unflatten(vec[:-1], spec)
    vec64, _ = flatten({"x": np.zeros(3, np.float64)})
    assert vec64.dtype == np.float64


# --------------------------------------------------------------------------- graph


@pytest.mark.parametrize(("n", "k"), [(2, 1), (5, 2), (7, 3), (10, 3), (12, 4), (31, 10), (9, 8)])
def test_graph_is_symmetric_k_regular_and_seeded(n: int, k: int) -> None:
    seed = b"s" * 16
    g = graph.neighbour_graph(range(n), k, seed)
    assert set(g) == set(range(n))
    for c, peers in g.items():
        assert c not in peers
        assert all(c in g[p] for p in peers)
        assert graph.neighbours_of(list(range(n))[::-1], k, seed, c) == peers
    degrees = sorted(len(p) for p in g.values())
    if n % 2 and k % 2 and k < n - 1:
        assert degrees == [k] * (n - 1) + [k + 1]
    else:
        assert degrees == [k] * n
    assert g == graph.neighbour_graph(list(range(n))[::-1], k, seed)  # order-free
    if k < n - 1:
        assert g != graph.neighbour_graph(range(n), k, b"t" * 16)


def test_graph_is_k_connected() -> None:
    n, k = 14, 4
    g = graph.neighbour_graph(range(n), k, os.urandom(16))
    rng = random.Random(0)
    for _ in range(50):
        removed = set(rng.sample(range(n), k - 1))
        alive = [c for c in range(n) if c not in removed]
        seen, todo = {alive[0]}, [alive[0]]
        while todo:
            for p in g[todo.pop()] - removed - seen:
                seen.add(p)
                todo.append(p)
        assert seen == set(alive)


def test_graph_validation_and_recommendations() -> None:
    with pytest.raises(ConfigError):
        graph.neighbour_graph(range(5), 5, b"s" * 16)
    with pytest.raises(ConfigError):
        graph.neighbour_graph(range(5), 0, b"s" * 16)
    with pytest.raises(ConfigError):
        graph.neighbour_graph([1, 1, 2], 1, b"s" * 16)
    with pytest.raises(ConfigError):
        graph.neighbour_graph(range(5), 2, b"short")
    assert graph.recommended_degree(100) == 14
    assert graph.recommended_degree(5) == 4
    assert graph.recommended_threshold(14) == 8
    assert graph.recommended_threshold(4) == 3
