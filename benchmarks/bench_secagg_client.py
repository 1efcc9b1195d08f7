"""Client-side cost of one SecAgg+ round versus the keystream floor.

A client with a 1M-element float32 update and ``k`` neighbours must at the very least
expand ``k + 1`` masks of 1M words (``k`` pairwise masks and its self mask) from a
cryptographic keystream. This benchmark times everything the client does in a round -
key generation, Shamir sharing and encryption of its two secrets, decryption of its
neighbours' shares, key agreement, quantization, mask expansion and masking, and the
unmask reply - and divides by the time to expand ``k + 1`` ChaCha20 keystreams of the
same length into a preallocated buffer (the fastest way ``cryptography`` offers), measured
in the same run.

    python benchmarks/bench_secagg_client.py [--clients 100] [--length 1000000] [--reps 7]

Prints ``secagg client / keystream floor = X`` (target <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedlearn.secagg import (
    EncryptedShares,
    PeerKey,
    PeerKeys,
    SecAggClient,
    SecAggConfig,
    Setup,
    UnmaskRequest,
)
from fedlearn.secagg.graph import neighbour_graph


def keystream_floor(k1: int, length: int) -> float:
    """Seconds to expand ``k1`` ChaCha20 keystreams of ``length`` uint32 words."""
    zeros = bytes(4 * length)
    buf = bytearray(4 * length + 64)
    t0 = time.perf_counter()
    for _ in range(k1):
        enc = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor()
        enc.update_into(zeros, buf)
        np.frombuffer(buf, dtype=np.uint32, count=length)
    return time.perf_counter() - t0


def keystream_naive(k1: int, length: int) -> float:
    """The same with a fresh output per mask (``update(bytes(4n))``, as most code does)."""
    t0 = time.perf_counter()
    for _ in range(k1):
        enc = Cipher(algorithms.ChaCha20(os.urandom(32), bytes(16)), mode=None).encryptor()
        np.frombuffer(enc.update(bytes(4 * length)), dtype=np.uint32)
    return time.perf_counter() - t0


def one_round(config: SecAggConfig, me: int, vector: np.ndarray) -> tuple[float, int]:
    """Time client ``me``'s whole round; its peers are prepared outside the timing."""
    graph = neighbour_graph(config.clients, config.num_neighbours, config.graph_seed)
    mine = sorted(graph[me])
    # Untimed: every other client that matters advertises keys and shares with ``me``.
    others = {c: SecAggClient(c, round=1) for c in {*mine, *(v for u in mine for v in graph[u])}}
    others.pop(me, None)
    adverts = {}
    for c, client in others.items():
        adverts[c] = client.handle(Setup(1, c, config, tuple(sorted(graph[c]))))
    client = SecAggClient(me, round=1)
    client.set_input(vector, 7)

    t0 = time.perf_counter()
    own = client.handle(Setup(1, me, config, tuple(mine)))
    t_setup = time.perf_counter() - t0
    adverts[me] = own

    def keys_for(c: int) -> PeerKeys:
        peers = tuple(
            PeerKey(v, adverts[v].c_pk, adverts[v].s_pk)  # type: ignore[union-attr]
            for v in sorted(graph[c])
        )
        return PeerKeys(1, c, peers)

    inbox = []
    for v in mine:
        reply = others[v].handle(keys_for(v))
        inbox.append((v, dict(reply.ciphertexts)[me]))  # type: ignore[union-attr]

    t0 = time.perf_counter()
    client.handle(keys_for(me))
    masked = client.handle(EncryptedShares(1, me, tuple(inbox)))
    client.handle(UnmaskRequest(1, me, tuple(sorted([*mine, me])), ()))
    elapsed = t_setup + time.perf_counter() - t0
    assert masked.masked.shape == (vector.size + 1,)  # type: ignore[union-attr]
    return elapsed, len(mine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--length", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()

    config = SecAggConfig.create(range(args.clients), args.length, max_weight=1000, clip=1.0)
    k = config.num_neighbours
    vector = np.random.default_rng(0).normal(scale=0.1, size=args.length).astype(np.float32)

    one_round(config, 0, vector)  # warm up
    keystream_floor(k + 1, args.length)
    client_t, floor_t, naive_t = [], [], []
    for _ in range(args.reps):
        floor_t.append(keystream_floor(k + 1, args.length))
        elapsed, degree = one_round(config, 0, vector)
        client_t.append(elapsed)
        naive_t.append(keystream_naive(k + 1, args.length))
    c, f, nv = min(client_t), min(floor_t), min(naive_t)
    print(
        f"clients={args.clients} k={degree} t={config.threshold} length={args.length} "
        f"modulus=2^{config.modulus_bits} scale=2^{config.scale_bits}"
    )
    print(f"client round: min {c * 1e3:.2f} ms (median {statistics.median(client_t) * 1e3:.2f})")
    print(
        f"keystream floor ({k + 1} x {args.length} u32, update_into): min {f * 1e3:.2f} ms "
        f"(median {statistics.median(floor_t) * 1e3:.2f})"
    )
    print(f"keystream, fresh buffers (update(bytes)): min {nv * 1e3:.2f} ms")
    print(f"secagg client / keystream floor = {c / f:.2f}")


if __name__ == "__main__":
    main()
