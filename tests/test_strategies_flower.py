"""The built-in strategies against Flower 1.42, on identical inputs.

Every strategy is checked against Flower's legacy pure functions
(``flwr.server.strategy.aggregate``) or legacy strategy classes, and against the
Message-API strategies (``flwr.serverapp.strategy``) driven the way ``Strategy.start``
drives them: ``configure_train`` with the current arrays (through a stand-in grid), then
``aggregate_train`` on reply messages built with ``Message(content, reply_to=...)``.

fedlearn strategies are driven the way the coordinator drives them: ``start_fold``,
``add`` each update, ``result``, ``server_update`` with the threaded state.

Models mix float32 and float64 arrays (and a 0-d one), clients report different
``num_examples``, and the stateful server optimizers run several rounds, each reference
following its own trajectory from the same client updates.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

pytest.importorskip("flwr")

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import arrayrecord as flwr_arrayrecord
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import strategy as legacy
from flwr.server.strategy import aggregate as legacy_agg
from flwr.serverapp import strategy as msgapi
from flwr.supercore.task_identity import TaskIdentity

from fedlearn.engine.records import Arrays
from fedlearn.strategy import (
    Bulyan,
    ClientUpdate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    RoundContext,
    Strategy,
)

MODEL: dict[str, tuple[tuple[int, ...], type[np.floating[Any]]]] = {
    "conv.weight": ((3, 2, 2), np.float32),
    "conv.bias": ((3,), np.float64),
    "fc.weight": ((4, 3), np.float32),
    "fc.bias": ((4,), np.float64),
    "temperature": ((), np.float32),
}

Client = tuple[Arrays, int, dict[str, float]]


# ---------------------------------------------------------------- inputs


def make_global(rng: np.random.Generator) -> Arrays:
    return {k: rng.normal(size=shape).astype(dt) for k, (shape, dt) in MODEL.items()}


def make_clients(
    rng: np.random.Generator,
    base: Arrays,
    n: int,
    *,
    outliers: int = 0,
    spread: float = 0.5,
) -> list[Client]:
    """``n`` clients around ``base``; the last ``outliers`` of them far away."""
    sizes = rng.choice(np.arange(5, 500), size=n, replace=False)
    clients: list[Client] = []
    for i in range(n):
        scale = 25.0 if i >= n - outliers else spread
        arrays = {
            k: (v + scale * rng.normal(size=v.shape)).astype(v.dtype) for k, v in base.items()
        }
        loss = float(rng.uniform(0.05, 3.0))
        clients.append((arrays, int(sizes[i]), {"train_loss": loss}))
    # Shuffle so outliers are not always last.
    order = rng.permutation(n)
    return [clients[i] for i in order]


# ---------------------------------------------------------------- fedlearn driver


def fl_round(
    strategy: Strategy, rnd: int, global_arrays: Arrays, clients: Sequence[Client], state: Arrays
) -> tuple[Arrays, Arrays]:
    ctx = RoundContext(rnd, 10, np.random.default_rng(rnd))
    fold = strategy.start_fold(ctx, global_arrays)
    for cid, (arrays, n, metrics) in enumerate(clients):
        fold.add(ClientUpdate(cid, arrays, n, dict(metrics)))
    return strategy.server_update(ctx, global_arrays, fold.result(), state)


def fl_once(strategy: Strategy, global_arrays: Arrays, clients: Sequence[Client]) -> Arrays:
    state = strategy.init_state(global_arrays)
    return fl_round(strategy, 1, global_arrays, clients, state)[0]


# ---------------------------------------------------------------- Flower drivers


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's Message constructor reads the identity of the running task."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    yield


@pytest.fixture(autouse=True)
def no_forced_gc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's ``ArrayRecord.to_numpy_ndarrays(keep_input=False)`` (the Message-API QFedAvg
    and Bulyan call it once per reply) and ``from_numpy_ndarrays(keep_input=False)`` run a
    full ``gc.collect()`` to free their input early. That frees memory and changes no
    result, but it walks every object the test process holds: late in a full run (hundreds
    of thousands of objects) each call took about 0.5 s and these comparisons most of a
    minute. Here it is a no-op."""
    monkeypatch.setattr(flwr_arrayrecord, "gc", types.SimpleNamespace(collect=lambda *a: 0))
    yield


class StandInGrid:
    """The part of ``flwr.serverapp.Grid`` that ``configure_train`` uses."""

    def __init__(self, num_nodes: int) -> None:
        self.nodes = list(range(101, 101 + num_nodes))

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class StandInClientManager:
    """The part of ``flwr.server.ClientManager`` that legacy ``configure_fit`` uses."""

    def __init__(self, num_clients: int) -> None:
        self.num_clients = num_clients

    def num_available(self) -> int:
        return self.num_clients

    def sample(self, num_clients: int, min_num_clients: int | None = None) -> list[object]:
        return [object() for _ in range(num_clients)]


def record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def from_record(rec: ArrayRecord) -> Arrays:
    return {k: a.numpy() for k, a in rec.items()}


def replies_to(instructions: Sequence[Message], clients: Sequence[Client]) -> list[Message]:
    assert len(instructions) == len(clients)
    return [
        Message(
            RecordDict(
                {
                    "arrays": record(arrays),
                    "metrics": MetricRecord({"num-examples": n, **metrics}),
                }
            ),
            reply_to=ins,
        )
        for ins, (arrays, n, metrics) in zip(instructions, clients, strict=True)
    ]


def msg_round(strategy: Any, rnd: int, global_arrays: Arrays, clients: Sequence[Client]) -> Arrays:
    """One Message-API round: configure_train (sets the strategy's current arrays), replies,
    aggregate_train."""
    instructions = list(
        strategy.configure_train(
            rnd, record(global_arrays), ConfigRecord(), StandInGrid(len(clients))
        )
    )
    out, _ = strategy.aggregate_train(rnd, replies_to(instructions, clients))
    assert out is not None
    return from_record(out)


def msg_aggregate(strategy: Any, clients: Sequence[Client]) -> Arrays:
    """aggregate_train only (stateless strategies), replying to plain instructions."""
    instructions = [
        Message(RecordDict(), dst_node_id=101 + i, message_type=MessageType.TRAIN)
        for i in range(len(clients))
    ]
    out, _ = strategy.aggregate_train(1, replies_to(instructions, clients))
    assert out is not None
    return from_record(out)


def fit_results(clients: Sequence[Client]) -> list[tuple[Any, FitRes]]:
    return [
        (
            None,
            FitRes(Status(Code.OK, ""), ndarrays_to_parameters(list(arrays.values())), n, metrics),
        )
        for arrays, n, metrics in clients
    ]


def legacy_round(strategy: Any, rnd: int, clients: Sequence[Client]) -> Arrays:
    params, _ = strategy.aggregate_fit(rnd, fit_results(clients), [])
    assert params is not None
    return named(parameters_to_ndarrays(params))


def legacy_inputs(clients: Sequence[Client]) -> list[tuple[list[np.ndarray], int]]:
    return [([np.array(a) for a in arrays.values()], n) for arrays, n, _ in clients]


def named(ndarrays: Sequence[np.ndarray]) -> Arrays:
    assert len(ndarrays) == len(MODEL)
    return dict(zip(MODEL, (np.asarray(a) for a in ndarrays), strict=True))


def assert_matches(ours: Arrays, reference: Arrays, *, exact: bool = False) -> None:
    assert list(ours) == list(reference)
    for name, got in ours.items():
        want = reference[name]
        assert isinstance(got, np.ndarray), name
        assert got.shape == want.shape, name
        assert got.dtype == MODEL[name][1], f"{name}: dtype {got.dtype} not kept"
        if exact:
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            atol = 1e-6 if got.dtype == np.float32 else 1e-12
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol, err_msg=name)


SEEDS = [0, 1, 2]


# ---------------------------------------------------------------- FedAvg / FedProx


@pytest.mark.parametrize("seed", SEEDS)
def test_fedavg(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    clients = make_clients(rng, g, 6)
    ours = fl_once(FedAvg(), g, clients)
    # Legacy: same operations in the same order, so bit-for-bit equal.
    assert_matches(ours, named(legacy_agg.aggregate(legacy_inputs(clients))), exact=True)
    assert_matches(ours, msg_aggregate(msgapi.FedAvg(), clients))


@pytest.mark.parametrize("seed", SEEDS)
def test_fedprox(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    clients = make_clients(rng, g, 5)
    mu = 0.25
    ours = FedProx(proximal_mu=mu)
    assert_matches(
        fl_once(ours, g, clients), msg_aggregate(msgapi.FedProx(proximal_mu=mu), clients)
    )
    assert_matches(fl_once(ours, g, clients), named(legacy_agg.aggregate(legacy_inputs(clients))))

    # Config: legacy sends "proximal_mu" (our key), Message-API "proximal-mu".
    sent = ours.train_config(RoundContext(1, 1, np.random.default_rng(0)))
    old = legacy.FedProx(proximal_mu=mu).configure_fit(
        1, ndarrays_to_parameters(list(g.values())), StandInClientManager(3)
    )
    assert all(ins.config["proximal_mu"] == sent["proximal_mu"] for _, ins in old)
    new = msgapi.FedProx(proximal_mu=mu).configure_train(
        1, record(g), ConfigRecord(), StandInGrid(3)
    )
    assert all(m.content["config"]["proximal-mu"] == sent["proximal_mu"] for m in new)


# ---------------------------------------------------------------- server optimizers

ROUNDS = 4


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("lr", "momentum"), [(1.0, 0.0), (0.5, 0.0), (1.0, 0.9), (0.7, 0.5), (1.3, 0.2)]
)
def test_fedavgm(seed: int, lr: float, momentum: float) -> None:
    rng = np.random.default_rng(seed)
    g0 = make_global(rng)
    ours = FedAvgM(server_learning_rate=lr, server_momentum=momentum)
    msg = msgapi.FedAvgM(server_learning_rate=lr, server_momentum=momentum)
    old = legacy.FedAvgM(
        server_learning_rate=lr,
        server_momentum=momentum,
        initial_parameters=ndarrays_to_parameters(list(g0.values())),
    )
    g_ours, g_msg = g0, g0
    state = ours.init_state(g0)
    for rnd in range(1, ROUNDS + 1):
        clients = make_clients(rng, g_ours, 5)
        g_ours, state = fl_round(ours, rnd, g_ours, clients, state)
        g_msg = msg_round(msg, rnd, g_msg, clients)
        assert_matches(g_ours, g_msg)
        assert_matches(g_ours, legacy_round(old, rnd, clients))
    if momentum > 0:
        assert set(state) == {f"momentum/{k}" for k in MODEL}
    else:
        assert state == {}


def _fedopt_cases() -> list[Any]:
    adam = {"eta": 0.1, "eta_l": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    adam2 = {"eta": 0.03, "eta_l": 0.2, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}
    yogi = {"eta": 1e-2, "eta_l": 0.0316, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    yogi2 = {"eta": 0.2, "eta_l": 0.1, "beta_1": 0.3, "beta_2": 0.8, "tau": 0.05}
    adagrad = {"eta": 0.1, "eta_l": 0.1, "tau": 1e-3}
    adagrad2 = {"eta": 0.5, "eta_l": 0.01, "tau": 1e-6}
    return [
        pytest.param(FedAdam, msgapi.FedAdam, legacy.FedAdam, adam, id="adam-defaults"),
        pytest.param(FedAdam, msgapi.FedAdam, legacy.FedAdam, adam2, id="adam"),
        pytest.param(FedYogi, msgapi.FedYogi, legacy.FedYogi, yogi, id="yogi-defaults"),
        pytest.param(FedYogi, msgapi.FedYogi, legacy.FedYogi, yogi2, id="yogi"),
        pytest.param(FedAdagrad, msgapi.FedAdagrad, legacy.FedAdagrad, adagrad, id="adagrad-def"),
        pytest.param(FedAdagrad, msgapi.FedAdagrad, legacy.FedAdagrad, adagrad2, id="adagrad"),
    ]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("ours_cls", "msg_cls", "legacy_cls", "kwargs"), _fedopt_cases())
def test_fedopt_family(
    seed: int, ours_cls: type[Strategy], msg_cls: Any, legacy_cls: Any, kwargs: dict[str, float]
) -> None:
    rng = np.random.default_rng(seed)
    g0 = make_global(rng)
    ours = ours_cls(**kwargs)
    msg = msg_cls(**kwargs)
    old = legacy_cls(initial_parameters=ndarrays_to_parameters(list(g0.values())), **kwargs)
    g_ours, g_msg = g0, g0
    state = ours.init_state(g0)
    for rnd in range(1, ROUNDS + 1):
        clients = make_clients(rng, g_ours, 4)
        before = {k: v.copy() for k, v in state.items()}
        g_ours, new_state = fl_round(ours, rnd, g_ours, clients, state)
        for k, v in before.items():  # server_update must not touch the old state
            np.testing.assert_array_equal(state[k], v)
        state = new_state
        g_msg = msg_round(msg, rnd, g_msg, clients)
        assert_matches(g_ours, g_msg)
        assert_matches(g_ours, legacy_round(old, rnd, clients))
    # The moments threaded through our state are Flower's (up to float32 rounding).
    for k in MODEL:
        atol = 1e-6 if MODEL[k][1] is np.float32 else 1e-12
        np.testing.assert_allclose(state[f"v/{k}"], msg.v_t[k], rtol=1e-6, atol=atol)
        if ours_cls is not FedAdagrad:
            np.testing.assert_allclose(state[f"m/{k}"], msg.m_t[k], rtol=1e-6, atol=atol)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    if ours_cls is FedAdam:
        assert int(state["step"]) == ROUNDS


# ---------------------------------------------------------------- q-FedAvg


def qffl_reference(
    global_arrays: Arrays, clients: Sequence[Client], q: float, lr: float
) -> tuple[list[list[np.ndarray]], list[float]]:
    """Per-client delta_k and h_k of the q-FFL paper, in float64."""
    lip = 1.0 / lr
    deltas, hs = [], []
    for arrays, _, metrics in clients:
        loss = metrics["train_loss"] + 1e-10
        grads = [lip * (global_arrays[k].astype(np.float64) - arrays[k]) for k in MODEL]
        sq = sum(float(np.sum(g**2)) for g in grads)
        deltas.append([loss**q * g for g in grads])
        hs.append(q * loss ** (q - 1) * sq + lip * loss**q)
    return deltas, hs


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 2.0])
def test_qfedavg(seed: int, q: float) -> None:
    rng = np.random.default_rng(seed)
    lr = 0.05
    g0 = make_global(rng)
    ours = QFedAvg(client_learning_rate=lr, q=q)
    msg = msgapi.QFedAvg(client_learning_rate=lr, q=q)
    g_ours, g_msg = g0, g0
    state = ours.init_state(g0)
    for rnd in range(1, 4):
        clients = make_clients(rng, g_ours, 5, spread=0.05)
        prev = g_ours
        g_ours, state = fl_round(ours, rnd, g_ours, clients, state)
        # Message-API: each client's own train loss.
        g_msg = msg_round(msg, rnd, g_msg, clients)
        assert_matches(g_ours, g_msg)
        # Legacy pure function on the paper's deltas and h's.
        deltas, hs = qffl_reference(prev, clients, q, lr)
        pre = [prev[k].astype(np.float64) for k in MODEL]
        assert_matches(g_ours, named(legacy_agg.aggregate_qffl(pre, deltas, hs)))


@pytest.mark.parametrize("seed", SEEDS)
def test_qfedavg_legacy_class_with_a_shared_loss(seed: int) -> None:
    """Legacy QFedAvg weighs every client by one server-side loss: the same-loss case."""
    rng = np.random.default_rng(seed)
    lr, q, loss = 0.1, 0.2, 0.8
    g = make_global(rng)
    clients = [(a, n, {"train_loss": loss}) for a, n, _ in make_clients(rng, g, 4, spread=0.1)]
    old = legacy.QFedAvg(
        q_param=q, qffl_learning_rate=lr, evaluate_fn=lambda rnd, params, cfg: (loss, {})
    )
    old.configure_fit(1, ndarrays_to_parameters(list(g.values())), StandInClientManager(4))
    ours = fl_once(QFedAvg(client_learning_rate=lr, q=q), g, clients)
    assert_matches(ours, legacy_round(old, 1, clients))


# ---------------------------------------------------------------- robust rules


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), [(5, 0), (8, 2), (11, 3)])
def test_krum(seed: int, n: int, f: int) -> None:
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    clients = make_clients(rng, g, n, outliers=f)
    ours = fl_once(Krum(num_malicious=f), g, clients)
    assert_matches(ours, named(legacy_agg.aggregate_krum(legacy_inputs(clients), f, 0)), exact=True)
    assert_matches(ours, msg_aggregate(msgapi.Krum(num_malicious_nodes=f), clients), exact=True)
    # The pick is one of the honest clients.
    honest = [a for a, _, _ in clients if max(np.abs(a["fc.bias"] - g["fc.bias"])) < 5]
    assert any(all(np.array_equal(ours[k], a[k]) for k in MODEL) for a in honest)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f", "keep"), [(5, 0, 1), (5, 1, 3), (8, 2, 4), (9, 2, 9)])
def test_multikrum(seed: int, n: int, f: int, keep: int) -> None:
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    clients = make_clients(rng, g, n, outliers=f)
    ours = fl_once(MultiKrum(num_malicious=f, num_to_keep=keep), g, clients)
    assert_matches(ours, named(legacy_agg.aggregate_krum(legacy_inputs(clients), f, keep)))
    msg = msgapi.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=keep)
    assert_matches(ours, msg_aggregate(msg, clients))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("n", "f"), [(3, 0), (7, 1), (9, 1), (11, 2), (16, 3)])
def test_bulyan(seed: int, n: int, f: int) -> None:
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    clients = make_clients(rng, g, n, outliers=f, spread=1.0)
    # Message-API: one MultiKrum selection of n - 2f updates (our default).
    ours = fl_once(Bulyan(num_malicious=f), g, clients)
    assert_matches(ours, msg_aggregate(msgapi.Bulyan(num_malicious_nodes=f), clients))
    # Legacy: Krum applied n - 2f times (the paper's rule); it mutates its input list.
    ours_iter = fl_once(Bulyan(num_malicious=f, selection="krum"), g, clients)
    inputs = legacy_inputs(clients)
    ref = legacy_agg.aggregate_bulyan(list(inputs), f, legacy_agg.aggregate_krum, to_keep=0)
    assert_matches(ours_iter, named(ref))


def test_the_two_flower_bulyans_differ() -> None:
    """Why Bulyan has ``selection``: Flower's legacy and Message-API rules disagree."""
    rng = np.random.default_rng(0)
    g = make_global(rng)
    clients = make_clients(rng, g, 11, outliers=2, spread=1.0)
    msg = msg_aggregate(msgapi.Bulyan(num_malicious_nodes=2), clients)
    old = named(
        legacy_agg.aggregate_bulyan(legacy_inputs(clients), 2, legacy_agg.aggregate_krum, to_keep=0)
    )
    assert any(not np.allclose(msg[k], old[k]) for k in MODEL)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_fedmedian(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    clients = make_clients(rng, g, n, outliers=n // 3)
    ours = fl_once(FedMedian(), g, clients)
    assert_matches(ours, named(legacy_agg.aggregate_median(legacy_inputs(clients))), exact=True)
    assert_matches(ours, msg_aggregate(msgapi.FedMedian(), clients), exact=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [3, 7, 10])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.49])
def test_fedtrimmedavg(seed: int, n: int, beta: float) -> None:
    rng = np.random.default_rng(seed)
    g = make_global(rng)
    clients = make_clients(rng, g, n, outliers=n // 4)
    ours = fl_once(FedTrimmedAvg(beta=beta), g, clients)
    ref = legacy_agg.aggregate_trimmed_avg(legacy_inputs(clients), beta)
    assert_matches(ours, named(ref), exact=True)
    assert_matches(ours, msg_aggregate(msgapi.FedTrimmedAvg(beta=beta), clients), exact=True)


# ---------------------------------------------------------------- property checks


@st.composite
def random_rounds(draw: st.DrawFn) -> tuple[list[Client], float]:
    """Any number of clients, any array shapes (0-d included), float32/float64 mixes."""
    n = draw(st.integers(1, 9))
    layout = draw(
        st.lists(
            st.tuples(
                hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
                st.sampled_from([np.float32, np.float64]),
            ),
            min_size=1,
            max_size=4,
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    clients: list[Client] = []
    for _ in range(n):
        arrays = {
            f"p{i}": (scale * rng.normal(size=shape)).astype(dt)
            for i, (shape, dt) in enumerate(layout)
        }
        clients.append((arrays, int(rng.integers(1, 1000)), {}))
    return clients, draw(st.floats(0.0, 0.49))


@settings(max_examples=60, deadline=None)
@given(random_rounds())
def test_property_stateless_rules_equal_legacy_flower(case: tuple[list[Client], float]) -> None:
    clients, beta = case
    names = list(clients[0][0])
    g = {k: np.zeros_like(v) for k, v in clients[0][0].items()}
    inputs = [([np.array(a[k]) for k in names], n) for a, n, _ in clients]

    def check(ours: Arrays, ref: Sequence[np.ndarray]) -> None:
        for name, want in zip(names, ref, strict=True):
            assert ours[name].dtype == g[name].dtype
            np.testing.assert_array_equal(ours[name], want, err_msg=name)

    check(fl_once(FedAvg(), g, clients), legacy_agg.aggregate(inputs))
    check(fl_once(FedMedian(), g, clients), legacy_agg.aggregate_median(inputs))
    check(
        fl_once(FedTrimmedAvg(beta=beta), g, clients),
        legacy_agg.aggregate_trimmed_avg(inputs, beta),
    )
