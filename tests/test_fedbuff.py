"""FedBuff: hand-computed aggregations, the paper's update equations over a recorded run,
determinism on the virtual clock, kill -9 resume bit-identical, per-client evaluation.

Expected values come from Nguyen et al. (2022), Algorithm 1: a reply's staleness is the
server's version at arrival minus the version the client started from; every K replies
``Delta = (1/K) sum_i s(tau_i) Delta_i`` with ``s(tau) = 1/sqrt(1 + tau)`` and
``x <- x + eta_g Delta``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from algo_apps import KILL_ENV, LeastSquares, gradient, problems

from fedlearn.config.simulation import PrivacySection, SimulationConfig, load_config
from fedlearn.engine.clock import AsyncSchedule, Latency
from fedlearn.engine.messages import Stage
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.errors import ConfigError
from fedlearn.report.summary import summarize
from fedlearn.run.builders import make_privacy
from fedlearn.run.job import make_latency, run_job
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import run_simulation
from fedlearn.strategy import FedAvg, FedBuff, RoundContext, build_strategy
from fedlearn.strategy.base import ClientUpdate

ROOT = Path(__file__).resolve().parents[1]
RUN = "fedbuff"


@dataclass(frozen=True)
class _PerClient(Latency):
    """Client ``i`` always takes ``times[i]`` virtual seconds (a hand-made clock)."""

    times: tuple[float, ...] = ()

    def draw(self, seed: int, client_id: int, kind: int, key: int) -> float:
        return self.times[client_id]


def test_fold_and_server_step_follow_the_paper() -> None:
    # K = 3 replies, eta_g = 0.5; x = [1, 2].
    # client 0 from x itself (tau 0):  Delta_0 = [2, 0], s = 1
    # client 1 from x' = [0, 0] (tau 3): Delta_1 = [4, 8], s = 1/2
    # client 2 from x' (tau 1):         Delta_2 = [-1, 3], s = 1/sqrt(2)
    # Delta = ([2, 0] + [2, 4] + [-1, 3]/sqrt(2)) / 3; x <- x + 0.5 Delta
    strategy = FedBuff(buffer_size=3, concurrency=3, server_learning_rate=0.5)
    x = {"w": np.array([1.0, 2.0]), "n": np.array([10], np.int64)}
    old = {"w": np.array([0.0, 0.0]), "n": np.array([4], np.int64)}
    ctx = RoundContext(5, 9, np.random.default_rng(0), {}, num_clients=3)
    fold = strategy.start_fold(ctx, x)
    replies = [
        ({"w": np.array([3.0, 2.0]), "n": np.array([12], np.int64)}, 0, None),
        ({"w": np.array([4.0, 8.0]), "n": np.array([10], np.int64)}, 3, old),
        ({"w": np.array([-1.0, 3.0]), "n": np.array([7], np.int64)}, 1, old),
    ]
    for cid, (y, tau, origin) in enumerate(replies):
        fold.add(ClientUpdate(cid, y, 100 * (cid + 1), staleness=tau, origin=origin))
    new, state = strategy.server_update(ctx, x, fold.result(), {})
    delta = np.array([2.0, 0.0]) + np.array([4.0, 8.0]) / 2 + np.array([-1.0, 3.0]) / np.sqrt(2)
    np.testing.assert_allclose(new["w"], np.array([1.0, 2.0]) + 0.5 * delta / 3, rtol=1e-15)
    # counters: Delta_n = (2 + 6/2 + 3/sqrt(2)) / 3 = 2.3738; 10 + 0.5 * 2.3738 -> 11
    assert new["n"].dtype == np.int64 and new["n"].tolist() == [11]
    assert state == {}
    constant = FedBuff(buffer_size=3, concurrency=3, staleness="constant")
    assert [constant.staleness_weight(t) for t in (0, 5)] == [1.0, 1.0]
    cubic = FedBuff(staleness_exponent=1.0)
    assert cubic.staleness_weight(3) == 0.25


def test_a_hand_computed_asynchronous_run() -> None:
    # Two clients, both training at once (M = 2), each reply aggregated alone (K = 1),
    # eta_g = 0.5. Client c takes one step of lr 0.5 on (w - t_c)^2 / 2, so from x it
    # replies x + (t_c - x)/2: Delta_c(x) = (t_c - x)/2, with t_0 = 4, t_1 = 8.
    # Client 0 takes 1.0 virtual seconds, client 1 takes 2.5. x_0 = 0.
    #   t=1.0  client 0 (from x_0, tau 0): x_1 = 0 + 0.5 * 2            = 1
    #   t=2.0  client 0 (from x_1, tau 0): x_2 = 1 + 0.5 * 1.5          = 1.75
    #   t=2.5  client 1 (from x_0, tau 2): x_3 = 1.75 + 0.5 * 4/sqrt(3)
    #   t=3.0  client 0 (from x_2, tau 1): x_4 = x_3 + 0.5 * 1.125/sqrt(2)
    data = [(np.ones((1, 1)), np.array([4.0])), (np.ones((1, 1)), np.array([8.0]))]
    result = run_simulation(
        lambda: LeastSquares(data, [1, 1], 0.5),
        FedBuff(buffer_size=1, concurrency=2, server_learning_rate=0.5),
        num_clients=2,
        rounds=4,
        evaluate_every=0,
        latency=_PerClient(times=(1.0, 2.5)),
    )
    x3 = 1.75 + 0.5 * 4 / np.sqrt(3)
    np.testing.assert_allclose(result.arrays["w"], [x3 + 0.5 * 1.125 / np.sqrt(2)], rtol=1e-15)
    assert [r.virtual_time for r in result.rounds] == [1.0, 2.0, 2.5, 3.0]
    trained = [(c.round, c.client_id, c.metrics["staleness"]) for c in result.clients]
    assert trained == [(1, 0, 0), (2, 0, 0), (3, 1, 2), (4, 0, 1)]
    assert [r.train_metrics["staleness_max"] for r in result.rounds] == [0, 0, 2, 1]
    # client 1 trains from x_3 again (dispatched at t = 2.5), client 0 from x_4: the
    # checkpointed state keeps x_3 for it (x_0 was dropped when client 1 arrived)
    kept = {k: v for k, v in result.state.items() if k.startswith("coordinator/")}
    assert list(kept) == ["coordinator/model/3/w"]
    np.testing.assert_allclose(kept["coordinator/model/3/w"], [x3], rtol=1e-15)


def _fedbuff_run(seed: int, backend: str = "inprocess", rounds: int = 8, **kw: Any) -> Any:
    data = problems(7, 3, 8, seed=3)
    return run_simulation(
        lambda: LeastSquares(data, [1 + cid % 3 for cid in range(7)], 0.05),
        FedBuff(buffer_size=2, concurrency=4, server_learning_rate=0.8),
        num_clients=7,
        rounds=rounds,
        seed=seed,
        backend=backend,  # type: ignore[arg-type]
        workers=2,
        evaluate_every=0,
        latency=Latency("lognormal", sigma=1.0),
        **kw,
    )


def _arrivals(result: Any) -> list[tuple[int, int, int]]:
    return [
        (c.round, c.client_id, int(c.metrics["staleness"]))
        for c in result.clients
        if c.stage is Stage.TRAIN
    ]


def test_matches_the_paper_over_a_recorded_run() -> None:
    """Algorithm 1 written out with numpy over the run's own arrivals (who arrived in
    which aggregation, with which staleness): the same model."""
    data = problems(7, 3, 8, seed=3)
    steps = [1 + cid % 3 for cid in range(7)]
    result = _fedbuff_run(5)
    arrivals = _arrivals(result)
    assert max(tau for _, _, tau in arrivals) >= 2  # stale replies do occur
    models = [np.zeros(3)]
    for rnd in range(1, 9):
        deltas = []
        for _, cid, tau in (a for a in arrivals if a[0] == rnd):
            start = models[rnd - 1 - tau]
            a, b = data[cid]
            y = start.copy()
            for _ in range(steps[cid]):
                y = y - 0.05 * gradient(a, b, y)
            deltas.append((y - start) / np.sqrt(1 + tau))
        assert len(deltas) == 2
        models.append(models[-1] + 0.8 * np.sum(deltas, axis=0) / 2)
    np.testing.assert_allclose(result.arrays["w"], models[-1], rtol=1e-12, atol=1e-14)


def test_deterministic_under_the_virtual_clock_on_every_backend() -> None:
    a = _fedbuff_run(1)
    b = _fedbuff_run(1, backend="pool")
    assert a.arrays["w"].tobytes() == b.arrays["w"].tobytes()
    assert _arrivals(a) == _arrivals(b)
    assert [r.virtual_time for r in a.rounds] == [r.virtual_time for r in b.rounds]
    times = [r.virtual_time for r in a.rounds]
    assert times == sorted(times) and times[0] > 0
    other = _fedbuff_run(2)
    assert _arrivals(other) != _arrivals(a)
    assert other.arrays["w"].tobytes() != a.arrays["w"].tobytes()


def test_schedule_keeps_m_in_flight_and_never_trains_a_buffered_client_twice() -> None:
    schedule = AsyncSchedule(range(6), 4, 3, Latency("uniform", low=0.1, high=2.0), seed=3)
    seen: set[int] = set()
    for rnd in range(1, 30):
        in_flight = {j.client_id for j in schedule.in_flight.values()}
        assert len(schedule.in_flight) == len(in_flight) == 4
        plan = schedule.next_round()
        assert plan.round == rnd and len(plan.arrivals) == 3
        assert [j.arrival for j in plan.arrivals] == sorted(j.arrival for j in plan.arrivals)
        assert len({j.client_id for j in plan.arrivals}) == 3
        assert all(j.version < rnd for j in plan.arrivals)
        assert plan.dispatched[-1].version == rnd  # the last dispatch trains the new model
        assert all(j.version == rnd - 1 for j in plan.dispatched[:-1])
        seen.update(j.client_id for j in plan.arrivals)
    assert seen == set(range(6))


def test_settings_are_checked() -> None:
    strategy = build_strategy("fedbuff", {"buffer_size": 3, "concurrency": 5})
    assert isinstance(strategy, FedBuff) and strategy.asynchrony(10) is not None
    with pytest.raises(ConfigError, match="buffer_size"):
        build_strategy("fedbuff", {"buffer_size": 0})
    with pytest.raises(ConfigError, match="concurrency"):
        build_strategy("fedbuff", {"buffer_size": 5, "concurrency": 4})
    with pytest.raises(ConfigError, match="staleness"):
        build_strategy("fedbuff", {"staleness": "exponential"})
    with pytest.raises(ConfigError, match="server_learning_rate"):
        build_strategy("fedbuff", {"server_learning_rate": 0.0})
    with pytest.raises(ConfigError, match=r"M \+ K - 1 = 7 clients"):
        strategy.validate(6)
    with pytest.raises(ConfigError, match="sigma"):
        Latency("lognormal", sigma=0.0)
    with pytest.raises(ConfigError, match="low < high"):
        Latency("uniform", low=2.0, high=1.0)
    with pytest.raises(ConfigError, match="latency"):
        load_config(None, {"latency": {"kind": "lognormal", "sigma": -1.0}})
    with pytest.raises(ConfigError, match="latency"):
        load_config(None, {"latency": {"kind": "uniform", "low": 3.0, "high": 1.0}})
    with pytest.raises(ConfigError, match="secure aggregation"):
        run_simulation(
            lambda: LeastSquares(problems(5, 3, 8, 0), [1] * 5, 0.05),
            strategy,
            num_clients=10,
            rounds=1,
            secure=SecureAggregation(),
        )
    with pytest.raises(ConfigError, match="asynchronous"):
        make_privacy(PrivacySection(mode="central"), strategy, num_clients=10, seed=0, secure=None)


def _config(out: Path, rounds: int, extra: dict[str, Any] | None = None) -> SimulationConfig:
    return load_config(
        None,
        {
            "run.out_dir": str(out),
            "run.rounds": rounds,
            "run.clients": 6,
            "run.seed": 2,
            "run.name": RUN,
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "algo_apps:make_app",
            "client.params": {"clients": 6, "seed": 1},
            "strategy.name": "fedbuff",
            "strategy.params": {"buffer_size": 2, "concurrency": 4, "server_learning_rate": 0.9},
            "latency": {"kind": "lognormal", "sigma": 1.0},
            "backend.kind": "inprocess",
            "publish.enabled": False,
            **(extra or {}),
        },
    )


def _store(directory: Path) -> RunStore:
    return RunStore(directory / "run.db", run_id=RUN, read_only=True)


def test_kill_9_mid_round_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """The run process SIGKILLs itself while round 5 trains; the checkpoint of round 4
    holds the older models that in-flight clients started from, and the resumed run
    trains those clients again to the same bits."""
    config = _config(tmp_path / "whole", 7)
    whole = run_job(config)
    assert whole.result is not None
    # which clients train from version 4 (task round 5): replay the schedule
    schedule = AsyncSchedule(range(6), 4, 2, make_latency(config) or Latency(), seed=2)
    for _ in range(4):
        schedule.next_round()
    victim = next(j.client_id for j in schedule.next_round().dispatched if j.version == 4)
    killed = tmp_path / "killed"
    script = (
        "from test_fedbuff import _config\nfrom fedlearn.run.job import run_job\n"
        f"run_job(_config(__import__('pathlib').Path({str(killed)!r}), 7))\n"
    )
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        **{KILL_ENV: f"5:{victim}"},
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == -9
    store = _store(killed)
    try:
        assert store.committed_round() == 4
        checkpoint = store.last_checkpoint()
        assert checkpoint is not None
        kept = sorted({k.split("/")[2] for k in checkpoint[2] if k.startswith("coordinator/")})
        assert kept and all(int(v) < 4 for v in kept)  # older models still in flight
    finally:
        store.close()
    resumed = run_job(_config(killed, 7), resume=True)
    assert resumed.result is not None
    assert [r.round for r in resumed.result.rounds] == [5, 6, 7]
    a = load_weights(whole.out_dir / "model.safetensors")
    b = load_weights(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    whole_store, killed_store = (_store(d) for d in (whole.out_dir, killed))
    try:
        assert whole_store.clients() == killed_store.clients()
        times = [r.virtual_time for r in whole_store.rounds()]
        assert times == [r.virtual_time for r in killed_store.rounds()]
    finally:
        whole_store.close()
        killed_store.close()


def test_per_client_evaluation_and_the_report(tmp_path: Path) -> None:
    job = run_job(_config(tmp_path / "run", 3, {"run.evaluate_every": 1}))
    assert job.result is not None
    store = _store(job.out_dir)
    try:
        report = summarize(store)
    finally:
        store.close()
    assert len(report.rounds) == 3
    for r in report.rounds:
        assert r.ok and r.train_selected == 2 and r.eval_ok == 6
        loss = r.metric("loss")
        assert loss is not None and loss.clients == 6
        assert r.virtual_time is not None and r.virtual_time > 0
    evaluated = [c for c in job.result.clients if c.stage is Stage.EVALUATE]
    assert sorted({c.client_id for c in evaluated}) == list(range(6))
    losses = [r.eval_metrics["loss"] for r in job.result.rounds]
    assert losses[-1] < losses[0]
    header = (job.out_dir / "rounds.csv").read_text().splitlines()[0].split(",")
    assert "virtual_time" in header


def test_the_example_config_selects_fedbuff_and_its_clock() -> None:
    config = load_config(ROOT / "simulations" / "mnist_fedbuff.toml")
    strategy = build_strategy(config.strategy.name, config.strategy.params)
    assert isinstance(strategy, FedBuff)
    assert (strategy.buffer_size, strategy.concurrency) == (5, 10)
    strategy.validate(config.run.clients)
    assert make_latency(config) == Latency("lognormal", median=1.0, sigma=1.0)


class _StopAfter:
    """An observer that asks the coordinator to stop once round ``round`` is committed."""

    def __init__(self, round: int, stop: Any) -> None:
        self.round, self.stop = round, stop

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        pass

    def reply_received(self, record: Any) -> None:
        pass

    def round_finished(self, record: Any) -> None:
        if record.round == self.round:
            self.stop.set()


def test_over_grpc_sites_reply_at_their_own_pace_and_the_run_resumes(tmp_path: Path) -> None:
    """Four site daemons on loopback: site 0 takes 0.9 s a task, the others 0.15 s. With M = 3
    and K = 1 the coordinator aggregates each reply as it comes, so the fast sites carry
    the rounds on and the slow site's replies arrive several aggregations stale; the one
    site not training evaluates each new model. The coordinator stops after round 3 with
    tasks in flight (cancelled at the sites); a new coordinator continues from round 4 with
    the committed model."""
    import threading

    from deployment import Deployment
    from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
    from fedlearn.config.loading import load_toml
    from fedlearn.deploy.launch import build_site
    from fedlearn.deploy.server import run_coordinator
    from fedlearn.errors import RunInterrupted

    d = Deployment(
        tmp_path,
        num_sites=4,
        rounds=24,
        strategy="fedbuff",
        strategy_params={"buffer_size": 1, "concurrency": 3},
        app="fault_apps:make_app",
        params={},
    )
    for i in range(4):
        d.write_site_config(i, pace_s=0.9 if i == 0 else 0.15)
    sites = [build_site(load_toml(SiteConfig, d.root / f"site-{i}.toml")) for i in range(4)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in sites]
    for t in threads:
        t.start()
    config = load_toml(CoordinatorConfig, d.root / "coordinator.toml")
    stop = threading.Event()
    with pytest.raises(RunInterrupted):
        run_coordinator(config, stop=stop, observer=_StopAfter(3, stop))
    store = RunStore(d.state_dir / "run.db", run_id=config.run.name, read_only=True)
    try:
        checkpoint = store.last_checkpoint()
        assert store.committed_round() == 3 and checkpoint is not None and checkpoint[0] == 3
        assert not [k for k in checkpoint[2] if k.startswith("coordinator/")]
    finally:
        store.close()
    resumed = run_coordinator(config)
    for t in threads:
        t.join(timeout=30)
    assert resumed.result is not None
    assert [r.round for r in resumed.result.rounds] == list(range(4, 25))
    rounds = resumed.rounds
    assert [r.round for r in rounds] == list(range(1, 25)) and all(r.ok for r in rounds)
    assert all(r.train_selected == r.train_ok == 1 for r in rounds)
    store = RunStore(d.state_dir / "run.db", run_id=config.run.name, read_only=True)
    try:
        trained = store.clients(Stage.TRAIN)
    finally:
        store.close()
    slow = [int(c.metrics["staleness"]) for c in trained if c.client_id == sites[0].client_id]
    fast = [int(c.metrics["staleness"]) for c in trained if c.client_id != sites[0].client_id]
    print("staleness: slow site", slow, "fast sites", fast)
    assert slow and min(slow) >= 1  # the fast sites aggregated while it trained
    assert sum(fast) / len(fast) < sum(slow) / len(slow)
    # each round was evaluated by the one site that was not training
    assert all(r.eval_selected == r.eval_ok == 1 for r in rounds)
    assert all(np.isfinite(r.eval_metrics["loss"]) for r in rounds)
    # a round did not wait for the slow site
    assert sorted(r.duration_s for r in rounds)[12] < 0.9
    final = load_weights(d.state_dir / "model.safetensors")
    assert final["w"].tobytes() != checkpoint[1]["w"].tobytes()


def test_a_synchronous_round_lasts_as_long_as_its_slowest_client() -> None:
    data = [(np.ones((1, 1)), np.array([4.0])), (np.ones((1, 1)), np.array([8.0]))] * 2
    clock = _PerClient(times=(1.0, 2.5, 0.5, 4.0))

    def run(rounds: int, **kw: Any) -> Any:
        return run_simulation(
            lambda: LeastSquares(data, [1] * 4, 0.5),
            FedAvg(fraction_train=0.5, min_train_clients=2),
            num_clients=4,
            rounds=rounds,
            seed=3,
            evaluate_every=0,
            latency=clock,
            **kw,
        )

    whole = run(4)
    expected, total = [], 0.0
    for rnd in range(1, 5):
        picked = [c.client_id for c in whole.clients if c.round == rnd]
        assert len(picked) == 2
        total += max(clock.times[c] for c in picked)
        expected.append(total)
    assert [r.virtual_time for r in whole.rounds] == expected
    assert (
        len({tuple(c.client_id for c in whole.clients if c.round == r) for r in (1, 2, 3, 4)}) > 1
    )
    # the clock is part of the checkpointed state: a continued run goes on from it
    first = run(2)
    rest = run(4, initial_arrays=first.arrays, initial_state=first.state, start_round=3)
    assert [r.virtual_time for r in rest.rounds] == expected[2:]
    assert rest.arrays["w"].tobytes() == whole.arrays["w"].tobytes()


def test_latency_draws_per_task_or_per_client() -> None:
    task = Latency("lognormal", median=2.0, sigma=0.5)
    client = Latency("lognormal", median=2.0, sigma=0.5, per="client")
    assert task.draw(1, 3, 1, 7) == task.draw(1, 3, 1, 7)  # seeded
    assert task.draw(1, 3, 1, 7) != task.draw(1, 3, 1, 8) != task.draw(2, 3, 1, 8)
    assert client.draw(1, 3, 1, 7) == client.draw(1, 3, 0, 2) != client.draw(1, 4, 1, 7)
    draws = np.array([task.draw(0, c, 1, k) for c in range(40) for k in range(50)])
    assert abs(np.median(draws) - 2.0) < 0.1 and abs(np.std(np.log(draws)) - 0.5) < 0.03
    uniform = [Latency("uniform", low=1.0, high=3.0).draw(0, c, 0, 1) for c in range(500)]
    assert 1.0 <= min(uniform) < 1.1 and 2.9 < max(uniform) <= 3.0
    assert Latency("constant", value=0.25).draw(5, 1, 1, 1) == 0.25
