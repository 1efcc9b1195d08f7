"""Flower app projects (laid out as ``flwr new`` does) run through
``fedlearn simulate --flower-app`` with their run_config; what they cannot be mapped from
is refused with a clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import flower_projects

from fedlearn.apps.flower_project import (
    fuse_run_config,
    make_client_app,
    parse_run_config,
    plan_server,
    read_project,
)
from fedlearn.cli.main import app as cli
from fedlearn.engine.messages import Stage
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.errors import ConfigError
from fedlearn.simulation import run_simulation
from fedlearn.strategy import FedAvg, FedProx


def _simulate(*args: str) -> str:
    result = CliRunner().invoke(cli, ["simulate", *args, "--no-check-serving"])
    assert result.exit_code == 0, result.output
    return result.output


def _store(run: Path) -> RunStore:
    name = json.loads((run / "config.json").read_text())["run"]["name"]
    return RunStore(run / "run.db", run_id=name)


def test_numpy_app_runs_with_its_run_config(tmp_path: Path) -> None:
    """The numpy template: 10 nodes from its federation, num-server-rounds and
    local-epochs from --run-config, FedAvg(fraction_train=0.5) from its ServerApp: 5 of
    10 clients train per round, all 10 evaluate, each one's metrics are stored and
    reported; the model is the one run_simulation makes from the same parts."""
    project = flower_projects.numpy_project(tmp_path / "app", "fl_numpy_cli")
    run = tmp_path / "run"
    out = _simulate(
        "--flower-app",
        str(project),
        "--run-config",
        "num-server-rounds=2 local-epochs=2",
        "--out",
        str(run),
        "--backend",
        "inprocess",
    )
    assert "fl-numpy-cli" in out
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["rounds"] == 2 and config["run"]["clients"] == 10
    assert config["strategy"] == {
        "name": "fedavg",
        "params": {
            "fraction_train": 0.5,
            "fraction_evaluate": 1.0,
            "min_train_clients": 2,
            "min_evaluate_clients": 2,
        },
    }
    assert config["flower"]["run_config"] == {"num-server-rounds": 2, "local-epochs": 2}
    store = _store(run)
    rounds = store.rounds()
    train = store.clients(Stage.TRAIN)
    evals = store.clients(Stage.EVALUATE)
    store.close()
    assert [r.train_selected for r in rounds] == [5, 5]
    assert sorted(c.client_id for c in evals if c.round == 2) == list(range(10))
    assert all(0.0 <= c.metrics["eval_acc"] <= 1.0 for c in evals)
    assert all(c.loss == c.metrics["eval_loss"] for c in evals)
    assert all("train_loss" in c.metrics for c in train)
    assert rounds[-1].eval_metrics["eval_acc"] > 0.8  # softmax regression on digits learns
    report = json.loads((run / "report.json").read_text())
    assert "eval_acc" in json.dumps(report)
    assert "eval_acc" in (run / "clients.csv").read_text()

    # the same parts through the Python API: the same model, bit for bit
    info = read_project(project)
    run_config = fuse_run_config(info.config, {"num-server-rounds": 2, "local-epochs": 2})
    plan = plan_server(info, run_config, 10)
    app = make_client_app(info, run_config, plan, num_partitions=10)
    direct = run_simulation(
        lambda: app,
        FedAvg(fraction_train=0.5, min_train_clients=2, min_evaluate_clients=2),
        num_clients=10,
        rounds=2,
    )
    final = load_weights(run / "model.safetensors")
    assert list(final) == ["0", "1"]
    for name in final:
        assert final[name].tobytes() == direct.arrays[name].tobytes()


def test_torch_app_runs_on_the_pool(tmp_path: Path) -> None:
    """The PyTorch template (state_dict keys in the ArrayRecord), on the worker pool."""
    project = flower_projects.torch_project(tmp_path / "app", "fl_torch_cli")
    run = tmp_path / "run"
    _simulate(
        *("--flower-app", str(project), "--out", str(run), "--backend", "pool", "--workers", "2")
    )
    final = load_weights(run / "model.safetensors")
    assert list(final) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert final["fc1.weight"].shape == (16, 64) and final["fc1.weight"].dtype == np.float32
    store = _store(run)
    evals = store.clients(Stage.EVALUATE)
    rounds = store.rounds()
    store.close()
    assert len(rounds) == 2 and all(r.ok for r in rounds)
    assert sorted({c.client_id for c in evals}) == [0, 1, 2, 3]
    assert rounds[1].eval_metrics["eval_loss"] < rounds[0].eval_metrics["eval_loss"] + 0.5


def test_server_strategy_and_settings_map(tmp_path: Path) -> None:
    project = flower_projects.numpy_project(
        tmp_path, "fl_prox", strategy="FedProx", extra=", proximal_mu=0.3, fraction_evaluate=0.4"
    )
    info = read_project(project)
    plan = plan_server(info, info.config, 10)
    assert plan.strategy_name == "fedprox"
    assert plan.strategy_params == {
        "fraction_train": 0.5,
        "fraction_evaluate": 0.4,
        "min_train_clients": 2,
        "min_evaluate_clients": 2,
        "proximal_mu": 0.3,
    }
    assert plan.rounds == 3 and plan.train_config == {"lr": 0.5}
    assert [a.shape for a in plan.initial_arrays.values()] == [(64, 10), (10,)]
    FedProx(**plan.strategy_params)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="min_available_nodes = 2 but the run has 1"):
        plan_server(info, info.config, 1)


def test_run_config_is_parsed_as_flower_spells_it() -> None:
    assert parse_run_config(['a=1 b=0.5 c=true d="x y"', "e='z'"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "x y",
        "e": "z",
    }
    with pytest.raises(ConfigError, match="not a TOML value"):
        parse_run_config("name=bare")
    with pytest.raises(ConfigError, match="'nope' not in the app's"):
        fuse_run_config({"lr": 0.1}, {"nope": 1})


def test_directory_without_a_flower_app(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["simulate", "--flower-app", str(tmp_path)])
    assert result.exit_code == 2
    assert "no pyproject.toml there" in result.output
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"no \[tool.flwr.app.components\]"):
        read_project(tmp_path)


def test_custom_server_loop_is_refused_with_a_way_out(tmp_path: Path) -> None:
    project = flower_projects.custom_loop_project(tmp_path, "fl_custom_loop")
    result = CliRunner().invoke(cli, ["simulate", "--flower-app", str(project)])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "runs a custom loop" in text and "grid.send_and_receive" in text
    assert "fedlearn Strategy subclass" in text and "strategy.name=module:Class" in text


PEER_APP = Path(__file__).resolve().parents[1] / "benchmarks" / "flower_peer_app"


def _peer_dir() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        if (parent / "shared" / "peers" / "flower" / "sim_bench.py").is_file():
            return parent / "shared" / "peers" / "flower"
    return None


@pytest.mark.skipif(_peer_dir() is None, reason="the Flower peer workload is not checked out")
def test_the_flower_peer_workload_runs_under_fedlearn_simulate(tmp_path: Path) -> None:
    """sim_bench.py's own ClientApp and ServerApp (benchmarks/flower_peer_app imports
    them) through ``fedlearn simulate --flower-app``: the final model is FedAvg's, by a
    numpy loop over sim_bench's own data and training, to 1e-12."""
    import sys

    out = tmp_path / "run"
    _simulate(
        "--flower-app",
        str(PEER_APP),
        "--clients",
        "10",
        "--run-config",
        "num-clients=10 num-server-rounds=2",
        "--out",
        str(out),
        "--set",
        "backend.kind=inprocess",
    )
    sim_bench = sys.modules["sim_bench"]
    w, b = np.zeros(sim_bench.D), np.zeros(1)
    for _ in range(2):
        updates = []
        for pid in range(10):
            x, y, _, _ = sim_bench.make_data(pid)
            updates.append((len(y), *sim_bench.local_train(w, b, x, y, lr=sim_bench.LR)))
        total = sum(n for n, _, _ in updates)
        w = sum((n / total) * wk for n, wk, _ in updates)
        b = sum((n / total) * bk for n, _, bk in updates)
    final = load_weights(out / "model.safetensors")
    np.testing.assert_allclose(final["0"], w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(final["1"], b, rtol=0, atol=1e-12)
    assert np.abs(w).max() > 0.1
    evaluated = [c for c in _store(out).clients(Stage.EVALUATE) if c.round == 2]
    assert sorted(c.client_id for c in evaluated) == list(range(10))
