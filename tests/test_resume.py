"""The run lifecycle in simulation: resume rules, conflicts, moving a run aside.

A run is stopped after a committed round by an observer that raises; the same run then
resumes. Identity changes are refused with the differing fields listed and nothing
touched; operational changes are recorded with the round they take effect from; a
finished run is left alone; more rounds continue it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlearn.config.simulation import SimulationConfig, load_config
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.errors import RunConflict
from fedlearn.run.job import run_job
from fedlearn.run.lifecycle import RunSpec, Start, open_run
from run_state import snapshot

ROOT = Path(__file__).resolve().parents[1]
RUN = "mnist-fedavg"  # the default run name


class Interrupt(Exception):
    pass


class StopAfter:
    """Raises once round ``round`` has committed (before the next one starts)."""

    def __init__(self, round: int) -> None:
        self.round = round

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        if round > self.round:
            raise Interrupt

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        pass


def _config(out: Path, **overrides: Any) -> SimulationConfig:
    settings: dict[str, Any] = {
        "run.out_dir": str(out),
        "run.rounds": 4,
        "run.clients": 5,
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "clients.tabular:make_app",
        "client.params": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "strategy.name": "fedadam",
        "strategy.params.min_train_clients": 2,
        "backend.kind": "inprocess",
        "publish.enabled": False,
    }
    settings.update(overrides)
    return load_config(None, settings)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the client app is named "clients.tabular:make_app"


def _cut(out: Path, after: int, **overrides: Any) -> None:
    with pytest.raises(Interrupt):
        run_job(_config(out, **overrides), observer=StopAfter(after))  # type: ignore[arg-type]


def _rounds(out: Path) -> list[int]:
    store = RunStore(out / "run.db", run_id=RUN)
    try:
        return [r.round for r in store.rounds()]
    finally:
        store.close()


def _same_model(a_dir: Path, b_dir: Path) -> None:
    a, b = load_weights(a_dir / "model.safetensors"), load_weights(b_dir / "model.safetensors")
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_resume_matches_uninterrupted(tmp_path: Path) -> None:
    full = run_job(_config(tmp_path / "full"))
    _cut(tmp_path / "cut", after=2)
    assert _rounds(tmp_path / "cut") == [1, 2]
    resumed = run_job(_config(tmp_path / "cut"), resume=True)
    assert resumed.result is not None and full.result is not None
    assert [r.round for r in resumed.result.rounds] == [3, 4]
    assert [r.round for r in resumed.outcome.rounds] == [1, 2, 3, 4]
    assert resumed.outcome.status == "finished"
    _same_model(tmp_path / "full", tmp_path / "cut")
    # the server optimizer state (FedAdam moments) came back from the checkpoint too
    for name in full.result.state:
        assert np.array_equal(full.result.state[name], resumed.result.state[name]), name
    assert _rounds(tmp_path / "cut") == [1, 2, 3, 4]


def test_a_failed_run_says_so_and_resumes(tmp_path: Path) -> None:
    _cut(tmp_path / "r", after=1)
    store = RunStore(tmp_path / "r" / "run.db", run_id=RUN)
    assert store.run_info()["status"] == "failed"
    assert [e.kind for e in store.events()] == ["started", "failed"]
    store.close()
    job = run_job(_config(tmp_path / "r"), resume=True)
    assert job.outcome.status == "finished"
    store = RunStore(tmp_path / "r" / "run.db", run_id=RUN)
    assert [(e.kind, e.round) for e in store.events()] == [
        ("started", 0),
        ("failed", 1),
        ("resumed", 1),
        ("finished", 4),
    ]
    store.close()


def test_operational_changes_resume_bit_identically_and_are_recorded(tmp_path: Path) -> None:
    run_job(_config(tmp_path / "full"))
    _cut(tmp_path / "cut", after=2)
    changed = {
        "backend.kind": "pool",
        "backend.workers": 1,
        "run.evaluate_every": 2,
    }
    job = run_job(_config(tmp_path / "cut", **changed), resume=True)
    assert job.result is not None
    assert [r.round for r in job.result.rounds] == [3, 4]
    _same_model(tmp_path / "full", tmp_path / "cut")
    store = RunStore(tmp_path / "cut" / "run.db", run_id=RUN)
    recorded = {(c.round, c.field, c.old, c.new) for c in store.config_changes()}
    assert recorded == {
        (3, "backend.kind", "inprocess", "pool"),
        (3, "backend.workers", None, 1),
        (3, "run.evaluate_every", 1, 2),
    }
    assert store.run_info()["config"]["backend"]["kind"] == "pool"  # the current config
    store.close()
    assert 'changed from round 3: backend.kind: "inprocess" -> "pool"' in job.outcome.notes


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("strategy.params.eta", 0.5, "strategy.params.eta: null -> 0.5"),
        ("run.seed", 3, "run.seed: 0 -> 3"),
        ("data.partitioner", "dirichlet", 'data.partitioner: "iid" -> "dirichlet"'),
        ("client.params.lr", 0.2, "client.params.lr: 0.1 -> 0.2"),
        ("run.name", "other", 'run.name: "mnist-fedavg" -> "other"'),
    ],
)
def test_an_identity_change_is_refused_and_nothing_is_touched(
    tmp_path: Path, field: str, value: object, shown: str
) -> None:
    out = tmp_path / "r"
    _cut(out, after=2)
    before = snapshot(out)
    with pytest.raises(RunConflict) as refused:
        run_job(_config(out, **{field: value}), resume=True)
    message = str(refused.value)
    assert shown in message
    assert "--new-run" in message and f"{out}.1" in message and "another directory" in message
    assert snapshot(out) == before


def test_a_finished_run_is_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "r"
    run_job(_config(out))
    before = snapshot(out)
    job = run_job(_config(out, **{"backend.workers": 2}), resume=True)
    assert job.outcome.already_finished and job.result is None
    assert job.outcome.status == "finished"
    assert "already finished (4 rounds)" in job.outcome.notes[0]
    assert snapshot(out) == before


def test_more_rounds_continue_a_finished_run(tmp_path: Path) -> None:
    run_job(_config(tmp_path / "six", **{"run.rounds": 6}))
    out = tmp_path / "four"
    run_job(_config(out))
    job = run_job(_config(out, **{"run.rounds": 6}), resume=True)
    assert job.result is not None
    assert [r.round for r in job.result.rounds] == [5, 6]
    assert _rounds(out) == [1, 2, 3, 4, 5, 6]
    _same_model(tmp_path / "six", out)
    store = RunStore(out / "run.db", run_id=RUN)
    assert [(c.round, c.field, c.old, c.new) for c in store.config_changes()] == [
        (5, "run.rounds", 4, 6)
    ]
    assert store.run_info()["status"] == "finished"
    store.close()


def test_starting_over_an_existing_run_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r"
    run_job(_config(out))
    before = snapshot(out)
    for config in (_config(out), _config(out, **{"strategy.name": "fedavg"})):
        with pytest.raises(RunConflict, match="--new-run"):
            run_job(config)
        assert snapshot(out) == before


def test_new_run_moves_the_old_run_aside(tmp_path: Path) -> None:
    out = tmp_path / "r"
    run_job(_config(out))
    before = snapshot(out)
    job = run_job(_config(out, **{"strategy.name": "fedavg"}), new_run=True)
    assert job.outcome.status == "finished"
    assert snapshot(tmp_path / "r.1") == before  # the old run, whole, beside the new one
    assert f"moved to {tmp_path / 'r.1'}" in job.outcome.notes[0]
    store = RunStore(out / "run.db", run_id=RUN)
    assert store.run_info()["config"]["strategy"]["name"] == "fedavg"
    store.close()
    run_job(_config(out), new_run=True)  # again: the next free name
    assert (tmp_path / "r.2" / "run.db").is_file()


def test_resume_without_a_run_starts_one(tmp_path: Path) -> None:
    job = run_job(_config(tmp_path / "r", **{"run.rounds": 1}), resume=True)
    assert job.outcome.status == "finished"
    assert job.outcome.notes == [f"no run to resume in {tmp_path / 'r'}; starting it"]


def test_one_process_at_a_time_holds_a_run_directory(tmp_path: Path) -> None:
    config = _config(tmp_path / "r")
    spec = RunSpec(tmp_path / "r", RUN, 0, 4, config, "resume")
    held = open_run(spec, Start.NEW)
    try:
        with pytest.raises(RunConflict, match="in use by another fedlearn process"):
            run_job(config, resume=True)
    finally:
        held.close()
    assert run_job(config, resume=True).outcome.status == "finished"


def test_new_run_and_resume_exclude_each_other(tmp_path: Path) -> None:
    from fedlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="--new-run"):
        run_job(_config(tmp_path / "r"), resume=True, new_run=True)
