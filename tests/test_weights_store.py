"""Weights files and run-store checkpoints: exact round trips, order kept, tampering caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlearn.engine.results import RoundRecord
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights, save_weights
from fedlearn.errors import SerializationError


def test_weights_round_trip_keeps_order_shapes_and_dtypes(tmp_path: Path) -> None:
    arrays = {
        "z.last": np.arange(6.0).reshape(2, 3)[:, ::2],  # not contiguous
        "a.first": np.array(7, dtype=np.int64),  # 0-d
        "m": np.ones((2, 2), dtype=np.float16),
    }
    save_weights(arrays, tmp_path / "w.safetensors")
    back = load_weights(tmp_path / "w.safetensors")
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype
        np.testing.assert_array_equal(back[name], value)


def test_unreadable_weights_raise_serialization_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(SerializationError):
        load_weights(bad)


def _store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "run.db", run_id="r", checkpoint=True)
    store.start_run(0, {"x": 1})
    return store


def test_checkpoints_are_files_and_only_the_last_is_kept(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for rnd in (1, 2, 3):
        arrays = {"w": np.full(4, float(rnd), np.float32)}
        state = {"step": np.array(rnd, np.int64)}
        store.record_round(RoundRecord(rnd, True, 1, 1), [], arrays, state)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == ["r.round-3.safetensors"]
    checkpoint = store.last_checkpoint()
    assert checkpoint is not None
    rnd, arrays, state = checkpoint
    assert rnd == 3 and arrays["w"].tolist() == [3.0] * 4 and state["step"].shape == ()
    assert store.committed_round() == 3
    store.close()


def test_a_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.record_round(RoundRecord(1, True, 1, 1), [], {"w": np.zeros(3)}, {})
    path = tmp_path / "r.round-1.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SerializationError, match="digest"):
        store.last_checkpoint()
    store.close()


def test_streamed_safetensors_files_read_back_with_the_library(tmp_path: Path) -> None:
    """save_weights writes the format itself (no in-memory copy of the model); the
    safetensors library must read every dtype, 0-d, empty, big-endian and strided array."""
    import hashlib

    from safetensors.numpy import load_file

    arrays = {
        "scalar": np.array(2.5, np.float32),
        "big_endian": np.arange(5, dtype=">i4"),
        "flags": np.array([True, False, True]),
        "empty": np.ones((3, 0), np.float16),
        "strided": np.arange(24.0).reshape(4, 6)[:, ::3],
        "u64": np.array([2**63 + 1], np.uint64),
    }
    digest = save_weights(arrays, tmp_path / "w.safetensors")
    assert digest == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()).hexdigest()
    plain = load_file(str(tmp_path / "w.safetensors"))
    for name, array in arrays.items():
        assert plain[name].shape == array.shape, name
        assert np.array_equal(plain[name], array), name
        assert plain[name].dtype == array.dtype.newbyteorder("="), name


def test_readers_never_get_in_the_way_of_a_run_being_created(tmp_path: Path) -> None:
    """A report or a live view polls run.db while a run creates and fills it: a
    read-only store takes no write lock, so the run's own store never sees 'locked'."""
    import subprocess
    import sys

    poll = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fedlearn.engine.store import RunStore\n"
        "from fedlearn.errors import FedlearnError\n"
        "root, end, reads = Path(sys.argv[1]), time.monotonic() + 20, 0\n"
        "while time.monotonic() < end and not (root / 'done').exists():\n"
        "    for db in root.glob('*/run.db'):\n"
        "        try:\n"
        "            store = RunStore(db, run_id='r', read_only=True)\n"
        "        except FedlearnError:\n"
        "            continue\n"
        "        try:\n"
        "            store.committed_round(); reads += 1\n"
        "        except Exception:\n"
        "            pass  # tables not created yet: read again\n"
        "        finally:\n"
        "            store.close()\n"
        "print(reads)\n"
    )
    poller = subprocess.Popen(
        [sys.executable, "-c", poll, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        for i in range(40):
            (tmp_path / f"{i}").mkdir(exist_ok=True)
            store = RunStore(tmp_path / f"{i}" / "run.db", run_id="r", checkpoint=True)
            store.start_run(0, {})
            store.record_round(RoundRecord(1, True, 1, 1), [], {"w": np.zeros(2)}, {})
            store.set_status("finished")
            store.close()
    finally:
        (tmp_path / "done").touch()
        out, _ = poller.communicate(timeout=30)
    assert int(out) > 0  # the poller did read while the runs were made
