"""Split a dataset's sample indices among federated clients.

Every partitioner returns one sorted int64 index array per client and is
deterministic given ``seed``. Bad arguments raise :class:`DataError` naming
the argument.
"""

from __future__ import annotations

import numpy as np

from fedlearn.errors import DataError

__all__ = ["dirichlet", "iid", "natural", "shards"]


def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _label_arg(name: str, labels: np.ndarray) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.shape[0] == 0:
        raise DataError(f"{name} must not be empty")
    if not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must hold integers, got dtype {array.dtype}")
    return array


def _check_clients_vs_samples(num_clients: int, n_samples: int) -> None:
    if num_clients > n_samples:
        raise DataError(f"num_clients={num_clients} exceeds the number of samples ({n_samples})")


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(part, dtype=np.int64)) for part in parts]


def iid(n_samples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n_samples)`` and cut it into near-equal client parts.

    Parameters
    ----------
    n_samples : int
        Number of samples to distribute.
    num_clients : int
        Number of clients; part sizes differ by at most one.
    seed : int
        Seed of the shuffle.

    Returns
    -------
    list of np.ndarray
        Disjoint sorted index arrays covering ``range(n_samples)``.
    """
    n_samples = _int_arg("n_samples", n_samples, 1)
    num_clients = _int_arg("num_clients", num_clients, 1)
    _check_clients_vs_samples(num_clients, n_samples)
    seed = _int_arg("seed", seed, 0)
    order = np.random.default_rng(seed).permutation(n_samples)
    return _finish(np.array_split(order, num_clients))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    *,
    min_size: int = 10,
    max_retries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split with per-class Dirichlet proportions (Hsu et al., 2019).

    For every class, client shares are drawn from ``Dirichlet(alpha * 1)`` and
    that class's (shuffled) samples are cut accordingly. Small ``alpha`` gives
    each client few dominant classes; large ``alpha`` approaches an IID split.
    The draw is repeated until every client holds at least ``min_size``
    samples.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``(n,)``.
    num_clients : int
        Number of clients.
    alpha : float
        Dirichlet concentration, > 0.
    seed : int
        Seed of all random draws.
    min_size : int
        Smallest acceptable client size.
    max_retries : int
        Number of draws to try before giving up.

    Returns
    -------
    list of np.ndarray
        Disjoint sorted index arrays covering every sample.

    Raises
    ------
    DataError
        On bad arguments, or if no draw satisfies ``min_size``.
    """
    labels = _label_arg("labels", labels)
    num_clients = _int_arg("num_clients", num_clients, 1)
    min_size = _int_arg("min_size", min_size, 0)
    max_retries = _int_arg("max_retries", max_retries, 1)
    seed = _int_arg("seed", seed, 0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise DataError(f"alpha must be a number, got {alpha!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be a finite number > 0, got {alpha}")
    n_samples = labels.shape[0]
    _check_clients_vs_samples(num_clients, n_samples)
    if min_size * num_clients > n_samples:
        raise DataError(
            f"min_size={min_size} times num_clients={num_clients} exceeds the number "
            f"of samples ({n_samples})"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    concentration = np.full(num_clients, float(alpha))
    for _ in range(max_retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            shuffled = rng.permutation(members)
            shares = rng.dirichlet(concentration)
            cuts = (np.cumsum(shares)[:-1] * shuffled.shape[0]).astype(np.int64)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(chunks) for chunks in parts]
        if min(part.shape[0] for part in merged) >= min_size:
            return _finish(merged)
    raise DataError(
        f"dirichlet: no draw in max_retries={max_retries} gave every client at least "
        f"min_size={min_size} samples (alpha={alpha}, num_clients={num_clients}); "
        "raise alpha, lower min_size or num_clients"
    )


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. (2017).

    Samples are sorted by label (random order within a label), cut into
    ``num_clients * shards_per_client`` contiguous near-equal shards, and each
    client receives ``shards_per_client`` shards chosen at random.

    Parameters
    ----------
    labels : np.ndarray
        Integer class label of each sample, shape ``(n,)``.
    num_clients : int
        Number of clients.
    shards_per_client : int
        Shards given to each client.
    seed : int
        Seed of all random draws.

    Returns
    -------
    list of np.ndarray
        Disjoint sorted index arrays covering every sample.
    """
    labels = _label_arg("labels", labels)
    num_clients = _int_arg("num_clients", num_clients, 1)
    shards_per_client = _int_arg("shards_per_client", shards_per_client, 1)
    seed = _int_arg("seed", seed, 0)
    n_samples = labels.shape[0]
    _check_clients_vs_samples(num_clients, n_samples)
    num_shards = num_clients * shards_per_client
    if num_shards > n_samples:
        raise DataError(
            f"num_clients * shards_per_client = {num_shards} exceeds the number of "
            f"samples ({n_samples}); lower shards_per_client or num_clients"
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(n_samples)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _finish([np.concatenate([pieces[s] for s in row]) for row in assignment])


def natural(keys: np.ndarray, num_clients: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """One client per distinct natural key (e.g. a Shakespeare role).

    Parameters
    ----------
    keys : np.ndarray
        Integer key of each sample, shape ``(n,)``.
    num_clients : int or None
        ``None`` keeps every key. Otherwise that many keys are drawn at random
        (without replacement, using ``seed``); more than the number of distinct
        keys is an error.
    seed : int
        Seed of the key draw.

    Returns
    -------
    list of np.ndarray
        Sorted index arrays, one per kept key, in increasing key order.
    """
    keys = _label_arg("keys", keys)
    seed = _int_arg("seed", seed, 0)
    distinct = np.unique(keys)
    if num_clients is not None:
        num_clients = _int_arg("num_clients", num_clients, 1)
        if num_clients > distinct.shape[0]:
            raise DataError(
                f"num_clients={num_clients} exceeds the number of distinct keys "
                f"({distinct.shape[0]})"
            )
        if num_clients < distinct.shape[0]:
            chosen = np.random.default_rng(seed).choice(
                distinct.shape[0], size=num_clients, replace=False
            )
            distinct = distinct[np.sort(chosen)]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.searchsorted(sorted_keys, distinct, side="left")
    ends = np.searchsorted(sorted_keys, distinct, side="right")
    return _finish([order[s:e] for s, e in zip(starts, ends, strict=True)])
