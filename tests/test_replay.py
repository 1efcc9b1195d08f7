"""Replaying a run from its store reproduces every record and the final model bit for bit.

A simulation with failing clients, a sampled fraction of clients and a resume that changed
``run.rounds`` and ``run.evaluate_every``; a coordinator's run whose sites come and go
(each round selects from the clients connected then). Tampering with the record, or
replaying with another ClientApp, is reported.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fault_apps import make_app
from fedlearn.cli.main import app
from fedlearn.config.deployment import CoordinatorConfig
from fedlearn.config.simulation import load_config
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.engine.client_app import ClientApp
from fedlearn.engine.coordinator import Coordinator
from fedlearn.engine.messages import Stage
from fedlearn.engine.records import Arrays
from fedlearn.engine.results import ClientRecord, RoundRecord, RunResult
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import save_weights
from fedlearn.errors import ConfigError, RunInterrupted
from fedlearn.run.builders import make_strategy
from fedlearn.run.job import run_job
from fedlearn.run.lifecycle import RunSpec, Start, open_run
from fedlearn.run.replay import NOT_RECORDED, replay_run
from fedlearn.simulation.inprocess import InProcessTransport

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS = 6


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


class StopAfter:
    def __init__(self, round: int) -> None:
        self.round = round

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        if round > self.round:
            raise KeyboardInterrupt

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        pass


def _simulation(out: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "run.name": "sim",
        "run.out_dir": str(out),
        "run.rounds": 3,
        "run.clients": NUM_CLIENTS,
        "run.seed": 5,
        "run.evaluate_every": 2,
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "fault_apps:make_app",
        # client 2 fails to train in rounds 2 and 4: those rounds fold without it
        "client.params": {"lr": 0.5, "fail_rounds": "2,4", "fail_client": 2},
        "strategy.name": "fedavgm",
        "strategy.params": {"fraction_train": 0.7, "min_train_clients": 2},
        "backend.kind": "inprocess",
        "publish.enabled": False,
    }
    settings.update(overrides)
    return load_config(None, settings)


def _failures(directory: Path, run_id: str) -> list[tuple[int, str, int]]:
    store = RunStore(directory / "run.db", run_id=run_id, read_only=True)
    try:
        return [(c.round, c.stage.value, c.client_id) for c in store.clients() if not c.ok]
    finally:
        store.close()


def test_a_resumed_simulation_with_failures_replays_exactly(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RunInterrupted, match="interrupted after round 2"):
        run_job(_simulation(out), observer=StopAfter(2))
    # resumed with more rounds and evaluation every round: both operational
    run_job(_simulation(out, **{"run.rounds": 5, "run.evaluate_every": 1}), resume=True)
    assert _failures(out, "sim") == [(2, "train", 2), (4, "train", 2)]

    replay = replay_run(out)
    assert replay.differences == []
    assert [r.round for r in replay.rounds] == [1, 2, 3, 4, 5]
    # round 1 ran with evaluate_every = 2 and 3 rounds: no evaluation; round 3 was then
    # the last round and evaluated; from round 3 on every round evaluates
    assert [r.eval_selected > 0 for r in replay.rounds] == [False, True, True, True, True]
    # a 70 % sample: the recorded selection of 4 of 6 clients, replayed
    assert {r.train_selected for r in replay.rounds} == {4}

    # replayed with another ClientApp (another learning rate): every difference is named
    other = replay_run(out, _factory(lr=0.4, fail_rounds="2,4", fail_client=2))
    assert not other.matches
    assert "model.safetensors: array 'w' differs from the replay" in other.differences
    assert any("round 1: train_metrics recorded" in d for d in other.differences)

    # the command: exit 0 when the replay reproduces the run, 1 with the differences
    result = CliRunner().invoke(app, ["replay", str(out)])
    assert result.exit_code == 0, result.output
    assert "reproduces every round and all" in result.output
    assert "bit-identical to the round 5 checkpoint and model.safetensors" in result.output
    with sqlite3.connect(out / "run.db") as db:  # client 2's round-4 failure, erased
        db.execute("UPDATE client_results SET ok = 1 WHERE round = 4 AND client_id = 2")
    result = CliRunner().invoke(app, ["replay", str(out)])
    assert result.exit_code == 1, result.output
    assert "round 4, train, client 2: ok recorded True, replayed False" in result.output


def _factory(**params: Any) -> Callable[[], ClientApp]:
    data = partition_dataset(load_dataset("breast_cancer"), "iid", NUM_CLIENTS, 0)
    return functools.partial(make_app, data, **params)


def _available(rnd: int) -> list[int]:
    """The sites connected in round ``rnd``: two of six are away, a different two each round."""
    away = {rnd % NUM_CLIENTS, (3 * rnd + 1) % NUM_CLIENTS}
    return [c for c in range(NUM_CLIENTS) if c not in away]


def _coordinator_run(tmp_path: Path, rounds: int = 4) -> Path:
    """A coordinator's run as ``run_coordinator`` drives it, sites replaced by an
    in-process transport and a changing set of connected clients."""
    initial = _factory()().initial_arrays(0)  # type: ignore[attr-defined]
    save_weights(initial, tmp_path / "init.safetensors")
    config = CoordinatorConfig.model_validate(
        {
            "server": {"insecure": True, "state_dir": str(tmp_path / "state")},
            "run": {"seed": 11, "rounds": rounds, "stage_timeout_s": 5},
            "model": {"weights": str(tmp_path / "init.safetensors")},
            "strategy": {
                "name": "fedavg",
                "params": {"fraction_train": 0.5, "min_train_clients": 2},
            },
        }
    )
    directory = tmp_path / "state"
    spec = RunSpec(directory, "run", 11, rounds, config, "fedlearn server")
    lifecycle = open_run(spec, Start.AUTO)
    now = [0]

    def run(arrays: Arrays, state: Arrays | None, start: int) -> RunResult:
        coordinator = Coordinator(
            make_strategy(config.strategy),
            InProcessTransport(_factory(fail_rounds="3", fail_client=_available(3)[0])),
            list(range(NUM_CLIENTS)),
            rounds,
            seed=11,
            sink=lifecycle,
            available=lambda: _available(now[0]),
            before_round=lambda rnd: now.__setitem__(0, rnd),
        )
        return coordinator.run(arrays, state, start)

    lifecycle.drive(lambda: initial, run)
    return directory


def test_a_coordinator_run_with_sites_coming_and_going_replays_exactly(tmp_path: Path) -> None:
    directory = _coordinator_run(tmp_path)
    store = RunStore(directory / "run.db", run_id="run", read_only=True)
    recorded = store.rounds()
    store.close()
    assert [r.candidates for r in recorded] == [tuple(_available(r)) for r in range(1, 5)]
    assert [r.train_selected for r in recorded] == [2, 2, 2, 2]  # half of the four there

    with pytest.raises(ConfigError, match="does not name the sites' ClientApp"):
        replay_run(directory)
    replay = replay_run(directory, _factory())  # the sites' app, without its fault
    assert replay.differences == []
    assert replay.rounds[2].train_ok < replay.rounds[2].train_selected  # the failure replayed

    # Without the recorded candidates, round 2 selects half of all six clients: the
    # replay no longer matches (the candidates are what makes it exact)
    with sqlite3.connect(directory / "run.db") as db:
        db.execute("DELETE FROM candidates WHERE round = 2")
    differences = replay_run(directory, _factory()).differences
    assert "round 2: train_selected recorded 2, replayed 3" in differences


def test_a_record_that_does_not_match_its_model_is_reported(tmp_path: Path) -> None:
    directory = _coordinator_run(tmp_path, rounds=2)
    # say that one accepted update of round 2 failed: the model no longer follows from it
    with sqlite3.connect(directory / "run.db") as db:
        cid = db.execute(
            "SELECT client_id FROM client_results WHERE round = 2 AND stage = 'train' AND ok = 1"
        ).fetchone()[0]
        db.execute(
            "UPDATE client_results SET ok = 0, error = 'lost' WHERE round = 2 AND stage = "
            "'train' AND client_id = ?",
            (cid,),
        )
    replay = replay_run(directory, _factory())
    assert f"round 2, train, client {cid}: ok recorded 0, replayed 1" not in replay.differences
    assert "round 2 checkpoint model: array 'w' differs from the replay" in replay.differences
    assert "model.safetensors: array 'w' differs from the replay" in replay.differences
    assert any(d.startswith("round 2: train_ok recorded 2, replayed 1") for d in replay.differences)


def test_a_client_with_no_recorded_result_fails_in_the_replay(tmp_path: Path) -> None:
    directory = _coordinator_run(tmp_path, rounds=2)
    with sqlite3.connect(directory / "run.db") as db:
        db.execute("DELETE FROM client_results WHERE round = 1 AND stage = 'evaluate'")
    replay = replay_run(directory, _factory())
    failed = [c for c in replay.clients if c.round == 1 and c.stage is Stage.EVALUATE]
    assert failed and all(c.error == NOT_RECORDED for c in failed)
    assert any(d.endswith(": replayed only") for d in replay.differences)
    assert not any("differs" in d for d in replay.differences)  # evaluation leaves the model
