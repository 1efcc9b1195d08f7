"""The SecAgg+ neighbour graph: who masks with whom and who holds whose shares.

Each client gets ``k`` neighbours (``k = O(log n)``; ``k = n - 1`` is the complete graph
of the original SecAgg). The graph is a Harary graph ``H(k, n)`` - a ring in which every
client links to the ``floor(k/2)`` nearest positions on either side, plus the opposite
position when ``k`` is odd - laid over a permutation of the client ids that is derived
from a public per-round seed. The Harary graph is ``k``-connected with the fewest
possible edges, every client has degree ``k`` (one client has ``k + 1`` when both ``n``
and ``k`` are odd), and the graph is symmetric. Anyone who knows the clients, ``k`` and the
seed recomputes the same graph, which is how a client checks the neighbour list the
server sent it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from fedlearn.errors import ConfigError

MIN_SEED_SIZE = 16


def _check_clients(clients: Sequence[int]) -> list[int]:
    ids = list(clients)
    for c in ids:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < 2**63 - 1:
            raise ConfigError(f"client ids must be ints in 0..2^63-2, got {c!r}")
    if len(set(ids)) != len(ids):
        raise ConfigError("client ids must be distinct")
    if len(ids) < 2:
        raise ConfigError("secure aggregation needs at least two clients")
    return ids


def shuffled(clients: Sequence[int], seed: bytes) -> list[int]:
    """A permutation of ``clients`` that depends only on the set of ids and ``seed``."""
    if not isinstance(seed, bytes) or len(seed) < MIN_SEED_SIZE:
        raise ConfigError(f"graph seed must be at least {MIN_SEED_SIZE} bytes")
    ids = _check_clients(clients)

    def key(c: int) -> tuple[bytes, int]:
        return hashlib.sha256(seed + c.to_bytes(8, "big")).digest(), c

    return sorted(ids, key=key)


def _positions(n: int, k: int, i: int) -> set[int]:
    """Positions adjacent to position ``i`` in the Harary graph H(k, n), ``k < n - 1``."""
    out = set()
    for offset in range(1, k // 2 + 1):
        out.add((i + offset) % n)
        out.add((i - offset) % n)
    if k % 2 == 1:
        if n % 2 == 0:
            out.add((i + n // 2) % n)
        else:
            # Chords (j, j + (n + 1) / 2) for j = 0 .. (n - 1) / 2.
            half = (n + 1) // 2
            if i <= (n - 1) // 2:
                out.add((i + half) % n)
            j = (i - half) % n
            if j <= (n - 1) // 2:
                out.add(j)
    out.discard(i)
    return out


def _check_degree(n: int, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n - 1:
        raise ConfigError(f"neighbour count k must be in 1..{n - 1} for {n} clients, got {k}")


def check_params(clients: Sequence[int], k: int, seed: bytes) -> None:
    """Raise :class:`ConfigError` unless ``(clients, k, seed)`` define a graph (cheap)."""
    if not isinstance(seed, bytes) or len(seed) < MIN_SEED_SIZE:
        raise ConfigError(f"graph seed must be at least {MIN_SEED_SIZE} bytes")
    _check_degree(len(_check_clients(clients)), k)


def neighbours_of(clients: Sequence[int], k: int, seed: bytes, client: int) -> frozenset[int]:
    """The neighbours of one ``client`` (what :func:`neighbour_graph` gives it), in O(n log n)."""
    order = shuffled(clients, seed)
    n = len(order)
    _check_degree(n, k)
    if client not in order:
        raise ConfigError(f"client {client} is not in the graph")
    if k == n - 1:
        return frozenset(order) - {client}
    i = order.index(client)
    return frozenset(order[j] for j in _positions(n, k, i))


def neighbour_graph(clients: Sequence[int], k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Map every client to its neighbours in the seeded Harary graph of degree ``k``."""
    order = shuffled(clients, seed)
    n = len(order)
    _check_degree(n, k)
    if k == n - 1:
        everyone = frozenset(order)
        return {c: everyone - {c} for c in order}
    return {c: frozenset(order[j] for j in _positions(n, k, i)) for i, c in enumerate(order)}


def recommended_degree(num_clients: int) -> int:
    """``min(n - 1, 2 * ceil(log2 n))`` - the SecAgg+ ``O(log n)`` degree with a margin."""
    if num_clients < 2:
        raise ConfigError("secure aggregation needs at least two clients")
    return min(num_clients - 1, 2 * math.ceil(math.log2(num_clients)))


def recommended_threshold(k: int) -> int:
    """A strict majority of the ``k + 1`` share holders (the neighbours and the client)."""
    if k < 1:
        raise ConfigError("k must be positive")
    return (k + 1) // 2 + 1
