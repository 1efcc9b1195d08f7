"""The fedlearn command end to end: real data, real torch, real SQLite, real files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlearn.cli.main import app
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _simulate(tmp_path: Path, *extra: str) -> tuple[int, str, Path]:
    out = tmp_path / "run"
    args = [
        "simulate",
        "--out",
        str(out),
        "--rounds",
        "2",
        "--clients",
        "6",
        "--set",
        "data.dataset=breast_cancer",
        "--set",
        "data.partitioner=iid",
        "--set",
        "client.app=clients.tabular:make_app",
        "--set",
        "strategy.params.min_train_clients=2",
        *extra,
    ]
    result = runner.invoke(app, args)
    return result.exit_code, result.output, out


def test_simulate_writes_run_directory(tmp_path: Path) -> None:
    code, output, out = _simulate(tmp_path, "--backend", "inprocess")
    assert code == 0, output
    for name in (
        "model.safetensors",
        "run.db",
        "report.json",
        "clients.csv",
        "rounds.csv",
        "metrics_per_round.png",
        "clients_per_round.png",
        "config.json",
    ):
        assert (out / name).is_file(), name
    store = RunStore(out / "run.db", run_id="mnist-fedavg")
    rounds = store.rounds()
    evals = [c for c in store.clients() if c.stage.value == "evaluate"]
    store.close()
    assert [r.round for r in rounds] == [1, 2] and all(r.ok for r in rounds)
    assert sorted({c.client_id for c in evals}) == list(range(6))
    assert all(0.0 <= float(c.metrics["accuracy"]) <= 1.0 for c in evals)
    weights = load_weights(out / "model.safetensors")
    assert all(np.isfinite(a).all() for a in weights.values())
    assert json.loads((out / "config.json").read_text())["run"]["clients"] == 6
    assert "round 2" in output


def test_report_command(tmp_path: Path) -> None:
    code, output, out = _simulate(tmp_path, "--backend", "inprocess")
    assert code == 0, output
    os.remove(out / "clients.csv")
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "clients.csv").is_file()


def test_bad_config_fails_with_field_name(tmp_path: Path) -> None:
    code, output, _ = _simulate(tmp_path, "--set", "data.alpha=-1")
    assert code == 2 and "data.alpha" in output
    code, output, _ = _simulate(tmp_path, "--strategy", "nosuch")
    assert code == 2 and "nosuch" in output
    code, output, _ = _simulate(tmp_path, "--set", "client.params.nosuch=1")
    assert code == 2 and "nosuch" in output


def test_report_of_missing_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_shakespeare_natural_partition_runs(tmp_path: Path) -> None:
    out = tmp_path / "shk"
    args = [
        "simulate",
        "simulations/shakespeare.toml",
        "--out",
        str(out),
        "--rounds",
        "1",
        "--clients",
        "4",
        "--backend",
        "inprocess",
        "--set",
        "strategy.params.min_train_clients=2",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    store = RunStore(out / "run.db", run_id="shakespeare-fedavg")
    evals = [c for c in store.clients() if c.stage.value == "evaluate"]
    store.close()
    assert len(evals) == 4 and all(c.ok for c in evals)
