"""How the pool starts its workers: fork, forkserver, spawn; the same model from each.

With a CUDA build of torch the pool cannot fork workers that train once the parent ran a
backward pass (or touched CUDA), so ``auto`` picks ``forkserver`` there. The CPU tests
here check that forkserver and spawn workers give the fork pool's model bit for bit
(numpy and torch clients, after a backward pass in the parent); the CUDA test runs where
a GPU is present (``benchmarks/gpu_check.py --backend pool`` on the device machine).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from clients import mnist
from fedlearn.config.simulation import BackendSection
from fedlearn.data import FederatedDataset, load_dataset, partition_dataset
from fedlearn.engine.client_app import ClientContext
from fedlearn.engine.records import Arrays
from fedlearn.errors import ConfigError
from fedlearn.simulation import run_simulation
from fedlearn.simulation.pool import PoolTransport, resolve_start_method
from fedlearn.strategy import FedAvg
from tests.apps import LogReg

CUDA = torch.cuda.is_available()


def _final(factory: object, method: str, rounds: int = 2, clients: int = 6) -> Arrays:
    transport = PoolTransport(factory, workers=2, start_method=method)  # type: ignore[arg-type]
    try:
        assert transport.start_method == method
        return run_simulation(
            factory,  # type: ignore[arg-type]
            FedAvg(),
            num_clients=clients,
            rounds=rounds,
            seed=3,
            backend=transport,
        ).arrays
    finally:
        transport.close()


def _same(a: Arrays, b: Arrays) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def data() -> FederatedDataset:
    return partition_dataset(load_dataset("mnist5k"), "dirichlet", 4, seed=0, alpha=0.5)


def test_forkserver_and_spawn_workers_give_the_fork_pools_model() -> None:
    fork = _final(LogReg, "fork")
    _same(fork, _final(LogReg, "forkserver"))
    _same(fork, _final(LogReg, "spawn"))


def test_torch_clients_train_in_forkserver_workers_after_a_backward_pass_in_the_parent(
    data: FederatedDataset,
) -> None:
    factory = functools.partial(mnist.make_app, data, epochs=1, batch_size=64, lr=0.05)
    # the parent trains first: with a CUDA build this is what rules fork out
    app = factory()
    app.train(app.initial_arrays(0), {}, ClientContext(client_id=0, round=1, seed=7))
    inprocess = run_simulation(factory, FedAvg(), num_clients=4, rounds=1, seed=3).arrays
    _same(inprocess, _final(factory, "forkserver", rounds=1, clients=4))


def test_auto_forks_a_cpu_build_and_uses_forkserver_with_a_cuda_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert torch.version.cuda is None or CUDA  # this machine's wheel is the CPU build
    assert resolve_start_method("auto") == ("forkserver" if torch.version.cuda else "fork")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert resolve_start_method("auto") == "forkserver"
    assert PoolTransport(LogReg, workers=1).start_method == "forkserver"
    # a factory that cannot be pickled is forked under auto, refused when asked for
    assert PoolTransport(lambda: LogReg(), workers=1).start_method == "fork"
    with pytest.raises(ConfigError, match="pickles"):
        PoolTransport(lambda: LogReg(), workers=1, start_method="spawn")
    with pytest.raises(ConfigError, match="start_method must be one of"):
        resolve_start_method("thread")  # type: ignore[arg-type]


def test_start_method_is_a_pool_setting() -> None:
    assert BackendSection(kind="pool", start_method="spawn").start_method == "spawn"
    with pytest.raises(ValueError, match="start_method applies to kind = 'pool' only"):
        BackendSection(kind="inprocess", start_method="spawn")
    with pytest.raises(ValueError):
        BackendSection(kind="pool", start_method="threads")  # type: ignore[arg-type]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (runs on the device machine)")
def test_cuda_clients_train_in_pool_workers_after_the_parent_trained(
    data: FederatedDataset,
) -> None:
    factory = functools.partial(mnist.make_app, data, epochs=1, lr=0.05, device="cuda")
    parent = mnist.make_app(data, epochs=1, lr=0.05, device="cuda")
    parent.train(parent.initial_arrays(0), {}, ClientContext(client_id=0, round=1, seed=7))
    result = run_simulation(factory, FedAvg(), num_clients=4, rounds=1, seed=3, backend="pool")
    assert all(c.ok for c in result.clients), [c.error for c in result.clients if not c.ok]
    assert np.isfinite(result.rounds[-1].eval_metrics["accuracy"])


def test_a_pools_own_state_directory_goes_when_it_closes_or_is_collected() -> None:
    import gc

    closed = PoolTransport(LogReg, workers=1)
    directory = closed.states.directory
    assert directory.is_dir()
    closed.close()
    assert not directory.exists()

    forgotten = PoolTransport(LogReg, workers=1)  # never closed: collected
    directory = forgotten.states.directory
    del forgotten
    gc.collect()
    assert not directory.exists()
