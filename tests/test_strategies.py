"""Built-in strategies on tiny hand-computed cases, their settings checks and their folds."""

from __future__ import annotations

import dataclasses
import gc
import math
import tracemalloc
import weakref
from collections.abc import Sequence

import numpy as np
import pytest

from fedlearn.engine.records import Arrays, Metrics
from fedlearn.errors import ConfigError, RoundFailed, UpdateRejected
from fedlearn.strategy import (
    STRATEGIES,
    Bulyan,
    ClientUpdate,
    CollectFold,
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
    QFedAvgFold,
    RoundContext,
    Strategy,
    WeightedMeanFold,
    build_strategy,
)
from fedlearn.strategy.robust import pairwise_sq_distances

Client = tuple[list[float] | np.ndarray, int] | tuple[list[float] | np.ndarray, int, Metrics]


def ctx(rnd: int = 1) -> RoundContext:
    return RoundContext(rnd, 10, np.random.default_rng(0))


def arr(*values: float) -> Arrays:
    return {"w": np.array(values, dtype=np.float64)}


def updates(clients: Sequence[Client]) -> list[ClientUpdate]:
    out = []
    for cid, client in enumerate(clients):
        values, n = client[0], client[1]
        metrics = client[2] if len(client) == 3 else {}
        a = values if isinstance(values, np.ndarray) else np.array(values, dtype=np.float64)
        out.append(ClientUpdate(cid, {"w": a}, n, dict(metrics)))
    return out


def one_round(
    s: Strategy, global_arrays: Arrays, clients: Sequence[Client], state: Arrays | None = None
) -> tuple[Arrays, Arrays]:
    state = s.init_state(global_arrays) if state is None else state
    fold = s.start_fold(ctx(), global_arrays)
    for u in updates(clients):
        fold.add(u)
    return s.server_update(ctx(), global_arrays, fold.result(), state)


def agg(s: Strategy, clients: Sequence[Client], global_arrays: Arrays | None = None) -> np.ndarray:
    g = arr(0.0, 0.0) if global_arrays is None else global_arrays
    return one_round(s, g, clients)[0]["w"]


# ---------------------------------------------------------------- FedAvg / FedProx


def test_fedavg_weighted_mean() -> None:
    np.testing.assert_array_equal(agg(FedAvg(), [([1, 2], 1), ([3, 4], 3)]), [2.5, 3.5])


def test_fedavg_keeps_integer_dtype_by_rounding() -> None:
    clients = [(np.array([1, 2], np.int64), 1), (np.array([2, 4], np.int64), 1)]
    out = agg(FedAvg(), clients, {"w": np.zeros(2, np.int64)})
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [2, 3])  # [1.5, 3.0] rounded half to even


def test_fedavg_zero_dim_array_stays_an_array() -> None:
    fold = WeightedMeanFold()
    fold.add(ClientUpdate(0, {"t": np.array(2.0, np.float32)}, 1))
    out = fold.result()["t"]
    assert isinstance(out, np.ndarray) and out.shape == () and out.dtype == np.float32


def test_fedprox_sends_mu_and_averages_like_fedavg() -> None:
    s = FedProx(proximal_mu=0.3)
    assert s.train_config(ctx()) == {"proximal_mu": 0.3}
    np.testing.assert_array_equal(agg(s, [([1, 2], 1), ([3, 4], 3)]), [2.5, 3.5])
    assert FedProx().proximal_mu == 0.0


# ---------------------------------------------------------------- server optimizers


def test_fedavgm_defaults_take_the_mean() -> None:
    np.testing.assert_array_equal(agg(FedAvgM(), [([1, 2], 1), ([3, 4], 3)]), [2.5, 3.5])
    assert FedAvgM().init_state(arr(1, 2)) == {}


def test_fedavgm_momentum_over_two_rounds() -> None:
    s = FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
    g = arr(1.0, 2.0)
    state = s.init_state(g)
    np.testing.assert_array_equal(state["momentum/w"], [0.0, 0.0])
    # Round 1: pseudo-gradient [1, 2] = momentum; x = [1, 2] - 0.5 [1, 2].
    g, state = one_round(s, g, [([0, 0], 3), ([0, 0], 1)], state)
    np.testing.assert_allclose(g["w"], [0.5, 1.0])
    np.testing.assert_allclose(state["momentum/w"], [1.0, 2.0])
    # Round 2: pseudo-gradient [0.5, 1]; momentum 0.9 [1, 2] + [0.5, 1] = [1.4, 2.8].
    g, state = one_round(s, g, [([0, 0], 2)], state)
    np.testing.assert_allclose(state["momentum/w"], [1.4, 2.8])
    np.testing.assert_allclose(g["w"], [-0.2, -0.4])


def test_fedavgm_learning_rate_without_momentum() -> None:
    s = FedAvgM(server_learning_rate=2.0)
    g, state = one_round(s, arr(1.0, 1.0), [([0, 3], 1)])
    np.testing.assert_allclose(g["w"], [-1.0, 5.0])  # x - 2 (x - a)
    assert state == {}


def test_fedadam_first_and_second_round() -> None:
    s = FedAdam()  # eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-3
    g, state = one_round(s, arr(0.0, 0.0), [([1, -1], 1)])
    # d = [1, -1]; m = 0.1 d; v = 0.01; eta_1 = 0.1 sqrt(1 - 0.99^2) / (1 - 0.9^2).
    eta_1 = 0.1 * math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    step = eta_1 * 0.1 / (0.1 + 1e-3)
    np.testing.assert_allclose(g["w"], [step, -step], rtol=1e-12)
    np.testing.assert_allclose(state["m/w"], [0.1, -0.1])
    np.testing.assert_allclose(state["v/w"], [0.01, 0.01])
    assert int(state["step"]) == 1 and state["step"].shape == ()
    # Round 2 from x1 = [step, -step] with the same mean: d = 1 - step.
    g2, state = one_round(s, g, [([1, -1], 1)], state)
    d = 1 - step
    m = 0.9 * 0.1 + 0.1 * d
    v = 0.99 * 0.01 + 0.01 * d * d
    eta_2 = 0.1 * math.sqrt(1 - 0.99**3) / (1 - 0.9**3)
    np.testing.assert_allclose(g2["w"][0], step + eta_2 * m / (math.sqrt(v) + 1e-3), rtol=1e-12)
    assert int(state["step"]) == 2


def test_fedyogi_first_round() -> None:
    g, state = one_round(FedYogi(), arr(0.0, 0.0), [([1, -1], 1)])
    # v = 0 - 0.01 * 1 * sign(0 - 1) = 0.01; x = 0.01 * 0.1 / (0.1 + 1e-3).
    expected = 0.01 * 0.1 / (0.1 + 1e-3)
    np.testing.assert_allclose(g["w"], [expected, -expected], rtol=1e-12)
    np.testing.assert_allclose(state["v/w"], [0.01, 0.01])
    assert "step" not in state


def test_fedadagrad_two_rounds() -> None:
    s = FedAdagrad()  # eta 0.1, tau 1e-3
    g, state = one_round(s, arr(0.0), [([1.0], 1)])
    x1 = 0.1 * 1 / (1 + 1e-3)
    np.testing.assert_allclose(g["w"], [x1], rtol=1e-12)
    assert set(state) == {"v/w"}  # no first moment: m = d
    g, state = one_round(s, g, [([1.0], 1)], state)
    d = 1 - x1
    v = 1 + d * d
    np.testing.assert_allclose(state["v/w"], [v], rtol=1e-12)
    np.testing.assert_allclose(g["w"], [x1 + 0.1 * d / (math.sqrt(v) + 1e-3)], rtol=1e-12)


def test_server_optimizers_leave_integer_arrays_to_the_mean() -> None:
    g = {"w": np.zeros(2, np.float32), "count": np.array([5], np.int64)}
    s = FedAdam()
    state = s.init_state(g)
    assert set(state) == {"m/w", "v/w", "step"}
    fold = s.start_fold(ctx(), g)
    fold.add(ClientUpdate(0, {"w": np.ones(2, np.float32), "count": np.array([7])}, 1))
    fold.add(ClientUpdate(1, {"w": np.ones(2, np.float32), "count": np.array([9])}, 1))
    new, state = s.server_update(ctx(), g, fold.result(), state)
    assert new["w"].dtype == np.float32 and state["m/w"].dtype == np.float32
    np.testing.assert_array_equal(new["count"], [8])
    assert new["count"].dtype == np.int64


def test_server_update_does_not_mutate_its_inputs() -> None:
    s = FedAdam()
    g = arr(0.5, 0.5)
    state = s.init_state(g)
    _, state = one_round(s, g, [([1, 2], 1)], state)
    frozen = {k: v.copy() for k, v in state.items()}
    g_copy = {k: v.copy() for k, v in g.items()}
    one_round(s, g, [([3, 4], 1)], state)
    for k, v in frozen.items():
        np.testing.assert_array_equal(state[k], v)
    np.testing.assert_array_equal(g["w"], g_copy["w"])


# ---------------------------------------------------------------- q-FedAvg


def test_qfedavg_with_q_zero_is_the_unweighted_mean() -> None:
    s = QFedAvg(client_learning_rate=0.1, q=0.0)
    clients: list[Client] = [
        ([1, 2], 1, {"train_loss": 0.5}),
        ([3, 6], 100, {"train_loss": 2.0}),
    ]
    np.testing.assert_allclose(agg(s, clients, arr(10.0, -10.0)), [2.0, 4.0], rtol=1e-12)


def test_qfedavg_favours_the_high_loss_client() -> None:
    # q = 1, L = 1, w = 0. Client A (loss ~0) at [2, 0]: delta ~0, h = 4.
    # Client B (loss 1) at [0, 2]: delta = [0, -2], h = 4 + 1. w' = -(sum delta) / 9.
    s = QFedAvg(client_learning_rate=1.0, q=1.0)
    clients: list[Client] = [([2, 0], 1, {"train_loss": 0.0}), ([0, 2], 1, {"train_loss": 1})]
    np.testing.assert_allclose(agg(s, clients), [0.0, 2 / 9], atol=1e-9)


def test_qfedavg_missing_or_bad_loss_is_rejected_without_touching_the_fold() -> None:
    s = QFedAvg(client_learning_rate=0.1, q=0.5)
    g = arr(0.0, 0.0)
    good = updates([([1, 1], 2, {"train_loss": 0.7})])[0]
    fold = s.start_fold(ctx(4), g)
    for metrics in ({"accuracy": 0.9}, {"train_loss": "high"}, {"train_loss": -1.0}):
        with pytest.raises(UpdateRejected, match="train_loss") as info:
            fold.add(ClientUpdate(7, {"w": np.array([5.0, 5.0])}, 1, metrics))
        assert info.value.client_id == 7 and info.value.round == 4
    fold.add(good)
    clean = s.start_fold(ctx(4), g)
    clean.add(good)
    np.testing.assert_array_equal(fold.result()["w"], clean.result()["w"])


def test_qfedavg_loss_key_is_configurable() -> None:
    s = QFedAvg(client_learning_rate=0.1, q=0.0, train_loss_key="loss")
    np.testing.assert_allclose(agg(s, [([1, 3], 1, {"loss": 1.0})]), [1.0, 3.0])
    with pytest.raises(UpdateRejected, match="'loss'"):
        agg(s, [([1, 3], 1, {"train_loss": 1.0})])


# ---------------------------------------------------------------- robust rules

KRUM_CLIENTS: list[Client] = [([0, 0], 1), ([1, 0], 3), ([0, 2], 1), ([10, 10], 1)]
# Squared distances: d01 = 1, d02 = 4, d12 = 5, the outlier is >= 164 from all.
# Scores with n - f - 2 = 2 neighbours: 5, 6, 9, 345.


def test_krum_picks_the_most_central_update() -> None:
    g = arr(0.0, 0.0)
    fold = Krum().start_fold(ctx(), g)
    ups = updates(KRUM_CLIENTS)
    for u in ups:
        fold.add(u)
    out = fold.result()["w"]
    np.testing.assert_array_equal(out, [0, 0])
    assert out is not ups[0].arrays["w"]  # a copy, not the client's buffer


def test_multikrum_averages_the_best_weighted_by_examples() -> None:
    out = agg(MultiKrum(num_to_keep=2), KRUM_CLIENTS)
    np.testing.assert_allclose(out, [0.75, 0.0])  # (0 * 1 + 1 * 3) / 4


def test_bulyan_drops_outliers_then_averages_around_the_median() -> None:
    # x in {0, 1, 2, 3, 4, 6, 100}, client = [x, 2x]; f = 1: theta = 5, beta = 3.
    # Krum scores (4 neighbours, in units of 5): 30, 15, 10, 15, 18, 54, huge ->
    # keep {0, 1, 2, 3, 4}; median [2, 4]; 3 closest per coordinate -> [2, 4].
    clients: list[Client] = [([x, 2 * x], 1) for x in (6, 0, 100, 3, 1, 4, 2)]
    np.testing.assert_allclose(agg(Bulyan(num_malicious=1), clients), [2.0, 4.0])


def test_fedmedian() -> None:
    np.testing.assert_array_equal(
        agg(FedMedian(), [([1, 2], 1), ([3, 4], 5), ([10, 0], 1)]), [3, 2]
    )


def test_fedmedian_keeps_integer_dtype() -> None:
    clients: list[Client] = [(np.array([v], np.int32), 1) for v in (1, 2, 4, 5)]
    out = agg(FedMedian(), clients, {"w": np.zeros(1, np.int32)})
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [3])


def test_fedtrimmedavg() -> None:
    clients: list[Client] = [([1, 10], 1), ([2, 20], 1), ([3, 30], 7), ([100, -100], 1)]
    np.testing.assert_allclose(agg(FedTrimmedAvg(beta=0.25), clients), [2.5, 15.0])
    # beta = 0 is the unweighted mean.
    np.testing.assert_allclose(agg(FedTrimmedAvg(beta=0.0), clients), [26.5, -10.0])


@pytest.mark.parametrize("block_elements", [1, 7, 1 << 24])
def test_pairwise_distances_are_exact_enough_and_blocked(block_elements: int) -> None:
    rng = np.random.default_rng(3)
    offset = 1e4  # a large common offset: the naive |a|^2 + |b|^2 - 2ab would cancel badly
    ups = [
        ClientUpdate(
            i,
            {
                "a": (offset + rng.normal(size=(3, 4))).astype(np.float32),
                "b": offset + rng.normal(size=5),
                "c": np.array(offset + rng.normal()),
            },
            1,
        )
        for i in range(6)
    ]
    flat = np.stack(
        [np.concatenate([np.ravel(a).astype(np.float64) for a in u.arrays.values()]) for u in ups]
    )
    brute = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2)
    got = pairwise_sq_distances(ups, block_elements=block_elements)
    np.testing.assert_allclose(got, brute, rtol=1e-9, atol=1e-9)
    assert np.all(np.diag(got) == 0)


# ---------------------------------------------------------------- linear / holistic

LINEAR = [FedAvg(), FedProx(), FedAvgM(), FedAdam(), FedYogi(), FedAdagrad()]
HOLISTIC = [Krum(), MultiKrum(), Bulyan(), FedMedian(), FedTrimmedAvg()]


@pytest.mark.parametrize("s", LINEAR, ids=lambda s: type(s).__name__)
def test_linear_strategies_stream(s: Strategy) -> None:
    assert s.linear
    assert isinstance(s.start_fold(ctx(), arr(0)), WeightedMeanFold)


def test_qfedavg_is_linear_with_its_own_fold() -> None:
    s = QFedAvg(client_learning_rate=0.1)
    assert s.linear
    assert isinstance(s.start_fold(ctx(), arr(0)), QFedAvgFold)


@pytest.mark.parametrize("s", HOLISTIC, ids=lambda s: type(s).__name__)
def test_holistic_strategies_collect(s: Strategy) -> None:
    assert not s.linear
    assert type(s).linear is False
    assert isinstance(s.start_fold(ctx(), arr(0)), CollectFold)


# ---------------------------------------------------------------- streaming memory


def _big_update(cid: int, size: int) -> ClientUpdate:
    rng = np.random.default_rng(cid)
    return ClientUpdate(cid, {"a": rng.normal(size=size), "b": rng.normal(size=size)}, cid + 1)


def test_weighted_mean_fold_keeps_only_running_sums() -> None:
    fold = WeightedMeanFold()
    refs = []
    for cid in range(50):
        u = _big_update(cid, 1000)
        refs.append(weakref.ref(u.arrays["a"]))
        fold.add(u)
        del u
    gc.collect()
    assert all(r() is None for r in refs)  # no update array is retained
    held = [v for v in vars(fold).values() if isinstance(v, dict)]
    assert all(len(d) <= 2 for d in held)  # a sum (and a scratch buffer) per array name
    assert not any(isinstance(v, list) for v in vars(fold).values())


@pytest.mark.parametrize(
    "make_fold",
    [
        lambda g: WeightedMeanFold(),
        lambda g: QFedAvg(client_learning_rate=0.1).start_fold(ctx(), g),
        lambda g: FedAdam().start_fold(ctx(), g),
    ],
    ids=["WeightedMeanFold", "QFedAvgFold", "FedAdam"],
)
def test_linear_fold_memory_does_not_grow_with_clients(make_fold: object) -> None:
    size = 50_000  # 400 kB per array, 800 kB per update
    g = {"a": np.zeros(size), "b": np.zeros(size)}
    metrics: Metrics = {"train_loss": 1.0}

    def feed(count: int) -> int:
        fold = make_fold(g)  # type: ignore[operator]
        tracemalloc.start()
        for cid in range(count):
            u = _big_update(cid, size)
            fold.add(ClientUpdate(cid, u.arrays, u.num_examples, metrics))
            del u
        current, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        fold.result()
        return int(current)

    few, many = feed(3), feed(40)
    assert many < few + 200_000  # 37 more updates (~30 MB) left no trace


# ---------------------------------------------------------------- RoundFailed re-checks


def _fold_with(s: Strategy, count: int) -> object:
    fold = s.start_fold(ctx(), arr(0.0, 0.0))
    for u in updates([([float(i), 0.0], 1) for i in range(count)]):
        fold.add(u)
    return fold


@pytest.mark.parametrize(
    ("s", "valid_for", "arrived", "needed"),
    [
        (Krum(num_malicious=1), 5, 4, "more than 2*f+2 = 4"),
        (MultiKrum(num_malicious=1, num_to_keep=2), 5, 4, "more than 2*f+2 = 4"),
        (MultiKrum(num_to_keep=5), 5, 4, "num_to_keep = 5"),
        (Bulyan(num_malicious=1), 7, 6, "4*f+3 = 7"),
        (Bulyan(num_malicious=2), 11, 10, "4*f+3 = 11"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Strategy) else str(v),
)
def test_combine_rechecks_the_number_of_updates(
    s: Strategy, valid_for: int, arrived: int, needed: str
) -> None:
    s.validate(valid_for)  # fine for the sampled clients...
    with pytest.raises(RoundFailed, match=f"only {arrived} client updates arrived") as info:
        _fold_with(s, arrived).result()  # type: ignore[attr-defined]
    assert needed in str(info.value)
    _fold_with(s, valid_for).result()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "s", [*LINEAR, *HOLISTIC, QFedAvg(client_learning_rate=0.1)], ids=lambda s: type(s).__name__
)
def test_empty_round_fails(s: Strategy) -> None:
    with pytest.raises(RoundFailed):
        s.start_fold(ctx(), arr(0.0)).result()


# ---------------------------------------------------------------- settings checks


def test_bulyan_needs_4f_plus_3_clients() -> None:
    Bulyan(num_malicious=1).validate(7)
    with pytest.raises(ConfigError, match=r"4\*f\+3 = 7.*only 6 of the 6 clients"):
        Bulyan(num_malicious=1).validate(6)
    with pytest.raises(ConfigError, match="only 5 of the 10 clients"):
        Bulyan(num_malicious=1, fraction_train=0.5).validate(10)
    Bulyan(num_malicious=1, fraction_train=0.5, min_train_clients=7).validate(10)


def test_krum_needs_more_than_2f_plus_2_clients() -> None:
    Krum(num_malicious=1).validate(5)
    with pytest.raises(ConfigError, match=r"more than 2\*f\+2 = 4"):
        Krum(num_malicious=1).validate(4)
    Krum().validate(3)
    with pytest.raises(ConfigError, match="Krum"):
        Krum().validate(2)
    with pytest.raises(ConfigError, match="MultiKrum"):
        MultiKrum(num_malicious=2).validate(6)


def test_multikrum_num_to_keep_must_fit() -> None:
    MultiKrum(num_to_keep=6).validate(6)
    with pytest.raises(ConfigError, match="num_to_keep = 6"):
        MultiKrum(num_to_keep=6).validate(5)
    with pytest.raises(ConfigError, match="num_to_keep must be >= 1"):
        MultiKrum(num_to_keep=0)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: FedProx(proximal_mu=-0.1), "proximal_mu"),
        (lambda: FedAvgM(server_learning_rate=-0.1), "server_learning_rate"),
        (lambda: FedAvgM(server_learning_rate=0.0), "server_learning_rate"),
        (lambda: FedAvgM(server_momentum=-0.5), "server_momentum"),
        (lambda: FedAvgM(server_momentum=1.0), "server_momentum"),
        (lambda: FedAdam(eta=-0.01), "eta"),
        (lambda: FedAdam(eta=math.nan), "eta"),
        (lambda: FedAdam(eta=math.inf), "eta"),
        (lambda: FedAdam(eta_l=-1.0), "eta_l"),
        (lambda: FedAdam(tau=0.0), "tau"),
        (lambda: FedAdam(beta_1=1.0), "beta_1"),
        (lambda: FedAdam(beta_2=-0.1), "beta_2"),
        (lambda: FedYogi(beta_2=1.5), "beta_2"),
        (lambda: FedAdagrad(eta=0.0), "eta"),
        (lambda: QFedAvg(client_learning_rate=0.0), "client_learning_rate"),
        (lambda: QFedAvg(client_learning_rate=0.1, q=-1.0), "q"),
        (lambda: QFedAvg(client_learning_rate=0.1, train_loss_key=""), "train_loss_key"),
        (lambda: Krum(num_malicious=-1), "num_malicious"),
        (lambda: Bulyan(num_malicious=-1), "num_malicious"),
        (lambda: Bulyan(selection="median"), "selection"),
        (lambda: FedTrimmedAvg(beta=0.5), "beta"),
        (lambda: FedTrimmedAvg(beta=-0.1), "beta"),
        (lambda: FedAvg(fraction_train=0.0), "fraction_train"),
        (lambda: FedAdam(min_train_clients=0), "min_train_clients"),
        (lambda: FedAdam(eta="0.1"), "eta"),  # type: ignore[arg-type]
        (lambda: Krum(num_malicious=1.5), "num_malicious"),  # type: ignore[arg-type]
        (lambda: Krum(num_malicious=True), "num_malicious"),
        (lambda: FedAvgM(server_momentum=False), "server_momentum"),
    ],
)
def test_bad_settings_fail_at_construction(make: object, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make()  # type: ignore[operator]


def test_validate_rechecks_settings() -> None:
    s = FedAdam()
    object.__setattr__(s, "eta", -1.0)  # bypass the frozen dataclass
    with pytest.raises(ConfigError, match="eta must be > 0"):
        s.validate(10)


def test_strategies_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FedAdam().eta = 0.5  # type: ignore[misc]


def test_good_edge_settings() -> None:
    FedTrimmedAvg(beta=0.0).validate(1)
    FedAvgM(server_momentum=0.0, server_learning_rate=10.0).validate(1)
    QFedAvg(client_learning_rate=0.1, q=0.0).validate(1)
    FedMedian().validate(1)


# ---------------------------------------------------------------- registry / build_strategy

NAMES = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "qfedavg",
    "fednova",
    "scaffold",
    "fedbuff",
    "krum",
    "multikrum",
    "bulyan",
    "fedmedian",
    "fedtrimmedavg",
]


def test_registry_has_every_builtin() -> None:
    assert sorted(STRATEGIES) == sorted(NAMES)
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy)
        assert cls.__name__.lower() == name


@pytest.mark.parametrize("name", NAMES)
def test_build_each_strategy(name: str) -> None:
    params = {"client_learning_rate": 0.05} if name == "qfedavg" else {}
    s = build_strategy(name, params)
    assert type(s) is STRATEGIES[name]
    s.validate(20)


def test_build_strategy_converts_and_checks_types() -> None:
    s = build_strategy("FedAdam", {"eta": 1, "beta_1": 0.5, "min_train_clients": 2})
    assert isinstance(s, FedAdam)
    assert s.eta == 1.0 and isinstance(s.eta, float) and s.beta_1 == 0.5
    assert build_strategy("bulyan", {"num_malicious": 2, "selection": "krum"}) == Bulyan(
        num_malicious=2, selection="krum"
    )


def test_build_strategy_unknown_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown strategy 'fedsgd'.*fedadam.*fedavg"):
        build_strategy("fedsgd", {})


def test_build_strategy_unknown_parameter() -> None:
    with pytest.raises(
        ConfigError, match=r"FedAdam has no parameter 'etaa'; valid parameters: .*, eta, eta_l, "
    ):
        build_strategy("fedadam", {"etaa": 0.1})


@pytest.mark.parametrize(
    ("name", "params", "pattern"),
    [
        ("fedadam", {"eta": "0.1"}, r"'eta' must be float, got str"),
        ("fedadam", {"eta": True}, r"'eta' must be float, got bool"),
        ("krum", {"num_malicious": 1.5}, r"'num_malicious' must be int, got float"),
        ("bulyan", {"selection": 3}, r"'selection' must be str, got int"),
        ("qfedavg", {}, r"missing required parameter\(s\): 'client_learning_rate'"),
        ("fedtrimmedavg", {"beta": 0.7}, r"beta must be in \[0, 0.5\), got 0.7"),
        ("fedavgm", {"server_momentum": -0.1}, r"server_momentum must be in \[0, 1\)"),
    ],
)
def test_build_strategy_bad_parameters(name: str, params: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        build_strategy(name, params)
