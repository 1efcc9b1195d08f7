"""Tests for fedlearn.data.partition and fedlearn.data.federated."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlearn.data import (
    Dataset,
    FederatedDataset,
    dirichlet,
    iid,
    natural,
    partition_dataset,
    shards,
)
from fedlearn.errors import DataError

# --------------------------------------------------------------------------- helpers


def balanced_labels(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for part in parts:
        assert part.dtype == np.int64
        assert part.ndim == 1
        assert np.all(np.diff(part) > 0), "each part must be sorted without repeats"
    merged = np.concatenate(parts)
    assert merged.size == n, "parts must be disjoint and cover every index"
    assert np.array_equal(np.sort(merged), np.arange(n))


def mean_total_variation(parts: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean distance between each client's label mix and the global one."""
    k = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=k) / labels.size
    distances = []
    for part in parts:
        mix = np.bincount(labels[part], minlength=k) / part.size
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def same_split(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def toy_dataset(n: int = 200, num_classes: int = 4, with_keys: bool = True) -> Dataset:
    rng = np.random.default_rng(3)
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = rng.integers(0, num_classes, size=n).astype(np.int64)
    keys = (np.arange(n) % 7).astype(np.int64) if with_keys else None
    return Dataset("toy", x, y, num_classes, keys)


# --------------------------------------------------------------------------- iid


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 400),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_exact_cover_and_balanced(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(1, n))
    parts = iid(n, k, seed)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_deterministic_and_seed_dependent() -> None:
    assert same_split(iid(1000, 10, 5), iid(1000, 10, 5))
    assert not same_split(iid(1000, 10, 5), iid(1000, 10, 6))


def test_iid_is_shuffled() -> None:
    parts = iid(1000, 10, 0)
    assert not np.array_equal(parts[0], np.arange(100))


# --------------------------------------------------------------------------- dirichlet


@settings(max_examples=40, deadline=None)
@given(
    num_classes=st.integers(1, 6),
    per_class=st.integers(5, 60),
    data=st.data(),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_exact_cover(
    num_classes: int, per_class: int, data: st.DataObject, alpha: float, seed: int
) -> None:
    labels = balanced_labels(num_classes, per_class, seed % 97)
    k = data.draw(st.integers(1, min(12, labels.size)))
    parts = dirichlet(labels, k, alpha, seed, min_size=0)
    assert len(parts) == k
    assert_exact_cover(parts, labels.size)


def test_dirichlet_alpha_controls_label_skew() -> None:
    labels = balanced_labels(10, 300)
    uniform = dirichlet(labels, 10, 1000.0, seed=1)
    skewed = dirichlet(labels, 10, 0.1, seed=1)
    tv_uniform = mean_total_variation(uniform, labels)
    tv_skewed = mean_total_variation(skewed, labels)
    assert tv_uniform < 0.1
    assert tv_skewed > 0.5
    # With alpha=0.1 most clients are dominated by a few classes.
    top2 = [np.sort(np.bincount(labels[p], minlength=10))[-2:].sum() / p.size for p in skewed]
    assert np.median(top2) > 0.6


def test_dirichlet_respects_min_size() -> None:
    labels = balanced_labels(10, 100)
    parts = dirichlet(labels, 20, 0.3, seed=0, min_size=15)
    assert min(p.size for p in parts) >= 15
    assert_exact_cover(parts, labels.size)


def test_dirichlet_deterministic_and_seed_dependent() -> None:
    labels = balanced_labels(5, 100)
    assert same_split(dirichlet(labels, 8, 0.5, 3), dirichlet(labels, 8, 0.5, 3))
    assert not same_split(dirichlet(labels, 8, 0.5, 3), dirichlet(labels, 8, 0.5, 4))


def test_dirichlet_gives_up_after_max_retries() -> None:
    labels = balanced_labels(10, 100)
    with pytest.raises(DataError, match="min_size"):
        dirichlet(labels, 50, 0.001, seed=0, min_size=15, max_retries=3)


# --------------------------------------------------------------------------- shards


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 9), min_size=1, max_size=300),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_shards_exact_cover(labels: list[int], data: st.DataObject, seed: int) -> None:
    y = np.array(labels, dtype=np.int64)
    spc = data.draw(st.integers(1, min(4, y.size)))
    k = data.draw(st.integers(1, y.size // spc))
    parts = shards(y, k, spc, seed)
    assert len(parts) == k
    assert_exact_cover(parts, y.size)
    sizes = [p.size for p in parts]
    # every shard has floor or ceil of n / (k * spc) samples
    assert max(sizes) - min(sizes) <= spc


@pytest.mark.parametrize("spc", [1, 2, 5])
def test_shards_limit_labels_per_client(spc: int) -> None:
    # 10 classes x 120 samples cut into 50 shards of 24: no shard crosses a class
    labels = balanced_labels(10, 120)
    num_clients = 50 // spc
    parts = shards(labels, num_clients, spc, seed=2)
    for part in parts:
        assert np.unique(labels[part]).size <= spc
    assert_exact_cover(parts, labels.size)


def test_shards_uneven_classes_span_at_most_two_labels_per_shard() -> None:
    labels = np.concatenate([np.full(c * 10 + 50, c) for c in range(6)]).astype(np.int64)
    parts = shards(labels, 10, 2, seed=0)  # shard size ~ 22 < smallest class (50)
    for part in parts:
        assert np.unique(labels[part]).size <= 2 * 2


def test_shards_deterministic_and_seed_dependent() -> None:
    labels = balanced_labels(10, 50)
    assert same_split(shards(labels, 20, 2, 1), shards(labels, 20, 2, 1))
    assert not same_split(shards(labels, 20, 2, 1), shards(labels, 20, 2, 2))


# --------------------------------------------------------------------------- natural


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(-5, 30), min_size=1, max_size=200))
def test_natural_one_client_per_key(keys: list[int]) -> None:
    k = np.array(keys, dtype=np.int64)
    parts = natural(k)
    distinct = np.unique(k)
    assert len(parts) == distinct.size
    assert_exact_cover(parts, k.size)
    for key, part in zip(distinct, parts, strict=True):
        assert np.all(k[part] == key)


def test_natural_subset_of_keys() -> None:
    keys = np.repeat(np.arange(20), np.arange(1, 21))
    parts = natural(keys, 5, seed=0)
    assert len(parts) == 5
    chosen = [int(np.unique(keys[p])[0]) for p in parts]
    assert chosen == sorted(chosen)
    for key, part in zip(chosen, parts, strict=True):
        assert np.array_equal(part, np.flatnonzero(keys == key))
    assert same_split(natural(keys, 5, seed=0), parts)
    assert not same_split(natural(keys, 5, seed=1), parts)
    assert len(natural(keys, 20, seed=0)) == 20


# --------------------------------------------------------------------------- errors

LABELS = balanced_labels(3, 10)


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda: iid(10, 0), "num_clients"),
        (lambda: iid(5, 6), "num_clients"),
        (lambda: iid(0, 1), "n_samples"),
        (lambda: iid(10, 2, -1), "seed"),
        (lambda: iid(10, 2.0), "num_clients"),  # type: ignore[arg-type]
        (lambda: dirichlet(LABELS, 3, 0.0), "alpha"),
        (lambda: dirichlet(LABELS, 3, -1.0), "alpha"),
        (lambda: dirichlet(LABELS, 3, float("nan")), "alpha"),
        (lambda: dirichlet(LABELS, 0, 1.0), "num_clients"),
        (lambda: dirichlet(LABELS, 31, 1.0, min_size=0), "num_clients"),
        (lambda: dirichlet(LABELS, 4, 1.0, min_size=10), "min_size"),
        (lambda: dirichlet(LABELS, 3, 1.0, max_retries=0), "max_retries"),
        (lambda: dirichlet(LABELS.reshape(3, 10), 3, 1.0), "labels"),
        (lambda: dirichlet(LABELS.astype(float), 3, 1.0), "labels"),
        (lambda: dirichlet(np.array([], dtype=np.int64), 1, 1.0), "labels"),
        (lambda: shards(LABELS, 0, 2), "num_clients"),
        (lambda: shards(LABELS, 3, 0), "shards_per_client"),
        (lambda: shards(LABELS, 11, 3), "shards_per_client"),
        (lambda: shards(LABELS, 31, 1), "num_clients"),
        (lambda: natural(LABELS, 4), "num_clients"),
        (lambda: natural(LABELS, 0), "num_clients"),
        (lambda: natural(LABELS.astype(float)), "keys"),
    ],
)
def test_bad_arguments_name_the_argument(call: object, arg: str) -> None:
    with pytest.raises(DataError, match=arg):
        call()  # type: ignore[operator]


# --------------------------------------------------------------------------- federated


def test_create_splits_each_client_into_disjoint_train_test() -> None:
    ds = toy_dataset()
    parts = iid(len(ds), 8, 0)
    fed = FederatedDataset.create(ds, parts, test_fraction=0.25, seed=1)
    assert fed.num_clients == 8
    assert fed.name == "toy" and fed.num_classes == 4
    for cid, part in enumerate(parts):
        train, test = fed.train_indices[cid], fed.test_indices[cid]
        assert np.intersect1d(train, test).size == 0
        assert np.array_equal(np.union1d(train, test), part)
        assert test.size == round(0.25 * part.size)
        data = fed.client(cid)
        assert np.array_equal(data.x_train, ds.x[train])
        assert np.array_equal(data.y_test, ds.y[test])
        assert data.num_train + data.num_test == part.size
        assert not data.x_train.flags.writeable


def test_create_at_least_one_test_sample() -> None:
    ds = toy_dataset()
    parts = [np.array([0, 1]), np.array([2, 3, 4]), np.array([5])]
    fed = FederatedDataset.create(ds, parts, test_fraction=0.01)
    assert [fed.client(c).num_test for c in range(3)] == [1, 1, 0]
    assert [fed.client(c).num_train for c in range(3)] == [1, 2, 1]
    fed0 = FederatedDataset.create(ds, parts, test_fraction=0.0)
    assert all(fed0.client(c).num_test == 0 for c in range(3))


def test_create_deterministic_and_seed_dependent() -> None:
    ds = toy_dataset()
    parts = iid(len(ds), 4, 0)
    a = FederatedDataset.create(ds, parts, seed=7)
    b = FederatedDataset.create(ds, parts, seed=7)
    c = FederatedDataset.create(ds, parts, seed=8)
    assert same_split(list(a.test_indices), list(b.test_indices))
    assert not same_split(list(a.test_indices), list(c.test_indices))


def test_centralized_pools_exactly_the_clients_data() -> None:
    ds = toy_dataset()
    fed = partition_dataset(ds, "dirichlet", 5, seed=0, alpha=0.5, min_size=5)
    pooled = fed.centralized()
    clients = [fed.client(c) for c in range(fed.num_clients)]
    assert pooled.num_train == sum(c.num_train for c in clients)
    assert pooled.num_test == sum(c.num_test for c in clients)
    assert pooled.num_train + pooled.num_test == len(ds)
    # x rows are unique in the toy data, so compare them as sets of rows
    train_rows = np.sort(np.concatenate([c.x_train[:, 0] for c in clients]))
    assert np.array_equal(np.sort(pooled.x_train[:, 0]), train_rows)
    test_rows = np.sort(np.concatenate([c.x_test[:, 0] for c in clients]))
    assert np.array_equal(np.sort(pooled.x_test[:, 0]), test_rows)
    assert np.intersect1d(pooled.x_train[:, 0], pooled.x_test[:, 0]).size == 0


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "natural"])
def test_partition_dataset_dispatch(name: str) -> None:
    ds = toy_dataset()
    fed = partition_dataset(ds, name, 5, seed=0, min_size=5)
    assert fed.num_clients == 5
    every = np.concatenate([*fed.train_indices, *fed.test_indices])
    assert np.unique(every).size == every.size
    if name != "natural":
        assert every.size == len(ds)


def test_partition_dataset_natural_all_keys() -> None:
    fed = partition_dataset(toy_dataset(), "natural", None)
    assert fed.num_clients == 7


@pytest.mark.parametrize(
    ("call", "arg"),
    [
        (lambda: partition_dataset(toy_dataset(), "random", 3), "partitioner"),
        (
            lambda: partition_dataset(toy_dataset(with_keys=False), "natural", 3),
            "natural",
        ),
        (lambda: partition_dataset(toy_dataset(), "iid", None), "num_clients"),
        (lambda: partition_dataset(toy_dataset(), "iid", 3, test_fraction=1.0), "test_fraction"),
        (lambda: partition_dataset(toy_dataset(), "iid", 3, test_fraction=-0.1), "test_fraction"),
        (lambda: partition_dataset(toy_dataset(), "dirichlet", 3, alpha=0), "alpha"),
        (lambda: FederatedDataset.create(toy_dataset(), []), "partitions"),
        (lambda: FederatedDataset.create(toy_dataset(), [np.array([], np.int64)]), "partitions"),
        (
            lambda: FederatedDataset.create(toy_dataset(), [np.array([0, 1]), np.array([1])]),
            "overlap",
        ),
        (lambda: FederatedDataset.create(toy_dataset(), [np.array([0, 1000])]), "indices"),
        (lambda: FederatedDataset.create(toy_dataset(), [np.arange(4)]).client(1), "cid"),
    ],
)
def test_federated_errors(call: object, arg: str) -> None:
    with pytest.raises(DataError, match=arg):
        call()  # type: ignore[operator]
