"""The Ray backend: the same model as the in-process and pool backends, bit for bit.

One private local Ray (its own temp dir, 2 CPUs) serves the whole module: each transport
finds this process connected and leaves that connection alone when it closes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps import LogReg
from benchmarks.peer_workload import PeerLogReg
from clients import mnist
from fedlearn.config.simulation import load_config
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.engine.client_app import ClientContext, TrainResult
from fedlearn.engine.coordinator import Coordinator
from fedlearn.engine.messages import Stage
from fedlearn.engine.records import Arrays, Config
from fedlearn.engine.results import RunResult
from fedlearn.errors import ConfigError
from fedlearn.run.job import run_job
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import run_simulation
from fedlearn.simulation.ray_session import (
    INSTALL_HINT,
    RaySession,
    check_address,
    check_ray,
    import_ray,
)
from fedlearn.simulation.ray_transport import RayTransport
from fedlearn.strategy import FedAvg, Strategy

pytestmark = pytest.mark.xdist_group("ray")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session() -> Iterator[RaySession]:
    if importlib.util.find_spec("ray") is None:  # not importorskip: RaySession imports it
        pytest.skip(f"the ray extra is not installed ({INSTALL_HINT})")
    handler = signal.getsignal(signal.SIGTERM)
    session = RaySession(num_cpus=2)
    assert signal.getsignal(signal.SIGTERM) is handler  # ray.init's own handler is undone
    yield session
    temp_dir = session.temp_dir
    session.close()
    assert temp_dir is not None and not os.path.exists(temp_dir)


def _same(a: RunResult, b: RunResult) -> None:
    assert list(a.arrays) == list(b.arrays)
    for name in a.arrays:
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes(), name
    assert [r.eval_metrics for r in a.rounds] == [r.eval_metrics for r in b.rounds]
    assert all(c.ok for c in a.clients) and all(c.ok for c in b.clients)


def test_local_ray_lives_in_a_private_temp_dir(ray_session: RaySession) -> None:
    assert ray_session.owned and ray_session.temp_dir is not None
    temp = Path(ray_session.temp_dir)
    assert temp.name.startswith("fl-ray-") and len(str(temp)) <= 48  # socket paths < 108
    assert any(p.name.startswith("session_") for p in temp.iterdir())
    assert ray_session.resources()["CPU"] == 2


def test_peer_workload_is_bit_identical_on_every_backend(ray_session: RaySession) -> None:
    def run(backend: str) -> RunResult:
        return run_simulation(
            PeerLogReg,
            Strategy(),
            num_clients=40,
            rounds=3,
            seed=0,
            backend=backend,  # type: ignore[arg-type]
            workers=2,
        )

    ray = run("ray")
    _same(run("inprocess"), ray)
    _same(run("pool"), ray)


def test_mnist_cnn_is_bit_identical_to_pool(ray_session: RaySession) -> None:
    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", 40, 0, alpha=0.5)
    factory = functools.partial(mnist.make_app, data, epochs=1, batch_size=32, lr=0.05)

    def run(backend: str) -> RunResult:
        return run_simulation(
            factory,
            FedAvg(fraction_train=0.1, fraction_evaluate=0.1),
            num_clients=40,
            rounds=2,
            seed=0,
            backend=backend,  # type: ignore[arg-type]
            workers=2,
        )

    _same(run("pool"), run("ray"))


def test_secure_aggregation_stages_stick_to_their_actor(ray_session: RaySession) -> None:
    secure = SecureAggregation(clip=2.0, max_weight=100)

    def run(backend: str, workers: int | None = None) -> RunResult:
        return run_simulation(
            LogReg,
            FedAvg(),
            num_clients=12,
            rounds=2,
            seed=3,
            backend=backend,  # type: ignore[arg-type]
            workers=workers,
            secure=secure,
        )

    _same(run("inprocess"), run("ray", workers=2))


class _Crashy(LogReg):
    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        if ctx.client_id == 3 and ctx.round == 1:
            os._exit(3)
        return super().train(arrays, config, ctx)


def test_a_dead_actor_fails_its_tasks_and_is_replaced(ray_session: RaySession) -> None:
    transport = RayTransport(_Crashy, actors=2, chunk_size=1)
    try:
        result = Coordinator(Strategy(), transport, list(range(8)), 2).run(
            LogReg().initial_arrays(0)
        )
    finally:
        transport.close()
    failed = [c for c in result.clients if not c.ok]
    assert (1, Stage.TRAIN, 3) in [(c.round, c.stage, c.client_id) for c in failed]
    assert all("Ray actor failed" in str(c.error) for c in failed)
    assert [r.ok for r in result.rounds] == [True, True]
    assert result.rounds[1].train_ok == 8


def test_a_config_with_backend_ray_runs_a_job(
    ray_session: RaySession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the client app is named "clients.tabular:make_app"
    settings: dict[str, Any] = {
        "run.rounds": 2,
        "run.clients": 5,
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "clients.tabular:make_app",
        "client.params": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "publish.enabled": False,
    }
    results = {}
    for kind in ("pool", "ray"):
        config = load_config(
            None,
            {
                **settings,
                "run.out_dir": str(tmp_path / kind),
                "backend.kind": kind,
                "backend.workers": 2,
            },
        )
        results[kind] = run_job(config).outcome.result
    pool, ray = results["pool"], results["ray"]
    assert pool is not None and ray is not None
    _same(pool, ray)


def test_resources_the_cluster_cannot_place_are_refused(ray_session: RaySession) -> None:
    with pytest.raises(ConfigError, match="room for 1 actors at num_cpus=2"):
        RayTransport(PeerLogReg, actors=2, num_cpus=2)
    with pytest.raises(ConfigError, match="0 GPUs: room for 0"):
        RayTransport(PeerLogReg, num_gpus=1)


# --------------------------------------------------------------------------- no Ray needed
def test_a_missing_ray_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedlearn\[ray\]'"):
        import_ray()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'fedlearn\[ray\]'"):
        check_ray(None)


def test_an_address_where_nothing_listens_is_a_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free again once closed
    with pytest.raises(ConfigError, match=f"backend.address 127.0.0.1:{port}: no Ray head"):
        check_address(f"127.0.0.1:{port}")


def test_an_unreachable_address_stops_a_job_before_its_directory_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("ray") is None:
        pytest.skip(f"the ray extra is not installed ({INSTALL_HINT})")
    monkeypatch.chdir(ROOT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    config = load_config(
        None,
        {
            "run.out_dir": str(out),
            "data.dataset": "breast_cancer",
            "client.app": "clients.tabular:make_app",
            "backend.kind": "ray",
            "backend.address": f"127.0.0.1:{port}",
        },
    )
    with pytest.raises(ConfigError, match="no Ray head answers there"):
        run_job(config)
    assert not out.exists()


@pytest.mark.parametrize(
    "backend, message",
    [
        ({"kind": "pool", "address": "127.0.0.1:6379"}, "address applies to kind = 'ray' only"),
        ({"kind": "ray", "address": "no-port"}, "backend.address"),
        ({"kind": "ray", "num_cpus": 0}, "backend.num_cpus"),
        ({"kind": "ray", "num_gpus": -1}, "backend.num_gpus"),
    ],
)
def test_bad_ray_settings_are_named(backend: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {f"backend.{k}": v for k, v in backend.items()})


def test_scaffold_client_state_follows_clients_across_actors(
    ray_session: RaySession, tmp_path: Path
) -> None:
    """SCAFFOLD's c_i lives in the clients' state directory that every actor opens: the
    Ray run ends with the in-process model and server control variate, bit for bit."""
    from algo_apps import LeastSquares, problems

    from fedlearn.strategy import Scaffold

    data = problems(5, 3, 8, seed=3)

    def run(backend: str, **kw: Any) -> RunResult:
        return run_simulation(
            lambda: LeastSquares(data, [1, 2, 3, 2, 4], 0.05),
            Scaffold(fraction_train=0.6),
            num_clients=5,
            rounds=4,
            seed=4,
            backend=backend,  # type: ignore[arg-type]
            workers=2,
            evaluate_every=0,
            **kw,
        )

    ray, inprocess = run("ray", state_dir=tmp_path), run("inprocess")
    assert ray.arrays["w"].tobytes() == inprocess.arrays["w"].tobytes()
    assert ray.state["c/w"].tobytes() == inprocess.state["c/w"].tobytes()
    assert any(p.name.endswith(".state") for p in tmp_path.iterdir())


def test_fedbuff_on_the_virtual_clock_is_bit_identical_to_pool(ray_session: RaySession) -> None:
    """Asynchronous rounds: arrivals follow the virtual clock, not the actors' pace."""
    from fedlearn.engine.clock import Latency
    from fedlearn.strategy import FedBuff

    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", 20, 0, alpha=0.5)
    factory = functools.partial(mnist.make_app, data, epochs=1, batch_size=32, lr=0.05)

    def run(backend: str) -> RunResult:
        return run_simulation(
            factory,
            FedBuff(buffer_size=2, concurrency=4, fraction_evaluate=0.2),
            num_clients=20,
            rounds=3,
            seed=1,
            backend=backend,  # type: ignore[arg-type]
            workers=2,
            latency=Latency("lognormal", sigma=1.0),
        )

    pool, ray = run("pool"), run("ray")
    _same(pool, ray)
    assert [(c.round, c.client_id) for c in pool.clients] == [
        (c.round, c.client_id) for c in ray.clients
    ]
    assert [r.virtual_time for r in pool.rounds] == [r.virtual_time for r in ray.rounds]
