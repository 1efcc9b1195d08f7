"""The run lifecycle of the coordinator: the same resume rules as simulation, over gRPC.

Real coordinator and site processes over TLS on loopback: kill -9 mid-run and restart
with operational changes; SIGTERM stops cleanly (exit 0) and the same command finishes;
an identity change is refused with nothing touched; a finished run is left alone; more
rounds continue it. The final model is compared bit for bit with the simulation.
"""

from __future__ import annotations

import functools
import re
import signal
import time
from pathlib import Path
from typing import Any

from deployment import FAULT_APP, Deployment, simulated_data
from fedlearn.engine.records import Arrays
from fedlearn.engine.references import resolve
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy
from run_state import committed_round, snapshot

SLOW_ROUND = 3  # every site sleeps before training this round: the coordinator dies in it


def _deployment(root: Path, rounds: int, **params: Any) -> Deployment:
    return Deployment(root, rounds=rounds, app=FAULT_APP, params={"lr": 0.5, **params})


def _simulated(d: Deployment, rounds: int) -> Arrays:
    make_app = resolve(d.app, "client.app")
    params = {k: v for k, v in d.params.items() if not k.startswith("sleep")}
    factory = functools.partial(make_app, simulated_data(d.num_sites, d.seed), **params)
    return run_simulation(
        factory,
        build_strategy(d.strategy, dict(d.strategy_params)),
        num_clients=d.num_sites,
        rounds=rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    ).arrays


def _assert_same(a: Arrays, b: Arrays) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def _committed(d: Deployment) -> int:
    return committed_round(d.state_dir / "run.db", "run")


def _wait_committed(d: Deployment, rounds: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while _committed(d) < rounds:
        assert time.monotonic() < deadline, f"round {rounds} did not commit in time"
        time.sleep(0.01)


def test_kill_9_then_an_operational_change_resumes_to_the_same_model(tmp_path: Path) -> None:
    d = _deployment(tmp_path, rounds=5, sleep_round=SLOW_ROUND, sleep_s=1.0)
    try:
        coordinator = d.start_coordinator()
        sites = [d.start_site(i) for i in range(d.num_sites)]
        _wait_committed(d, SLOW_ROUND - 1)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(timeout=10)
        committed = _committed(d)
        assert 1 <= committed < d.rounds  # round 3 is slow: the kill lands in it, mostly
        # operational changes only: a longer stage timeout and a metrics port
        d.write_coordinator_config(stage_timeout_s=d.stage_timeout_s + 1)
        path = d.root / "coordinator.toml"
        path.write_text(path.read_text().replace("[server]\n", "[server]\nmetrics_port = 0\n", 1))
        code, out = d.wait(d.start_coordinator())
        assert code == 0, out
        assert f"resuming after committed round {committed}" in out
        assert f"changed from round {committed + 1}: run.stage_timeout_s: 60.0 -> 61.0" in out
        assert "server.metrics_port: null -> 0" in out
        assert f"run finished: 5 rounds ({5 - committed} in this session)" in out
        for site in sites:
            assert d.wait(site)[0] == 0
        _assert_same(load_weights(d.state_dir / "model.safetensors"), _simulated(d, d.rounds))
        store = RunStore(d.state_dir / "run.db", run_id="run")
        assert [r.round for r in store.rounds()] == [1, 2, 3, 4, 5]
        assert {(c.round, c.field) for c in store.config_changes()} == {
            (committed + 1, "run.stage_timeout_s"),
            (committed + 1, "server.metrics_port"),
        }
        assert store.run_info()["status"] == "finished"
        store.close()
        assert (d.state_dir / "report.json").is_file()  # the coordinator writes its report
    finally:
        d.stop_all()


def test_kill_9_under_scaffold_resumes_to_the_simulations_model(tmp_path: Path) -> None:
    """SCAFFOLD's server control variate is in the run store's checkpoint and each site
    keeps its own c_i by round, so the round the kill interrupted runs again from the
    same state on both sides: the final model is the uninterrupted simulation's."""
    d = _deployment(tmp_path, rounds=5, sleep_round=SLOW_ROUND, sleep_s=1.0)
    d.strategy = "scaffold"
    d.write_coordinator_config()
    try:
        coordinator = d.start_coordinator()
        sites = [d.start_site(i) for i in range(d.num_sites)]
        _wait_committed(d, SLOW_ROUND - 1)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(timeout=10)
        committed = _committed(d)
        assert 1 <= committed < d.rounds
        code, out = d.wait(d.start_coordinator())
        assert code == 0, out
        assert f"resuming after committed round {committed}" in out
        for site in sites:
            assert d.wait(site)[0] == 0
        final = load_weights(d.state_dir / "model.safetensors")
        _assert_same(final, _simulated(d, d.rounds))
    finally:
        d.stop_all()


def test_sigterm_stops_cleanly_and_the_same_command_finishes(tmp_path: Path) -> None:
    d = _deployment(tmp_path, rounds=4, sleep_round=SLOW_ROUND, sleep_s=1.0)
    try:
        coordinator = d.start_coordinator()
        sites = [d.start_site(i) for i in range(d.num_sites)]
        _wait_committed(d, SLOW_ROUND - 1)
        coordinator.send_signal(signal.SIGTERM)
        code, out = d.wait(coordinator, timeout=60)
        assert code == 0, out
        assert "Traceback" not in out
        hint = re.search(r"interrupted after round (\d+); continue with: (.+)", out)
        assert hint is not None, out
        assert 1 <= int(hint.group(1)) < d.rounds
        assert hint.group(2).strip() == f"fedlearn server --config {d.root / 'coordinator.toml'}"
        store = RunStore(d.state_dir / "run.db", run_id="run")
        assert store.run_info()["status"] == "interrupted"
        store.close()
        code, out = d.wait(d.start_coordinator())
        assert code == 0, out
        for site in sites:
            assert d.wait(site)[0] == 0
        _assert_same(load_weights(d.state_dir / "model.safetensors"), _simulated(d, d.rounds))
    finally:
        d.stop_all()


def test_finished_identity_change_and_more_rounds(tmp_path: Path) -> None:
    d = _deployment(tmp_path, rounds=2)
    try:
        coordinator = d.start_coordinator()
        sites = [d.start_site(i) for i in range(d.num_sites)]
        assert d.wait(coordinator)[0] == 0
        for site in sites:
            assert d.wait(site)[0] == 0
        before = snapshot(d.state_dir)

        # the same command on a finished run: says so, touches nothing
        code, out = d.wait(d.start_coordinator(), timeout=60)
        assert code == 0, out
        assert "already finished (2 rounds)" in out
        assert snapshot(d.state_dir) == before

        # an identity change: refused, every field listed, nothing touched
        d.strategy = "fedavgm"
        d.write_coordinator_config(seed=7)
        code, out = d.wait(d.start_coordinator(), timeout=60)
        assert code == 2, out
        assert 'strategy.name: "fedavg" -> "fedavgm"' in out and "run.seed: 0 -> 7" in out
        assert "--new-run" in out and "Traceback" not in out
        assert snapshot(d.state_dir) == before

        # more rounds: continues the finished run to what a 3-round run makes
        d.strategy = "fedavg"
        d.write_coordinator_config(rounds=3)
        coordinator = d.start_coordinator()
        sites = [d.start_site(i) for i in range(d.num_sites)]
        code, out = d.wait(coordinator)
        assert code == 0, out
        assert "resuming after committed round 2" in out
        for site in sites:
            assert d.wait(site)[0] == 0
        _assert_same(load_weights(d.state_dir / "model.safetensors"), _simulated(d, 3))
        after = snapshot(d.state_dir)
        for table, rows in before["rows"].items():  # every committed row is still there
            if table not in {"runs", "checkpoints"}:  # (status, config, last checkpoint move)
                assert set(rows) <= set(after["rows"][table]), table
    finally:
        d.stop_all()
