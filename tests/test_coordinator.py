"""The round loop: aggregation, ordering, failures, quorum and bad input."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps import LogReg
from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.coordinator import Coordinator, in_task_order
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, Config
from fedlearn.errors import ConfigError
from fedlearn.simulation import InProcessTransport, PoolTransport, run_simulation
from fedlearn.strategy.base import Strategy

ROOT = Path(__file__).resolve().parents[1]
GLOBAL: Arrays = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.5])}


@dataclass
class Scripted:
    """Each client returns a fixed update; ``bad`` maps client id -> what goes wrong."""

    bad: dict[int, str] = field(default_factory=dict)

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        cid = ctx.client_id
        out = {"w": arrays["w"] + np.float32(cid), "b": arrays["b"] * (cid + 1)}
        kind = self.bad.get(cid)
        if kind == "raise":
            raise RuntimeError(f"disk full at client {cid}")
        if kind == "shape":
            out["w"] = np.zeros(3, np.float32)
        if kind == "dtype":
            out["w"] = out["w"].astype(np.float64)
        if kind == "nan":
            out["w"][0] = np.nan
        if kind == "inf":
            out["b"][0] = np.inf
        if kind == "missing":
            del out["b"]
        if kind == "extra":
            out["z"] = np.zeros(1)
        if kind == "order":
            out = {"b": out["b"], "w": out["w"]}
        if kind == "zero":
            return TrainResult(out, 0)
        if kind == "mutate":
            arrays["w"][0] = 99.0
        if kind == "type":
            return "not a result"  # type: ignore[return-value]
        return TrainResult(out, num_examples=cid + 1, metrics={"train_loss": float(cid)})

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        if self.bad.get(ctx.client_id) == "eval_nan":
            return EvaluateResult(10, float("nan"))
        return EvaluateResult(
            10 * (ctx.client_id + 1), float(ctx.client_id), {"accuracy": 1.0 / (ctx.client_id + 1)}
        )


def run(bad: dict[int, str] | None = None, clients: int = 3, quorum: int = 1, rounds: int = 1):
    app = Scripted(bad or {})
    coordinator = Coordinator(
        Strategy(min_train_clients=quorum),
        InProcessTransport(lambda: app),
        list(range(clients)),
        rounds,
    )
    return coordinator.run(GLOBAL)


def test_fedavg_by_hand() -> None:
    result = run()
    # clients 0,1,2 add 0,1,2 to w with weights 1,2,3: mean shift = (0+2+6)/6 = 4/3
    np.testing.assert_allclose(result.arrays["w"], [1 + 4 / 3, 2 + 4 / 3], rtol=1e-6)
    # b scaled by 1,2,3 with weights 1,2,3: 0.5 * (1+4+9)/6
    np.testing.assert_allclose(result.arrays["b"], [0.5 * 14 / 6])
    assert result.arrays["w"].dtype == np.float32
    record = result.rounds[0]
    assert record.ok and record.train_ok == 3 and record.eval_ok == 3
    # evaluation: weighted mean of accuracy 1, 1/2, 1/3 with weights 10, 20, 30
    assert record.eval_metrics["accuracy"] == pytest.approx((10 + 10 + 10) / 60)
    assert record.eval_metrics["loss"] == pytest.approx((0 + 20 + 60) / 60)
    per_client = [c for c in result.clients if c.stage is Stage.EVALUATE]
    assert [(c.client_id, c.num_examples) for c in per_client] == [(0, 10), (1, 20), (2, 30)]


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("raise", "RuntimeError: disk full at client 1"),
        ("shape", "shape (3,), global model has (2,)"),
        ("dtype", "dtype float64, global model has float32"),
        ("nan", "contains NaN or Inf"),
        ("inf", "contains NaN or Inf"),
        ("missing", "missing ['b']"),
        ("extra", "extra ['z']"),
        ("order", "order"),
        ("zero", "num_examples must be positive"),
        ("mutate", "read-only"),
        ("type", "must return TrainResult"),
    ],
)
def test_bad_update_is_rejected_and_named(kind: str, reason: str) -> None:
    result = run({1: kind})
    failed = [c for c in result.clients if not c.ok]
    assert [(c.round, c.stage, c.client_id) for c in failed] == [(1, Stage.TRAIN, 1)]
    assert reason in str(failed[0].error)
    # the round proceeds with clients 0 and 2 (weights 1 and 3): shift = 6/4
    np.testing.assert_allclose(result.arrays["w"], [1 + 1.5, 2 + 1.5], rtol=1e-6)
    assert result.rounds[0].ok and result.rounds[0].train_ok == 2


def test_global_model_intact_when_quorum_fails() -> None:
    before = {k: v.copy() for k, v in GLOBAL.items()}
    result = run({0: "nan", 1: "raise", 2: "shape"}, quorum=1)
    assert not result.rounds[0].ok
    assert "below the quorum" in str(result.rounds[0].error)
    for name in GLOBAL:
        np.testing.assert_array_equal(result.arrays[name], before[name])
        np.testing.assert_array_equal(GLOBAL[name], before[name])
    assert len([c for c in result.clients if not c.ok]) == 3


def test_quorum_counts_valid_updates() -> None:
    assert not run({0: "raise"}, quorum=3).rounds[0].ok
    assert run({0: "raise"}, quorum=2).rounds[0].ok


def test_failed_round_then_next_round_continues() -> None:
    @dataclass
    class FlakyOnce(Scripted):
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            if ctx.round == 1:
                raise RuntimeError("first round down")
            return super().train(arrays, config, ctx)

    app = FlakyOnce()
    result = Coordinator(Strategy(), InProcessTransport(lambda: app), [0, 1, 2], 2).run(GLOBAL)
    assert [r.ok for r in result.rounds] == [False, True]
    np.testing.assert_allclose(result.arrays["w"], [1 + 4 / 3, 2 + 4 / 3], rtol=1e-6)


def test_bad_evaluation_is_recorded_not_averaged() -> None:
    result = run({2: "eval_nan"})
    failed = [c for c in result.clients if not c.ok]
    assert [(c.stage, c.client_id) for c in failed] == [(Stage.EVALUATE, 2)]
    assert result.rounds[0].eval_ok == 2
    assert result.rounds[0].eval_metrics["accuracy"] == pytest.approx((10 + 10) / 30)


def test_invalid_settings_rejected_before_any_round() -> None:
    calls: list[int] = []

    class Counting(Scripted):
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            calls.append(ctx.client_id)
            return super().train(arrays, config, ctx)

    transport = InProcessTransport(Counting)
    with pytest.raises(ConfigError, match="min_train_clients=5 exceeds"):
        Coordinator(Strategy(min_train_clients=5), transport, [0, 1, 2], 1)
    with pytest.raises(ConfigError, match="fraction_train"):
        Coordinator(Strategy(fraction_train=0.0), transport, [0, 1, 2], 1)
    with pytest.raises(ConfigError, match="rounds"):
        Coordinator(Strategy(), transport, [0, 1, 2], 0)
    assert calls == []


def _tasks(n: int) -> list[Task]:
    return [Task(Stage.TRAIN, 1, cid, cid) for cid in range(n)]


@given(st.permutations(list(range(8))), st.lists(st.integers(0, 12), max_size=6))
def test_in_task_order_restores_order(order: list[int], junk: list[int]) -> None:
    tasks = _tasks(8)
    replies = [Reply(Stage.TRAIN, 1, cid) for cid in order]
    # duplicates and replies from clients that were never asked are dropped
    replies += [Reply(Stage.TRAIN, 1, cid, error="dup") for cid in junk]
    out = list(in_task_order(replies, tasks))
    assert [r.client_id for r in out] == list(range(8))
    assert all(r.ok for r in out)


def test_in_task_order_fills_missing_replies() -> None:
    out = list(in_task_order([Reply(Stage.TRAIN, 1, 2), Reply(Stage.EVALUATE, 1, 0)], _tasks(3)))
    assert [(r.client_id, r.ok) for r in out] == [(0, False), (1, False), (2, True)]
    assert out[0].error == "no reply from the client"


def _arrays_reply(cid: int, rng: np.random.Generator) -> Reply:
    arrays = {
        "w": rng.standard_normal((50, 20)).astype(np.float32),
        "b": rng.standard_normal(20).astype(np.float64),
        "step": np.array(cid, dtype=np.int64),  # 0-d
    }
    return Reply(Stage.TRAIN, 1, cid, num_examples=cid + 1, arrays=arrays, metrics={"m": cid})


def test_early_replies_past_the_memory_budget_wait_on_disk_and_come_back_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    rng = np.random.default_rng(0)
    replies = [_arrays_reply(cid, rng) for cid in range(6)]
    one = sum(a.nbytes for a in replies[0].arrays.values())  # type: ignore[union-attr]
    seen_on_disk: list[int] = []

    def arriving() -> Iterator[Reply]:
        yield from replies[:0:-1]  # clients 5..1 first: all early
        seen_on_disk.append(len(list(tmp_path.glob("fedlearn-held-*/*.safetensors"))))
        yield replies[0]

    out = list(in_task_order(arriving(), _tasks(6), hold_bytes=2 * one))
    assert [r.client_id for r in out] == list(range(6))
    assert seen_on_disk == [3]  # two of the five early replies fit the budget
    for got, want in zip(out, replies, strict=True):
        assert got.num_examples == want.num_examples and got.metrics == want.metrics
        assert list(got.arrays) == list(want.arrays)  # type: ignore[arg-type]
        for name, array in want.arrays.items():  # type: ignore[union-attr]
            assert got.arrays[name].dtype == array.dtype  # type: ignore[index]
            assert got.arrays[name].shape == array.shape  # type: ignore[index]
            assert got.arrays[name].tobytes() == array.tobytes()  # type: ignore[index]
    assert list(tmp_path.glob("fedlearn-held-*")) == []  # cleaned up


def test_a_run_with_replies_in_reverse_and_no_memory_is_bit_identical() -> None:
    class Reversed(InProcessTransport):
        def execute(self, arrays: Arrays, tasks: list[Task]) -> Iterator[Reply]:
            return iter(list(super().execute(arrays, tasks))[::-1])

    def final(transport: InProcessTransport, hold: int | None) -> Arrays:
        coordinator = Coordinator(
            Strategy(fraction_train=0.5), transport, list(range(12)), 3, seed=3, hold_bytes=hold
        )
        return coordinator.run(LogReg().initial_arrays(0)).arrays

    plain = final(InProcessTransport(LogReg), None)
    spilled = final(Reversed(LogReg), 0)
    for name in plain:
        assert plain[name].tobytes() == spilled[name].tobytes()


def _final(backend: str, seed: int, **kw: object) -> Arrays:
    return run_simulation(
        LogReg,
        Strategy(fraction_train=0.5),
        num_clients=12,
        rounds=3,
        seed=seed,
        backend=backend,
        **kw,
    ).arrays  # type: ignore[arg-type]


def test_same_seed_is_bit_identical_and_backends_agree() -> None:
    a = _final("inprocess", 3)
    b = _final("inprocess", 3)
    c = _final("pool", 3, workers=2)
    d = _final("pool", 3, workers=3)
    for other in (b, c, d):
        for name in a:
            assert a[name].tobytes() == other[name].tobytes()
    e = _final("inprocess", 4)
    assert a["w"].tobytes() != e["w"].tobytes()


def test_pool_survives_a_worker_that_dies() -> None:
    class Crashy(LogReg):
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            if ctx.client_id == 3 and ctx.round == 1:
                os._exit(3)
            return super().train(arrays, config, ctx)

    transport = PoolTransport(Crashy, workers=2, chunk_size=1)
    try:
        result = Coordinator(Strategy(), transport, list(range(8)), 2).run(
            LogReg().initial_arrays(0)
        )
    finally:
        transport.close()
    failed = [c for c in result.clients if not c.ok]
    assert (1, Stage.TRAIN, 3) in [(c.round, c.stage, c.client_id) for c in failed]
    assert all("worker process died" in str(c.error) for c in failed)
    assert [r.ok for r in result.rounds] == [True, True]
    assert result.rounds[1].train_ok == 8


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.integers(0, 5),
        st.sampled_from(
            ["raise", "shape", "dtype", "nan", "inf", "missing", "extra", "order", "zero", "mutate"]
        ),
        max_size=6,
    )
)
def test_fuzzed_failures_never_corrupt_the_model(bad: dict[int, str]) -> None:
    result = run(bad, clients=6)
    good = [c for c in range(6) if c not in bad]
    if not good:
        assert not result.rounds[0].ok
        np.testing.assert_array_equal(result.arrays["w"], GLOBAL["w"])
        return
    weights = np.array([c + 1 for c in good], dtype=float)
    shift = float(np.dot(weights, good) / weights.sum())
    np.testing.assert_allclose(result.arrays["w"], GLOBAL["w"] + shift, rtol=1e-5)
    assert sorted(
        c.client_id for c in result.clients if not c.ok and c.stage is Stage.TRAIN
    ) == sorted(bad)


def test_shuffled_transport_gives_the_same_model() -> None:
    class Shuffling(InProcessTransport):
        def execute(self, broadcast: Arrays, tasks):  # type: ignore[no-untyped-def]
            replies = list(super().execute(broadcast, tasks))
            random.Random(len(tasks)).shuffle(replies)
            return iter(replies)

    app = LogReg()
    arrays = app.initial_arrays(0)
    plain = Coordinator(Strategy(), InProcessTransport(LogReg), list(range(10)), 2, seed=5).run(
        arrays
    )
    shuffled = Coordinator(Strategy(), Shuffling(LogReg), list(range(10)), 2, seed=5).run(arrays)
    assert plain.arrays["w"].tobytes() == shuffled.arrays["w"].tobytes()


def test_pool_workers_exit_when_their_parent_dies(tmp_path: Path) -> None:
    script = tmp_path / "orphan.py"
    script.write_text(
        "import os\n"
        "from apps import LogReg\n"
        "from fedlearn.simulation import PoolTransport\n"
        "from fedlearn.engine.messages import Task, Stage\n"
        "t = PoolTransport(LogReg, workers=2)\n"
        "tasks = [Task(Stage.EVALUATE, 1, c, c) for c in range(4)]\n"
        "list(t.execute(LogReg().initial_arrays(0), tasks))\n"
        "print(' '.join(str(w.process.pid) for w in t._workers), flush=True)\n"
        "os._exit(0)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    ).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        time.sleep(0.05)
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert alive == [], "orphaned pool workers kept running"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
