"""A run stopped after a committed round resumes to the model an uninterrupted run makes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlearn.config.simulation import load_config
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.run.job import run_job

ROOT = Path(__file__).resolve().parents[1]


class Interrupt(Exception):
    pass


class StopAfter:
    def __init__(self, round: int) -> None:
        self.round = round

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        if round > self.round:
            raise Interrupt

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        pass


def _config(out: Path):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        {
            "run.out_dir": str(out),
            "run.rounds": 4,
            "run.clients": 5,
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "clients.tabular:make_app",
            "strategy.name": "fedadam",
            "strategy.params.min_train_clients": 2,
            "backend.kind": "inprocess",
        },
    )


def test_resume_matches_uninterrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    full_job = run_job(_config(tmp_path / "full"))
    with pytest.raises(Interrupt):
        run_job(_config(tmp_path / "cut"), observer=StopAfter(2))  # type: ignore[arg-type]
    store = RunStore(tmp_path / "cut" / "run.db", run_id="mnist-fedavg")
    assert [r.round for r in store.rounds()] == [1, 2]
    store.close()
    resumed_job = run_job(_config(tmp_path / "cut"), resume=True)
    full, full_dir = full_job.result, full_job.out_dir
    resumed, cut_dir = resumed_job.result, resumed_job.out_dir
    assert [r.round for r in resumed.rounds] == [3, 4]
    a, b = load_weights(full_dir / "model.safetensors"), load_weights(cut_dir / "model.safetensors")
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    # the server optimizer state (FedAdam moments) came back from the checkpoint too
    for name in full.state:
        assert np.array_equal(full.state[name], resumed.state[name]), name
    store = RunStore(cut_dir / "run.db", run_id="mnist-fedavg")
    assert [r.round for r in store.rounds()] == [1, 2, 3, 4]
    store.close()


def test_resume_with_other_config_starts_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    run_job(_config(tmp_path / "r"))
    cfg = _config(tmp_path / "r").model_copy(
        update={"run": _config(tmp_path / "r").run.model_copy(update={"seed": 9})}
    )
    result = run_job(cfg, resume=True).result
    assert [r.round for r in result.rounds] == [1, 2, 3, 4]
