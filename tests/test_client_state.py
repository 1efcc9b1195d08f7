"""Per-client state (``ctx.state``): versions by round, files shared by processes, the runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.client_state import (
    ClientState,
    ClientStateStore,
    DirectoryStateStore,
    MemoryStateStore,
)
from fedlearn.engine.messages import Stage, Task
from fedlearn.engine.records import Arrays, Config
from fedlearn.engine.runtime import ClientRuntime
from fedlearn.errors import SerializationError
from fedlearn.simulation import run_simulation
from fedlearn.strategy import FedAvg


def _state(value: float, rnd: int) -> ClientState:
    return ClientState({"v": np.array([value], np.float32)}, {"round": rnd})


@pytest.fixture(params=["memory", "directory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ClientStateStore:
    return MemoryStateStore() if request.param == "memory" else DirectoryStateStore(tmp_path)


def test_load_gives_the_newest_version_before_the_round(store: ClientStateStore) -> None:
    assert not store.load(3, before=1)
    store.save(3, 1, _state(1.0, 1))
    store.save(3, 4, _state(4.0, 4))
    assert store.load(3, before=5).values == {"round": 4}
    assert store.load(3, before=4).values == {"round": 1}  # round 4 runs again
    assert not store.load(3, before=1)
    # round 4 re-run after a crash: replaces its own version, keeps round 1's
    store.save(3, 4, _state(40.0, 4))
    assert store.load(3, before=4).values == {"round": 1}
    assert store.load(3, before=5).arrays["v"].tolist() == [40.0]
    store.save(3, 6, _state(6.0, 6))
    assert store.load(3, before=6).arrays["v"].tolist() == [40.0]
    assert not store.load(4, before=9)  # another client


def test_state_round_trips_bit_for_bit_and_arrays_are_writable(tmp_path: Path) -> None:
    arrays = {"a": np.arange(6, dtype=np.float64).reshape(2, 3) / 7, "n": np.array(3, np.int64)}
    state = ClientState(arrays, {"note": "x", "k": [1, 2.5]})
    back = ClientState.decode(state.encode())
    assert back.values == state.values
    for name, a in arrays.items():
        assert back.arrays[name].tobytes() == a.tobytes() and back.arrays[name].shape == a.shape
        assert back.arrays[name].flags.writeable
    DirectoryStateStore(tmp_path).save(0, 1, state)
    loaded = DirectoryStateStore(tmp_path).load(0, before=2)  # another process's view
    assert loaded.arrays["a"].tobytes() == arrays["a"].tobytes()


def test_a_damaged_file_is_a_serialization_error(tmp_path: Path) -> None:
    (tmp_path / "client-0.state").write_bytes(b"\x00\x00")
    with pytest.raises(SerializationError):
        DirectoryStateStore(tmp_path).load(0, before=1)


class Counter:
    """Counts each client's trainings in ctx.state; evaluate reports the count."""

    touched = True

    def initial_arrays(self, seed: int) -> Arrays:
        return {"w": np.zeros(1)}

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        if self.touched:
            ctx.state.values["n"] = ctx.state.values.get("n", 0) + 1
        if config.get("fail"):
            raise RuntimeError("boom")
        return TrainResult({"w": arrays["w"] + 1}, 1)

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        return EvaluateResult(1, 0.0, {"trained": ctx.state.values.get("n", 0)})


def test_runtime_saves_after_a_successful_task_only_when_used(tmp_path: Path) -> None:
    store = DirectoryStateStore(tmp_path)
    runtime = ClientRuntime(Counter(), states=store)
    w = {"w": np.zeros(1)}
    assert runtime.handle(Task(Stage.TRAIN, 1, 2, 0), w).ok
    assert runtime.handle(Task(Stage.TRAIN, 2, 2, 0), w).ok
    failed = runtime.handle(Task(Stage.TRAIN, 3, 2, 0, {"fail": True}), w)
    assert not failed.ok  # a failed training keeps the state it started from
    reply = runtime.handle(Task(Stage.EVALUATE, 3, 2, 0), w)
    assert reply.metrics == {"trained": 2}
    stateless = Counter()
    stateless.touched = False
    ClientRuntime(stateless, states=store).handle(Task(Stage.TRAIN, 1, 5, 0), w)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["client-2.prev.state", "client-2.state"]


@pytest.mark.parametrize("backend", ["inprocess", "pool"])
def test_state_follows_each_client_across_rounds_and_workers(backend: str) -> None:
    result = run_simulation(
        Counter,
        FedAvg(fraction_train=0.5, fraction_evaluate=1.0),
        num_clients=6,
        rounds=4,
        seed=1,
        backend=backend,  # type: ignore[arg-type]
        workers=2,
    )
    trained: dict[int, int] = {}
    for record in result.clients:
        if record.stage is Stage.TRAIN:
            trained[record.client_id] = trained.get(record.client_id, 0) + 1
        else:
            assert record.metrics["trained"] == trained.get(record.client_id, 0)
    assert len(trained) > 3


def test_a_site_keeps_client_state_on_its_disk_across_daemon_restarts(tmp_path: Path) -> None:
    """``client.state_dir`` of site.toml: a SCAFFOLD c_i written by one daemon is what the
    next daemon (after a restart) loads."""
    from fedlearn.config.deployment import SiteConfig
    from fedlearn.config.loading import load_toml
    from fedlearn.deploy.launch import build_site
    from fedlearn.security.keys import generate_site_key, save_private_key

    save_private_key(tmp_path / "site.key", generate_site_key())
    path = tmp_path / "site.toml"
    path.write_text(
        f"""
[coordinator]
address = "127.0.0.1:1"
insecure = true
server_id = "x"

[site]
name = "site-0"
key = "{tmp_path / "site.key"}"

[data]
num_clients = 2
seed = 0
simulated = {{ dataset = "breast_cancer", partitioner = "iid" }}

[client]
app = "clients.tabular:make_app"
params = {{ epochs = 1 }}
state_dir = "{tmp_path / "state"}"
"""
    )
    site = build_site(load_toml(SiteConfig, path))
    arrays = site.runtime.app.initial_arrays(0)  # type: ignore[attr-defined]
    broadcast = {**arrays, **{f"scaffold.c/{k}": np.zeros_like(v) for k, v in arrays.items()}}
    reply = site.runtime.handle(Task(Stage.TRAIN, 1, 0, 3), broadcast)
    assert reply.ok, reply.error
    restarted = build_site(load_toml(SiteConfig, path))
    kept = restarted.runtime.states.load(0, before=2)
    assert sorted(kept.arrays) == sorted(f"scaffold.c_i/{k}" for k in arrays)
    assert (tmp_path / "state" / "client-0.state").is_file()
