"""Secure aggregation inside simulated rounds: same model as plain FedAvg, dropouts, refusals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from apps import LogReg
from fedlearn.engine.client_app import ClientContext, TrainResult
from fedlearn.engine.coordinator import Coordinator
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, Config
from fedlearn.errors import ConfigError
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import InProcessTransport, run_simulation
from fedlearn.strategy import FedAdam, FedAvg, FedMedian, Krum, QFedAvg

SECURE = SecureAggregation(clip=2.0, max_weight=100)


def _run(secure: SecureAggregation | None, rounds: int = 1, **kw: object) -> object:
    return run_simulation(
        LogReg,
        kw.pop("strategy", FedAvg()),
        num_clients=12,  # type: ignore[arg-type]
        rounds=rounds,
        seed=3,
        secure=secure,
        **kw,
    )  # type: ignore[arg-type]


def test_secure_round_equals_plain_round_within_the_quantization_bound() -> None:
    plain, secure = _run(None), _run(SECURE)
    cfg = SECURE.round_config(list(range(12)), 6, 3, 1)
    # per coordinate of the mean: n / 2^(s+1) / sum(w); here sum(w) = 12 * 40
    bound = 12 / 2 ** (cfg.scale_bits + 1) / (12 * 40)
    for name in plain.arrays:  # type: ignore[attr-defined]
        diff = np.abs(plain.arrays[name] - secure.arrays[name])  # type: ignore[attr-defined]
        assert diff.max() <= bound + 1e-12, (name, diff.max(), bound)
    assert secure.rounds[0].ok and secure.rounds[0].train_ok == 12  # type: ignore[attr-defined]


def test_server_optimizer_runs_on_the_secure_mean() -> None:
    plain = _run(None, rounds=3, strategy=FedAdam(eta=0.05))
    secure = _run(SECURE, rounds=3, strategy=FedAdam(eta=0.05))
    for name in plain.arrays:  # type: ignore[attr-defined]
        np.testing.assert_allclose(secure.arrays[name], plain.arrays[name], atol=1e-6)  # type: ignore[attr-defined]


def test_backends_agree_bit_for_bit() -> None:
    a = _run(SECURE, rounds=2)
    b = _run(SECURE, rounds=2, backend="pool", workers=3)
    for name in a.arrays:  # type: ignore[attr-defined]
        assert a.arrays[name].tobytes() == b.arrays[name].tobytes()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "strategy", [Krum(num_malicious=1), FedMedian(), QFedAvg(client_learning_rate=0.1)]
)
def test_non_mean_strategies_are_refused_before_any_round(strategy: object) -> None:
    calls: list[int] = []

    class Counting(LogReg):
        def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
            calls.append(ctx.client_id)
            return super().train(arrays, config, ctx)

    with pytest.raises(ConfigError, match="secure aggregation needs a linear weighted-mean"):
        run_simulation(Counting, strategy, num_clients=12, rounds=1, secure=SECURE)  # type: ignore[arg-type]
    assert calls == []


def test_capacity_overflow_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        run_simulation(
            LogReg,
            FedAvg(),
            num_clients=12,
            rounds=1,
            secure=SecureAggregation(clip=1e9, max_weight=10**9, modulus_bits=16),
        )


@dataclass
class Dropping(InProcessTransport):
    """Loses the replies of ``lost`` clients at ``stage`` (a network fault)."""

    lost: frozenset[int] = frozenset()
    stage: Stage = Stage.SECAGG_SETUP

    def __post_init__(self) -> None:
        super().__init__(LogReg)

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        for reply in super().execute(broadcast, tasks):
            if reply.stage is self.stage and reply.client_id in self.lost:
                continue
            yield reply


def _secure_round(lost: set[int], stage: Stage) -> object:
    transport = Dropping(lost=frozenset(lost), stage=stage)
    return Coordinator(FedAvg(), transport, list(range(12)), 1, seed=3, secure=SECURE).run(
        LogReg().initial_arrays(0)
    )


def _plain_mean_without(dropped: set[int]) -> Arrays:
    class Skip(InProcessTransport):
        def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
            return super().execute(broadcast, [t for t in tasks if t.client_id not in dropped])

    return (
        Coordinator(FedAvg(), Skip(LogReg), list(range(12)), 1, seed=3)
        .run(LogReg().initial_arrays(0))
        .arrays
    )


@pytest.mark.parametrize("stage", [Stage.SECAGG_SETUP, Stage.SECAGG_KEYS, Stage.SECAGG_SHARES])
def test_dropouts_before_the_masked_input_leave_the_survivors_sum(stage: Stage) -> None:
    lost = {1, 5, 8, 10}  # a third of the clients
    result = _secure_round(lost, stage)
    assert result.rounds[0].ok, result.rounds[0].error  # type: ignore[attr-defined]
    expected = _plain_mean_without(lost)
    for name, value in expected.items():
        np.testing.assert_allclose(result.arrays[name], value, atol=1e-7)  # type: ignore[attr-defined]
    failed = {c.client_id for c in result.clients if not c.ok}  # type: ignore[attr-defined]
    assert failed == lost or stage is not Stage.SECAGG_SETUP


def test_dropouts_during_unmasking_keep_every_masked_input() -> None:
    lost = {0, 4, 7}
    result = _secure_round(lost, Stage.SECAGG_UNMASK)
    assert result.rounds[0].ok, result.rounds[0].error  # type: ignore[attr-defined]
    expected = _plain_mean_without(set())  # their masked inputs arrived: they stay in the sum
    for name, value in expected.items():
        np.testing.assert_allclose(result.arrays[name], value, atol=1e-7)  # type: ignore[attr-defined]


def test_too_many_dropouts_abort_and_keep_the_model() -> None:
    start = LogReg().initial_arrays(0)
    result = _secure_round(set(range(8)), Stage.SECAGG_SHARES)
    record = result.rounds[0]  # type: ignore[attr-defined]
    assert not record.ok and "secure aggregation" in str(record.error)
    for name, value in start.items():
        assert result.arrays[name].tobytes() == value.tobytes()  # type: ignore[attr-defined]


class Wide(LogReg):
    """1000 clients: task chunks and reply chunks both larger than a socket buffer."""

    def initial_arrays(self, seed: int) -> Arrays:
        return {"w": np.zeros(2_000)}

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        return TrainResult({"w": arrays["w"] + 0.001 * (ctx.client_id % 7)}, 10)


def test_pool_moves_large_messages_both_ways_without_deadlock() -> None:
    import threading

    results: list[object] = []

    def run() -> None:
        results.append(
            run_simulation(
                Wide,
                FedAvg(),
                num_clients=1000,
                rounds=1,
                backend="pool",
                workers=2,
                evaluate_every=0,
                secure=SECURE,
            )
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the pool deadlocked"
    (result,) = results
    expected = np.mean([0.001 * (c % 7) for c in range(1000)])
    np.testing.assert_allclose(result.arrays["w"], expected, atol=2e-5)  # type: ignore[attr-defined]
