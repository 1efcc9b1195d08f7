"""Flower NumPyClients run unchanged as fedlearn ClientApps (fedlearn.apps.flower)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

from flwr.client import NumPyClient  # noqa: E402
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.strategy.aggregate import aggregate  # noqa: E402

from clients.flower_numpy import LogisticRegressionClient, make_app  # noqa: E402
from deployment import Deployment, simulated_data  # noqa: E402
from fedlearn.apps.flower import FlowerClientApp  # noqa: E402
from fedlearn.data import load_dataset, partition_dataset  # noqa: E402
from fedlearn.engine.client_app import ClientApp, ClientContext, ProvidesInitialArrays  # noqa: E402
from fedlearn.engine.messages import Stage  # noqa: E402
from fedlearn.engine.store import RunStore  # noqa: E402
from fedlearn.engine.weights import load_weights  # noqa: E402
from fedlearn.simulation import run_simulation  # noqa: E402
from fedlearn.strategy import FedAvg, build_strategy  # noqa: E402

FLOWER_APP = "clients.flower_numpy:make_app"
LOCAL_EPOCHS, LR = 5, 0.5
FLOWER_PARAMS: dict[str, object] = {"local_epochs": LOCAL_EPOCHS, "lr": LR}


class KnownClient(NumPyClient):
    """Returns known values and remembers what it was called with."""

    def __init__(self, cid: int = 0) -> None:
        self.cid = cid
        self.calls: list[tuple[str, list[np.ndarray], dict[str, Any]]] = []

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [np.arange(3.0), np.ones((2, 2), np.float32)]

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        self.calls.append(("fit", parameters, config))
        parameters[0] += 1.0  # a Flower client may write to what it receives
        return [p * 2 for p in parameters], 7 + self.cid, {"round": config["server_round"]}

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, int, dict[str, Any]]:
        self.calls.append(("evaluate", parameters, config))
        return 0.25, 11, {"accuracy": np.float32(0.5), "ok": True}


def _arrays() -> dict[str, np.ndarray]:
    arrays = {"w": np.arange(3.0), "b": np.ones((2, 2), np.float32)}
    for a in arrays.values():
        a.flags.writeable = False  # transports hand out read-only views
    return arrays


def _ctx(cid: int = 0, rnd: int = 3) -> ClientContext:
    return ClientContext(client_id=cid, round=rnd, seed=123)


# --- unit: the mapping -------------------------------------------------------------------


def test_adapter_is_a_client_app() -> None:
    app = FlowerClientApp(KnownClient())
    assert isinstance(app, ClientApp)
    assert isinstance(app, ProvidesInitialArrays)


def test_fit_maps_arrays_config_and_result() -> None:
    client = KnownClient()
    app = FlowerClientApp(client)
    arrays = _arrays()
    result = app.train(arrays, {"lr": 0.1, "proximal_mu": 0.0}, _ctx(rnd=3))
    (stage, parameters, config), *_ = client.calls
    assert stage == "fit"
    assert config == {"server_round": 3, "lr": 0.1, "proximal_mu": 0.0}
    assert [p.dtype for p in parameters] == [np.float64, np.float32]
    np.testing.assert_array_equal(arrays["w"], np.arange(3.0))  # the client wrote to a copy
    assert list(result.arrays) == ["w", "b"]
    np.testing.assert_array_equal(result.arrays["w"], (np.arange(3.0) + 1) * 2)
    np.testing.assert_array_equal(result.arrays["b"], np.full((2, 2), 2, np.float32))
    assert result.arrays["b"].dtype == np.float32
    assert result.num_examples == 7
    assert result.metrics == {"round": 3}


def test_evaluate_maps_result() -> None:
    client = KnownClient()
    app = FlowerClientApp(client)
    result = app.evaluate(_arrays(), {"batch": 4}, _ctx(rnd=2))
    assert client.calls[0][0] == "evaluate"
    assert client.calls[0][2] == {"server_round": 2, "batch": 4}
    assert (result.num_examples, result.loss) == (11, 0.25)
    assert result.metrics == {"accuracy": 0.5, "ok": True}
    assert type(result.metrics["accuracy"]) is float


def test_strategy_config_keeps_its_own_server_round_and_round_key_can_be_off() -> None:
    client = KnownClient()
    FlowerClientApp(client).train(_arrays(), {"server_round": 99}, _ctx(rnd=3))
    FlowerClientApp(client, round_key=None).evaluate(_arrays(), {}, _ctx(rnd=3))
    assert client.calls[0][2] == {"server_round": 99}
    assert client.calls[1][2] == {}


def test_initial_arrays_default_and_given_names() -> None:
    arrays = FlowerClientApp(KnownClient()).initial_arrays(seed=0)
    assert list(arrays) == ["p0", "p1"]
    np.testing.assert_array_equal(arrays["p0"], np.arange(3.0))
    named = FlowerClientApp(KnownClient(), names=["w", "b"]).initial_arrays(seed=0)
    assert list(named) == ["w", "b"]
    with pytest.raises(ValueError, match=r"returned 2 arrays for the names \('w',\)"):
        FlowerClientApp(KnownClient(), names=["w"]).initial_arrays(seed=0)


def test_given_names_must_match_the_global_model() -> None:
    app = FlowerClientApp(KnownClient(), names=["weight", "bias"])
    with pytest.raises(ValueError, match="not the names this FlowerClientApp was given"):
        app.train(_arrays(), {}, _ctx())


def test_client_fn_builds_one_client_per_client_id() -> None:
    built: list[int] = []

    def client_fn(cid: int) -> KnownClient:
        built.append(cid)
        return KnownClient(cid)

    app = FlowerClientApp(client_fn)
    assert built == []
    for cid in (2, 0, 2, 1, 0):
        result = app.train(_arrays(), {}, _ctx(cid))
        assert result.num_examples == 7 + cid
    app.evaluate(_arrays(), {}, _ctx(1))
    assert built == [2, 0, 1]
    assert app.client(2) is app.client(2)


def test_not_a_client_is_refused() -> None:
    with pytest.raises(TypeError, match="needs a Flower NumPyClient"):
        FlowerClientApp(42)  # type: ignore[arg-type]
    app = FlowerClientApp(lambda cid: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=r"client_fn\(4\) returned object"):
        app.train(_arrays(), {}, _ctx(4))


class BadClient(KnownClient):
    def __init__(self, fit_result: object = None, evaluate_result: object = None) -> None:
        super().__init__()
        self.fit_result = fit_result
        self.evaluate_result = evaluate_result

    def fit(self, parameters: Any, config: Any) -> Any:
        return self.fit_result

    def evaluate(self, parameters: Any, config: Any) -> Any:
        return self.evaluate_result


GOOD = [np.arange(3.0), np.ones((2, 2), np.float32)]


@pytest.mark.parametrize(
    ("fit_result", "error", "message"),
    [
        (None, TypeError, r"must return \(parameters, num_examples, metrics\).*got NoneType"),
        ((GOOD, 3), TypeError, "got a tuple of 2 values"),
        ((np.stack([np.zeros(2)] * 2), 3, {}), TypeError, "parameters of type ndarray"),
        (([np.zeros(3), [1.0]], 3, {}), TypeError, r"parameters\[1\] of type list"),
        (([np.zeros(3), np.array([1j])], 3, {}), TypeError, r"parameters\[1\] with dtype"),
        (([np.zeros(3), np.array([None])], 3, {}), TypeError, "dtype object"),
        ((GOOD, 3.0, {}), TypeError, "num_examples of type float"),
        ((GOOD, True, {}), TypeError, "num_examples of type bool"),
        ((GOOD, 3, [("a", 1)]), TypeError, "metrics of type list"),
        ((GOOD, 3, {"blob": b"x"}), TypeError, r"metrics\['blob'\] of type bytes"),
        ((GOOD, 3, {1: 0.5}), TypeError, "metrics key 1"),
        ((GOOD[:1], 3, {}), ValueError, r"returned 1 arrays, but the global model has 2 \(w, b\)"),
    ],
)
def test_bad_fit_returns_raise_clear_errors(
    fit_result: object, error: type[Exception], message: str
) -> None:
    app = FlowerClientApp(BadClient(fit_result=fit_result))
    with pytest.raises(error, match=message) as info:
        app.train(_arrays(), {}, _ctx())
    assert "BadClient.fit()" in str(info.value)


@pytest.mark.parametrize(
    ("evaluate_result", "message"),
    [
        ((0.5, 10), "must return \\(loss, num_examples, metrics\\)"),
        (("0.5", 10, {}), "loss of type str"),
        ((None, 10, {}), "loss of type NoneType"),
        ((0.5, np.float64(10.0), {}), "num_examples of type float64"),
        ((0.5, 10, None), "metrics of type NoneType"),
    ],
)
def test_bad_evaluate_returns_raise_type_errors(evaluate_result: object, message: str) -> None:
    app = FlowerClientApp(BadClient(evaluate_result=evaluate_result))
    with pytest.raises(TypeError, match=message) as info:
        app.evaluate(_arrays(), {}, _ctx())
    assert "BadClient.evaluate()" in str(info.value)


def test_lenient_where_flower_is_strict_about_python_types() -> None:
    good = BadClient(
        fit_result=(tuple(GOOD), np.int64(5), {}), evaluate_result=[np.float32(0.5), 3, {}]
    )
    app = FlowerClientApp(good)
    assert app.train(_arrays(), {}, _ctx()).num_examples == 5
    result = app.evaluate(_arrays(), {}, _ctx())
    assert (result.loss, type(result.loss)) == (0.5, float)


def test_a_bad_client_is_recorded_as_that_clients_failure() -> None:
    def client_fn(cid: int) -> NumPyClient:
        if cid == 1:
            return BadClient(fit_result=(GOOD, 3, {"blob": b"x"}), evaluate_result=(0.1, 4, {}))
        return KnownClient(cid)

    result = run_simulation(
        lambda: FlowerClientApp(client_fn, names=["w", "b"]),
        FedAvg(),
        num_clients=3,
        rounds=1,
    )
    failed = [c for c in result.clients if not c.ok]
    assert [(c.client_id, c.stage) for c in failed] == [(1, Stage.TRAIN)]
    assert "TypeError" in str(failed[0].error)
    assert "BadClient.fit() returned metrics['blob'] of type bytes" in str(failed[0].error)
    assert result.rounds[0].ok and result.rounds[0].train_ok == 2


# --- the example client: a real Flower client, and the same maths in fedlearn -------------


@functools.cache
def _data(num_clients: int) -> Any:
    return partition_dataset(load_dataset("breast_cancer"), "iid", num_clients, seed=0)


def _example_client(cid: int, num_clients: int) -> LogisticRegressionClient:
    split = _data(num_clients).client(cid)
    return LogisticRegressionClient(
        split.x_train, split.y_train, split.x_test, split.y_test, LOCAL_EPOCHS, LR
    )


def test_example_client_passes_flowers_own_checks_and_matches_the_adapter() -> None:
    params = [np.linspace(-0.1, 0.1, 30), np.array([0.05])]
    fit_res = (
        _example_client(0, 5)
        .to_client()
        .fit(FitIns(ndarrays_to_parameters(params), {"server_round": 1}))
    )
    via_flower = parameters_to_ndarrays(fit_res.parameters)
    app = make_app(_data(5), local_epochs=LOCAL_EPOCHS, lr=LR)
    via_fedlearn = app.train({"w": params[0], "b": params[1]}, {}, _ctx(0, rnd=1))
    assert fit_res.num_examples == via_fedlearn.num_examples
    assert fit_res.metrics == via_fedlearn.metrics
    for a, b in zip(via_flower, via_fedlearn.arrays.values(), strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("backend", ["inprocess", "pool"])
def test_simulation_equals_a_hand_written_fedavg_loop(backend: str) -> None:
    num_clients, rounds = 5, 3
    result = run_simulation(
        functools.partial(make_app, _data(num_clients), local_epochs=LOCAL_EPOCHS, lr=LR),
        FedAvg(),
        num_clients=num_clients,
        rounds=rounds,
        backend=backend,  # type: ignore[arg-type]
        workers=2,
    )

    # The same clients driven by Flower-style FedAvg: fit everyone, flwr's aggregate().
    clients = [_example_client(cid, num_clients) for cid in range(num_clients)]
    weights = clients[0].get_parameters({})
    for rnd in range(1, rounds + 1):
        fits = [c.fit([w.copy() for w in weights], {"server_round": rnd}) for c in clients]
        weights = aggregate([(params, n) for params, n, _ in fits])
    evals = [c.evaluate([w.copy() for w in weights], {}) for c in clients]

    assert list(result.arrays) == ["w", "b"]
    for name, expected in zip(["w", "b"], weights, strict=True):
        assert result.arrays[name].tobytes() == expected.tobytes(), name
    total = sum(n for _, n, _ in evals)
    last = result.rounds[-1]
    assert [r.ok for r in result.rounds] == [True] * rounds
    assert last.eval_metrics["loss"] == pytest.approx(sum(n * loss for loss, n, _ in evals) / total)
    assert last.eval_metrics["accuracy"] == pytest.approx(
        sum(n * float(m["accuracy"]) for _, n, m in evals) / total
    )
    assert float(last.eval_metrics["accuracy"]) > 0.9


# --- deployment: real TLS coordinator and site processes run the Flower client ------------


@pytest.fixture
def flower_deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path, num_sites=2, rounds=3, app=FLOWER_APP, params=dict(FLOWER_PARAMS))
    yield d
    d.stop_all()


def test_flower_client_as_tls_sites_matches_in_process_simulation(
    flower_deployment: Deployment,
) -> None:
    d = flower_deployment
    assert list(d.initial) == ["w", "b"]
    coordinator = d.start_coordinator()
    sites = [d.start_site(i) for i in range(d.num_sites)]
    code, out = d.wait(coordinator)
    assert code == 0, out
    for site in sites:
        site_code, site_out = d.wait(site)
        assert site_code == 0, site_out

    final = load_weights(d.state_dir / "model.safetensors")
    simulated = run_simulation(
        functools.partial(
            make_app, simulated_data(d.num_sites, d.seed), local_epochs=LOCAL_EPOCHS, lr=LR
        ),
        build_strategy("fedavg", {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )
    assert list(final) == list(simulated.arrays) == ["w", "b"]
    assert not np.array_equal(final["w"], d.initial["w"])  # it did train
    for name in final:
        assert final[name].tobytes() == simulated.arrays[name].tobytes(), name

    store = RunStore(d.state_dir / "run.db", run_id="run")
    rounds = store.rounds()
    evals = store.clients(Stage.EVALUATE)
    store.close()
    assert [r.ok for r in rounds] == [True] * d.rounds
    assert sorted({c.client_id for c in evals}) == list(range(d.num_sites))
    assert all(c.ok for c in evals)
