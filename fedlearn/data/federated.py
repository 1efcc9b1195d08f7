"""A dataset split among clients, each with its own train/test split."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedlearn.data import partition as _partition
from fedlearn.data.datasets import Dataset
from fedlearn.errors import DataError

__all__ = ["PARTITIONER_NAMES", "ClientData", "FederatedDataset", "partition_dataset"]

#: Names accepted by :func:`partition_dataset`.
PARTITIONER_NAMES: tuple[str, ...] = ("iid", "dirichlet", "shards", "natural")


@dataclass(frozen=True, eq=False)
class ClientData:
    """The train and test arrays of one client (read-only copies).

    Parameters
    ----------
    x_train, y_train : np.ndarray
        Training inputs and labels.
    x_test, y_test : np.ndarray
        Held-out inputs and labels (may be empty).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.y_test.shape[0])


def _test_count(n: int, test_fraction: float) -> int:
    """Test-set size: rounded fraction, but >= 1 and <= n - 1 when n >= 2."""
    if test_fraction == 0 or n < 2:
        return 0
    return min(max(math.floor(test_fraction * n + 0.5), 1), n - 1)


def _gather(dataset: Dataset, train: np.ndarray, test: np.ndarray) -> ClientData:
    arrays = (dataset.x[train], dataset.y[train], dataset.x[test], dataset.y[test])
    for array in arrays:
        array.flags.writeable = False
    return ClientData(*arrays)


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    """A :class:`Dataset` whose samples are split among clients.

    Build it with :meth:`create` (or :func:`partition_dataset`); the
    constructor takes ready-made per-client train/test index arrays.

    Parameters
    ----------
    dataset : Dataset
        The underlying data.
    train_indices, test_indices : tuple of np.ndarray
        Sorted int64 sample indices of each client's train and test part.
    """

    dataset: Dataset
    train_indices: tuple[np.ndarray, ...]
    test_indices: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        """Check that the client index sets are valid and disjoint."""
        if len(self.train_indices) != len(self.test_indices):
            raise DataError("train_indices and test_indices must have one entry per client")
        if not self.train_indices:
            raise DataError("a FederatedDataset needs at least one client")
        n = len(self.dataset)
        every = np.concatenate([*self.train_indices, *self.test_indices])
        if every.size and (every.min() < 0 or every.max() >= n):
            raise DataError(f"client indices must lie in [0, {n})")
        if np.unique(every).size != every.size:
            raise DataError("client index sets overlap (a sample is used twice)")

    @classmethod
    def create(
        cls,
        dataset: Dataset,
        partitions: Sequence[np.ndarray],
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> FederatedDataset:
        """Split each client's partition into train and test parts.

        Parameters
        ----------
        dataset : Dataset
            The data the partitions index into.
        partitions : sequence of np.ndarray
            Disjoint, non-empty sample-index arrays, one per client.
        test_fraction : float
            Share of each client's samples held out, in ``[0, 1)``; rounded,
            but every client with >= 2 samples gets at least one test and one
            train sample when ``test_fraction > 0``.
        seed : int
            Seed of the splits; client ``cid`` uses ``default_rng([seed, cid])``.

        Returns
        -------
        FederatedDataset
        """
        if isinstance(test_fraction, bool) or not isinstance(
            test_fraction, (int, float, np.floating)
        ):
            raise DataError(f"test_fraction must be a number, got {test_fraction!r}")
        if not 0 <= test_fraction < 1:
            raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"seed must be an int >= 0, got {seed!r}")
        if len(partitions) == 0:
            raise DataError("partitions must hold at least one client")
        train: list[np.ndarray] = []
        test: list[np.ndarray] = []
        for cid, part in enumerate(partitions):
            indices = np.asarray(part)
            if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
                raise DataError(f"partitions[{cid}] must be a 1-D integer array")
            if indices.size == 0:
                raise DataError(f"partitions[{cid}] is empty")
            shuffled = np.random.default_rng([int(seed), cid]).permutation(indices.astype(np.int64))
            n_test = _test_count(shuffled.shape[0], float(test_fraction))
            test.append(np.sort(shuffled[:n_test]))
            train.append(np.sort(shuffled[n_test:]))
        return cls(dataset, tuple(train), tuple(test))

    @property
    def name(self) -> str:
        """Name of the underlying dataset."""
        return self.dataset.name

    @property
    def num_classes(self) -> int:
        """Number of classes of the underlying dataset."""
        return self.dataset.num_classes

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.train_indices)

    def client(self, cid: int) -> ClientData:
        """Return client ``cid``'s train and test arrays.

        Raises
        ------
        DataError
            If ``cid`` is not in ``[0, num_clients)``.
        """
        if isinstance(cid, bool) or not isinstance(cid, (int, np.integer)):
            raise DataError(f"cid must be an int, got {cid!r}")
        if not 0 <= cid < self.num_clients:
            raise DataError(f"cid={cid} out of range [0, {self.num_clients})")
        return _gather(self.dataset, self.train_indices[cid], self.test_indices[cid])

    def centralized(self) -> ClientData:
        """Pool every client's train part and every client's test part.

        Training on this gives the centralized baseline over exactly the
        samples the clients train on, evaluated on exactly their test samples.
        """
        train = np.sort(np.concatenate(self.train_indices))
        test = np.sort(np.concatenate(self.test_indices))
        return _gather(self.dataset, train, test)


def partition_dataset(
    dataset: Dataset,
    partitioner: str,
    num_clients: int | None,
    seed: int = 0,
    *,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    min_size: int = 10,
    test_fraction: float = 0.2,
) -> FederatedDataset:
    """Partition ``dataset`` by name and split every client into train/test.

    Parameters
    ----------
    dataset : Dataset
        The data to distribute.
    partitioner : str
        One of :data:`PARTITIONER_NAMES`: ``"iid"``, ``"dirichlet"`` (uses
        ``alpha`` and ``min_size``), ``"shards"`` (uses ``shards_per_client``)
        or ``"natural"`` (one client per ``dataset.keys`` value).
    num_clients : int or None
        Number of clients; ``None`` is only allowed for ``"natural"`` and
        means one client per key.
    seed : int
        Seed of both the partition and the train/test splits.
    alpha, shards_per_client, min_size
        Partitioner options, see :mod:`fedlearn.data.partition`.
    test_fraction : float
        Share of each client's samples held out for testing.

    Returns
    -------
    FederatedDataset
    """
    parts: list[np.ndarray]
    if partitioner == "natural":
        if dataset.keys is None:
            raise DataError(
                f"partitioner='natural' needs per-sample keys, and dataset "
                f"{dataset.name!r} has none"
            )
        parts = _partition.natural(dataset.keys, num_clients, seed)
    elif partitioner in PARTITIONER_NAMES:
        if num_clients is None:
            raise DataError(f"num_clients is required for partitioner={partitioner!r}")
        if partitioner == "iid":
            parts = _partition.iid(len(dataset), num_clients, seed)
        elif partitioner == "dirichlet":
            parts = _partition.dirichlet(dataset.y, num_clients, alpha, seed, min_size=min_size)
        else:
            parts = _partition.shards(dataset.y, num_clients, shards_per_client, seed)
    else:
        raise DataError(
            f"unknown partitioner {partitioner!r}; valid names: {', '.join(PARTITIONER_NAMES)}"
        )
    return FederatedDataset.create(dataset, parts, test_fraction=test_fraction, seed=seed)
