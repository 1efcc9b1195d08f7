"""TorchClientApp with real torch on real (small) data sets."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np
import pytest
import torch

from clients import mnist, tabular
from fedlearn.apps.torch_app import TorchClientApp, evaluate_arrays, train_centralized
from fedlearn.data import ClientData, FederatedDataset, load_dataset, partition_dataset
from fedlearn.engine.client_app import (
    ClientApp,
    ClientContext,
    EvaluateResult,
    ProvidesInitialArrays,
    TrainResult,
)
from fedlearn.engine.messages import Stage, Task
from fedlearn.engine.records import Arrays, Config
from fedlearn.engine.runtime import ClientRuntime
from fedlearn.simulation.engine import run_simulation
from fedlearn.strategy import FedAvg


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    return partition_dataset(load_dataset("digits"), "iid", 5, seed=0)


@pytest.fixture(scope="module")
def cancer() -> FederatedDataset:
    return partition_dataset(load_dataset("breast_cancer"), "iid", 10, seed=0)


def ctx(cid: int = 0, seed: int = 123, round: int = 1) -> ClientContext:
    return ClientContext(client_id=cid, round=round, seed=seed)


def read_only(arrays: Arrays) -> Arrays:
    out = {}
    for name, a in arrays.items():
        view = a.view()
        view.flags.writeable = False
        out[name] = view
    return out


def distance(a: Arrays, b: Arrays) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def test_app_satisfies_the_protocols(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits)
    assert isinstance(app, ClientApp)
    assert isinstance(app, ProvidesInitialArrays)


def test_initial_arrays_follow_state_dict_order_and_seed(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits, hidden=16)
    state = torch.random.get_rng_state()
    a = app.initial_arrays(7)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    assert list(a) == list(app.model.state_dict())
    assert [v.shape for v in a.values()] == [(16, 64), (16,), (10, 16), (10,)]
    assert all(v.dtype == np.float32 for v in a.values())
    b, c = app.initial_arrays(7), app.initial_arrays(8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_zero_lr_round_trips_arrays_bit_exactly(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits)
    initial = app.initial_arrays(0)
    result = app.train(read_only(initial), {"lr": 0.0}, ctx())
    assert list(result.arrays) == list(initial)
    for name, a in initial.items():
        assert np.array_equal(result.arrays[name], a)
        assert result.arrays[name].dtype == a.dtype
    assert result.num_examples == digits.client(0).num_train


def test_returned_arrays_are_copies_not_views_of_the_model(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits)
    first = app.train(app.initial_arrays(0), {}, ctx(cid=0)).arrays
    snapshot = {k: v.copy() for k, v in first.items()}
    app.train(app.initial_arrays(1), {}, ctx(cid=1))  # reuses the same model instance
    assert all(np.array_equal(first[k], snapshot[k]) for k in first)
    assert all(v.flags.writeable for v in first.values())


def test_training_reduces_the_loss(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits, lr=0.1, momentum=0.9)
    arrays = app.initial_arrays(0)
    before = app.evaluate(arrays, {}, ctx())
    losses = []
    for rnd in range(1, 4):
        result = app.train(arrays, {"epochs": 2}, ctx(round=rnd, seed=rnd))
        arrays = result.arrays
        losses.append(float(result.metrics["train_loss"]))
    after = app.evaluate(arrays, {}, ctx())
    assert losses[-1] < losses[0]
    assert after.loss < 0.5 * before.loss
    assert float(after.metrics["accuracy"]) > 0.8
    assert set(result.metrics) == {"train_loss", "train_accuracy"}
    assert 0.0 <= float(result.metrics["train_accuracy"]) <= 1.0


def test_same_seed_gives_identical_arrays_and_other_seed_differs(
    cancer: FederatedDataset,
) -> None:
    app = tabular.make_app(cancer)
    initial = app.initial_arrays(0)
    a = app.train(initial, {"epochs": 2}, ctx(seed=5)).arrays
    b = tabular.make_app(cancer).train(initial, {"epochs": 2}, ctx(seed=5)).arrays
    c = app.train(initial, {"epochs": 2}, ctx(seed=6)).arrays
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_config_overrides_the_constructor_settings(cancer: FederatedDataset) -> None:
    app = tabular.make_app(cancer, lr=0.0)
    initial = app.initial_arrays(0)
    frozen = app.train(initial, {}, ctx()).arrays
    moved = app.train(initial, {"lr": 0.1, "epochs": 2, "batch_size": 8}, ctx()).arrays
    assert distance(frozen, initial) == 0.0
    assert distance(moved, initial) > 0.0
    with pytest.raises(ValueError, match="batch_size"):
        app.train(initial, {"batch_size": 0}, ctx())
    with pytest.raises(ValueError, match="lr"):
        app.train(initial, {"lr": "fast"}, ctx())


def test_evaluate_counts_the_clients_test_split(cancer: FederatedDataset) -> None:
    app = tabular.make_app(cancer)
    arrays = app.initial_arrays(0)
    for cid in (0, 3):
        result = app.evaluate(read_only(arrays), {}, ctx(cid=cid))
        assert result.num_examples == cancer.client(cid).num_test
        assert 0.0 <= float(result.metrics["accuracy"]) <= 1.0
        assert np.isfinite(result.loss) and result.loss > 0


def test_fedprox_with_huge_mu_stays_near_the_global_model(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits, lr=0.05)
    initial = app.initial_arrays(0)
    free = app.train(initial, {"epochs": 2, "proximal_mu": 0.0}, ctx()).arrays
    tied = app.train(initial, {"epochs": 2, "proximal_mu": 10.0}, ctx()).arrays
    assert distance(tied, initial) < 0.5 * distance(free, initial)


def test_empty_test_split_raises_a_clear_error() -> None:
    data = partition_dataset(load_dataset("wine"), "iid", 3, seed=0, test_fraction=0.0)
    app = tabular.make_app(data)
    with pytest.raises(ValueError, match="client 1 has an empty test split"):
        app.evaluate(app.initial_arrays(0), {}, ctx(cid=1))


def test_wrong_array_names_are_rejected(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits)
    arrays = app.initial_arrays(0)
    arrays["extra"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError, match="unexpected \\['extra'\\]"):
        app.train(arrays, {}, ctx())


def test_client_tensors_are_converted_once(digits: FederatedDataset) -> None:
    app = tabular.make_app(digits)
    arrays = app.initial_arrays(0)
    app.evaluate(arrays, {}, ctx(cid=2))
    cached = app.client_tensors(2)
    app.train(arrays, {}, ctx(cid=2))
    assert app.client_tensors(2) is cached


def test_centralized_training_shares_the_loop(digits: FederatedDataset) -> None:
    pooled: ClientData = digits.centralized()
    model_fn = partial(tabular.build_model, 64, 10, 32)
    run = partial(
        train_centralized, model_fn, pooled, epochs=3, batch_size=32, lr=0.1, momentum=0.9, seed=0
    )
    loss, accuracy = run()
    assert run() == (loss, accuracy)
    assert accuracy > 0.9
    untrained_loss, _ = evaluate_arrays(
        model_fn, TorchClientApp(model_fn, digits).initial_arrays(0), pooled
    )
    assert loss < untrained_loss


def test_inprocess_and_pool_backends_give_identical_models(cancer: FederatedDataset) -> None:
    factory = partial(tabular.make_app, cancer, lr=0.1)
    results = {
        backend: run_simulation(
            factory, FedAvg(), num_clients=10, rounds=3, seed=1, backend=backend, workers=2
        )
        for backend in ("inprocess", "pool")
    }
    inprocess, pool = results["inprocess"], results["pool"]
    assert list(inprocess.arrays) == list(pool.arrays)
    for name in inprocess.arrays:
        assert np.array_equal(inprocess.arrays[name], pool.arrays[name]), name
    assert inprocess.rounds[-1].eval_metrics == pool.rounds[-1].eval_metrics
    assert all(r.ok for r in inprocess.rounds)
    assert float(inprocess.rounds[-1].eval_metrics["accuracy"]) > 0.85


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_cnn_backends_match_when_thread_counts_match() -> None:
    """The pool's workers train with one torch thread; so must the in-process run.

    With more threads, oneDNN sums a convolution's weight gradient over the minibatch in
    per-thread partial sums, so the CNN's updates differ in the last bits (the tabular
    MLP above happens to be thread-count independent).
    """
    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", 20, seed=0, alpha=0.5)
    factory = partial(mnist.make_app, data, lr=0.1)
    runs = [
        run_simulation(factory, FedAvg(), num_clients=20, rounds=1, seed=0, backend=backend)
        for backend in ("inprocess", "pool")
    ]
    for name in runs[0].arrays:
        assert np.array_equal(runs[0].arrays[name], runs[1].arrays[name]), name


def test_each_task_starts_torch_from_its_own_seed() -> None:
    """The runtime seeds torch's global generator with the task's seed, as
    ``torch.manual_seed`` would, so an app drawing from it repeats for the same task."""

    class Draws:
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            return TrainResult({"w": torch.rand(8, dtype=torch.float64).numpy()}, 1, {})

        def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
            return EvaluateResult(0.0, 1, {})

    runtime = ClientRuntime(Draws())  # type: ignore[arg-type]
    glob = {"w": np.zeros(8)}
    got = [runtime.handle(Task(Stage.TRAIN, 1, 0, seed, {}), glob).arrays for seed in (5, 6, 5)]
    assert all(g is not None for g in got)
    expected = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert got[0]["w"].tobytes() == expected.numpy().tobytes()  # type: ignore[index]
    assert got[2]["w"].tobytes() == got[0]["w"].tobytes()  # type: ignore[index]
    assert got[1]["w"].tobytes() != got[0]["w"].tobytes()  # type: ignore[index]
