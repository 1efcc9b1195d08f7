"""Flower 1.x ClientApps (Message API and legacy client_fn) run unchanged on fedlearn.

The test apps are in ``tests/flower_apps.py``. Expected models are computed by hand from
what the apps do: client ``p`` returns ``x + (p + 1)`` weighted by ``10 (p + 1)``.
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import flower_apps
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlearn.apps.flower_message import MessageClientApp
from fedlearn.apps.flower_records import (
    array_to_numpy,
    decode_recorddict,
    encode_recorddict,
    recorddict_from_state,
    recorddict_to_state,
)
from fedlearn.engine.client_app import ClientContext
from fedlearn.engine.client_state import ClientState
from fedlearn.engine.messages import Stage
from fedlearn.errors import ConfigError, UpdateRejected
from fedlearn.simulation import run_simulation
from fedlearn.strategy import FedAvg, FedProx

N = 6
ROUNDS = 3
INITIAL = {"w": np.zeros(3), "b": np.zeros(1)}


def _app(**kw: object) -> MessageClientApp:
    return MessageClientApp(
        flower_apps.counting,
        num_partitions=N,
        initial_arrays=INITIAL,
        train_config={"lr": 0.25},
        **kw,  # type: ignore[arg-type]
    )


def _expected(rounds: int) -> float:
    weights = np.array([10 * (p + 1) for p in range(N)], dtype=float)
    step = float(np.sum(weights * np.arange(1, N + 1)) / weights.sum())
    return rounds * step


@pytest.mark.parametrize("backend", ["inprocess", "pool"])
def test_state_persists_per_client_across_rounds(backend: str) -> None:
    """Each client's context.state counts its own calls: round r is its r-th train and
    r-th evaluate call, in one process and in the worker pool, where a client's tasks
    land in whichever worker is free (the state travels through the client state store)."""
    app = _app()
    result = run_simulation(
        lambda: app, FedAvg(), num_clients=N, rounds=ROUNDS, backend=backend, workers=2
    )
    train = [c for c in result.clients if c.stage is Stage.TRAIN]
    evals = [c for c in result.clients if c.stage is Stage.EVALUATE]
    assert len(train) == len(evals) == N * ROUNDS
    assert all(c.ok for c in result.clients), [c.error for c in result.clients if not c.ok]
    for c in train:
        assert c.metrics["train_calls"] == c.round
        assert c.metrics["server-round"] == c.round
        assert c.metrics["partition-id"] == c.client_id
        assert c.metrics["num-partitions"] == N
        assert c.metrics["lr"] == 0.25  # the ServerApp's train_config reaches the app
        assert c.num_examples == 10 * (c.client_id + 1)
    for c in evals:
        assert c.metrics["eval_calls"] == c.round
        assert c.metrics["train_calls_seen"] == c.round
    np.testing.assert_allclose(result.arrays["w"], np.full(3, _expected(ROUNDS)), rtol=1e-12)
    assert list(result.arrays) == ["w", "b"]  # list-keyed replies are named back by position
    if backend == "pool":
        workers: dict[int, set[object]] = defaultdict(set)
        for c in result.clients:
            workers[c.client_id].add(c.metrics["worker"])
        assert len(set().union(*workers.values())) == 2
        assert any(len(w) > 1 for w in workers.values()), "no client changed worker"


def test_backends_give_the_same_model() -> None:
    first = _app()
    a = run_simulation(lambda: first, FedAvg(), num_clients=N, rounds=2)
    app = _app()
    b = run_simulation(lambda: app, FedAvg(), num_clients=N, rounds=2, backend="pool", workers=2)
    for name in a.arrays:
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes()


def test_node_config_matches_flowers_simulation() -> None:
    """Flower's simulation engine gives its i-th node partition-id i of N; so does the
    adapter for client id i (checked against Flower's own node registration)."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores
    from flwr.supercore.run import Run

    stores = _register_node_info_stores({1000 + i: i for i in range(N)}, Run.create_empty(1), None)
    flower = sorted(
        (s.node_config["partition-id"], s.node_config["num-partitions"]) for s in stores.values()
    )
    app = _app()
    ours = [
        (app.context(i).node_config["partition-id"], app.context(i).node_config["num-partitions"])
        for i in range(N)
    ]
    assert ours == flower


def test_fedprox_mu_reaches_the_app_under_flowers_key() -> None:
    seen: list[object] = []
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    flower = ClientApp()

    @flower.train()
    def train(msg: Message, context: Context) -> Message:
        seen.append(dict(msg.content["config"]))
        return Message(
            RecordDict(
                {"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}
            ),
            reply_to=msg,
        )

    app = MessageClientApp(flower, num_partitions=1)
    app.train(INITIAL, FedProx(proximal_mu=0.5).train_config(None), ClientContext(0, 2, 0))  # type: ignore[arg-type]
    assert seen == [{"proximal_mu": 0.5, "proximal-mu": 0.5, "server-round": 2}]


def test_legacy_client_fn_runs() -> None:
    """ClientApp(client_fn=...) with NumPyClient.to_client(), and a bare client_fn."""
    for source in (flower_apps.legacy, flower_apps.legacy_client_fn):
        app = MessageClientApp(source, num_partitions=2)
        init = app.initial_arrays(0)
        assert list(init) == ["p0", "p1"]
        result = run_simulation(lambda app=app: app, FedAvg(), num_clients=2, rounds=1)
        # each client returns 2x + pid with 4 examples: mean 2x + 0.5
        np.testing.assert_array_equal(result.arrays["p0"], np.full(3, 2.5))
        evals = [c for c in result.clients if c.stage is Stage.EVALUATE]
        assert [c.loss for c in evals] == [7.5, 7.5]
        assert [c.metrics for c in evals] == [{"pid": 0}, {"pid": 1}]
        train = [c for c in result.clients if c.stage is Stage.TRAIN]
        assert [c.metrics["round"] for c in train] == [1, 1]


@pytest.mark.parametrize(
    ("source", "named"),
    [
        (flower_apps.bad_config, ["ConfigRecord", "'extra'", "note: str", "blob: bytes"]),
        (flower_apps.bad_list, ["metric 'losses' is list", "losses: list[float]"]),
        (flower_apps.bad_weight, ["lacks 'num-examples'", "loss: float"]),
    ],
)
def test_unmappable_replies_fail_the_client_and_say_what_they_hold(
    source: object, named: list[str]
) -> None:
    app = MessageClientApp(source, num_partitions=1)
    with pytest.raises(UpdateRejected) as info:
        app.train(INITIAL, {}, ClientContext(0, 1, 0))
    for text in named:
        assert text in str(info.value)
    assert "round 1, client 0" in str(info.value)


def test_message_api_app_needs_initial_arrays() -> None:
    with pytest.raises(ConfigError, match="initial_arrays"):
        MessageClientApp(flower_apps.counting, num_partitions=1).initial_arrays(0)
    with pytest.raises(ConfigError, match="num_partitions"):
        MessageClientApp(flower_apps.counting)


def test_state_bytes_round_trip_without_pickle(tmp_path: object) -> None:
    state = RecordDict(
        {
            "a": ArrayRecord({"x": ArrayRecord([np.arange(4, dtype=np.int32)])["0"]}),
            "m": MetricRecord({"i": 1, "f": 1.0, "l": [0.5, 2.0]}),
            "c": ConfigRecord({"s": "x", "y": b"\x00\xff", "t": True, "li": [1, 2]}),
        }
    )
    back = decode_recorddict(encode_recorddict(state))
    assert back["a"]["x"].numpy().tolist() == [0, 1, 2, 3]
    assert back["a"]["x"].dtype == "int32"
    assert dict(back["m"]) == {"i": 1, "f": 1.0, "l": [0.5, 2.0]}
    assert type(back["m"]["i"]) is int and type(back["m"]["f"]) is float
    assert dict(back["c"]) == {"s": "x", "y": b"\x00\xff", "t": True, "li": [1, 2]}
    kept = recorddict_to_state(state)  # what a client state store keeps of it
    assert dict(recorddict_from_state(ClientState.decode(kept.encode()))["c"]) == dict(back["c"])
    assert not recorddict_to_state(RecordDict())


@pytest.mark.parametrize(
    "a",
    [
        np.linspace(0.0, 1.0, 20),
        np.ones(()),
        np.arange(12, dtype=">i4").reshape(3, 4),
        np.array([True, False]),
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(25.0).reshape(5, 5)[:, ::2],
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),  # Fortran order: np.load's path
        np.zeros((0, 3)),
        np.array(["a", "b"]),
        np.arange(3) + 1j,
    ],
)
def test_array_to_numpy_equals_flowers_own_decoding(a: np.ndarray) -> None:
    """The direct read of a Flower Array's .npy bytes gives Array.numpy()'s array: same
    dtype (byte order included), shape, values, and writable; other layouts fall back."""
    array = Array(np.asarray(a))
    got, ref = array_to_numpy(array), array.numpy()
    assert (got.dtype, got.shape) == (ref.dtype, ref.shape)
    assert got.tobytes() == ref.tobytes()
    assert got.flags.writeable and got.flags.c_contiguous == ref.flags.c_contiguous


def test_sent_arrays_behave_as_flowers_own() -> None:
    """The global model's Arrays: Flower's class (bytes, dtype, shape equal to Flower's
    own Array), numpy() a fresh writable copy every call, and a changed ``data`` read
    from the new bytes, as Flower would."""
    from fedlearn.apps.flower_records import to_array_record

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    record = to_array_record({"w": a})
    sent, flowers = record["w"], Array(a)
    assert isinstance(sent, Array)
    assert (sent.data, sent.dtype, sent.shape, sent.stype) == (
        flowers.data,
        flowers.dtype,
        flowers.shape,
        flowers.stype,
    )
    a[0, 0] = 99.0  # the caller's array changing later does not reach the record
    first = sent.numpy()
    assert first.tobytes() == flowers.numpy().tobytes() and first.flags.writeable
    first[:] = -1.0  # the app's copy is its own
    assert sent.numpy().tobytes() == flowers.numpy().tobytes()
    sent.data = Array(np.ones(2)).data
    sent.dtype, sent.shape = "<f8", [2]
    assert sent.numpy().tolist() == [1.0, 1.0]


def test_an_app_changing_its_arrays_changes_nothing_another_client_gets() -> None:
    """One stage's messages share the Arrays' bytes, never the Array objects."""
    app = MessageClientApp(flower_apps.counting, num_partitions=2, initial_arrays={})
    arrays = {"0": np.arange(3.0), "1": np.zeros(1)}
    first, second = app._array_record(arrays), app._array_record(arrays)
    first["0"].data = Array(np.ones(3)).data  # one client's app rewrites its copy
    assert second["0"].numpy().tolist() == [0.0, 1.0, 2.0]
    assert first["0"].numpy().tolist() == [1.0, 1.0, 1.0]


def _sim_bench() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    for shared in (root.parent / "shared", root.parent.parent / "shared"):
        path = shared / "peers" / "flower" / "sim_bench.py"
        if path.is_file():
            return path
    return None


def _import_sim_bench() -> ModuleType:
    """sim_bench.py imported from its file (not copied)."""
    path = _sim_bench()
    assert path is not None
    spec = importlib.util.spec_from_file_location("sim_bench_peer", path)
    assert spec is not None and spec.loader is not None
    sim_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim_bench)
    return sim_bench


def _sim_bench_app(sim_bench: ModuleType, clients: int) -> MessageClientApp:
    """sim_bench's ClientApp with what its ServerApp gives Flower's FedAvg."""
    return MessageClientApp(
        sim_bench.client_app,
        num_partitions=clients,
        initial_arrays={"0": np.zeros(sim_bench.D), "1": np.zeros(1)},
        train_config={"lr": sim_bench.LR},
    )


@pytest.mark.skipif(_sim_bench() is None, reason="the Flower peer workload is not checked out")
def test_flower_peer_workload_client_app_runs_imported() -> None:
    """The peer benchmark's own ClientApp (imported from its file, not copied): 10 clients,
    2 rounds of FedAvg with its ServerApp's settings, on both backends, one model."""
    sim_bench = _import_sim_bench()
    app = _sim_bench_app(sim_bench, 10)
    strategy = FedAvg(min_train_clients=10, min_evaluate_clients=10)
    a = run_simulation(lambda: app, strategy, num_clients=10, rounds=2)
    b = run_simulation(lambda: app, strategy, num_clients=10, rounds=2, backend="pool", workers=2)
    assert all(c.ok for c in a.clients)
    assert [r.train_ok for r in a.rounds] == [10, 10]
    assert a.arrays["0"].tobytes() == b.arrays["0"].tobytes()
    last = [c for c in a.clients if c.stage is Stage.EVALUATE and c.round == 2]
    assert sorted(c.metrics["partition-id"] for c in last) == list(range(10))
    assert a.rounds[-1].eval_metrics["eval_acc"] > 0.8


@pytest.mark.skipif(_sim_bench() is None, reason="the Flower peer workload is not checked out")
def test_flower_peer_workload_final_model_equals_fedavg_reference() -> None:
    """fedlearn's final model for sim_bench's ClientApp is FedAvg's, to 1e-12: a numpy
    reference loop over sim_bench's own data and local training (imported), aggregated as
    Flower's FedAvg does (each update scaled by n_k / sum n, then summed). This pins the
    "same final model as Flower" claim of BENCHMARKS.md without Flower's Ray runtime
    (``benchmarks/bench_flower_app.py`` compares with Flower's own run)."""
    sim_bench = _import_sim_bench()
    clients, rounds = 10, 2
    app = _sim_bench_app(sim_bench, clients)
    strategy = FedAvg(min_train_clients=clients, min_evaluate_clients=clients)
    result = run_simulation(lambda: app, strategy, num_clients=clients, rounds=rounds)
    w, b = np.zeros(sim_bench.D), np.zeros(1)
    for _ in range(rounds):
        updates = []
        for pid in range(clients):
            x, y, _, _ = sim_bench.make_data(pid)
            updates.append((len(y), *sim_bench.local_train(w, b, x, y, lr=sim_bench.LR)))
        total = sum(n for n, _, _ in updates)
        w = sum((n / total) * wk for n, wk, _ in updates)
        b = sum((n / total) * bk for n, _, bk in updates)
    assert list(result.arrays) == ["0", "1"]
    np.testing.assert_allclose(result.arrays["0"], w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.arrays["1"], b, rtol=0, atol=1e-12)
    assert np.abs(w).max() > 0.1  # the model moved: the comparison is not of zeros
