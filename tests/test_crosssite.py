"""Cross-site evaluation: the version x site matrix, its exports, and the publish gate's
``max_site_regression`` rule (issue 13, acceptance 1)."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlearn.cli.main import app as cli
from fedlearn.config.simulation import SimulationConfig, load_config
from fedlearn.crosssite.evaluate import evaluate_sites, train_locally
from fedlearn.crosssite.matrix import read_matrix
from fedlearn.engine.client_app import ClientContext, EvaluateResult
from fedlearn.engine.records import Arrays
from fedlearn.engine.store import RunStore
from fedlearn.registry.model_registry import Gate, ModelRegistry, _judge
from fedlearn.report.plots import can_plot
from fedlearn.run.job import client_app_factory, run_job

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 10


def _settings(tmp_path: Path, clients: int = CLIENTS) -> dict[str, Any]:
    return {
        "run.name": "digits",
        "run.rounds": 2,
        "run.clients": clients,
        "run.out_dir": str(tmp_path / "run"),
        "data.dataset": "digits",
        "data.partitioner": "dirichlet",
        "data.alpha": 0.3,
        "client.app": "clients.tabular:make_app",
        "client.params": {"epochs": 1, "lr": 0.1, "hidden": 0},
        "backend.kind": "inprocess",
        "publish.model": "digits",
        "publish.registry": str(tmp_path / "registry"),
    }


def _set_args(settings: dict[str, Any]) -> list[str]:
    args = []
    for key, value in settings.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
            args += ["--set", f"{key}={{{inner}}}"]
        else:
            args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def _direct(config: SimulationConfig, arrays: Arrays) -> list[EvaluateResult]:
    """Each client's own evaluation of ``arrays``, called here, not through a run."""
    app = client_app_factory(config)()
    return [app.evaluate(arrays, {}, ClientContext(cid, 0, 0)) for cid in range(CLIENTS)]


def _accuracies(results: list[EvaluateResult]) -> np.ndarray:
    return np.array([float(r.metrics["accuracy"]) for r in results])


def test_matrix_equals_direct_evaluation_and_the_gate_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    settings = _settings(tmp_path)
    config = load_config(None, settings)
    job = run_job(config)  # publishes v1, the first production
    assert [p.version.version for p in job.published] == [1]
    registry_root = tmp_path / "registry"
    with ModelRegistry(registry_root) as registry:
        v1 = registry.get("digits", 1)
        base = registry.load("digits", 1)

    # v2: v1 with one class's output switched off -- the class whose loss hurts one site
    # far more than any other (found by evaluating each choice directly); v3: v1 with a
    # little noise
    before = _accuracies(_direct(config, base))

    def suppressed(cls: int) -> Arrays:
        arrays = {k: v.copy() for k, v in base.items()}
        arrays["bias"][cls] -= 1e3
        return arrays

    def gap(cls: int) -> float:
        drops = np.sort(before - _accuracies(_direct(config, suppressed(cls))))
        return float(drops[-1] - drops[-2])

    bad = suppressed(max(range(10), key=gap))
    rng = np.random.default_rng(0)
    ok = {k: v + rng.normal(0, 1e-3, v.shape).astype(v.dtype) for k, v in base.items()}
    with ModelRegistry(registry_root) as registry:
        for arrays in (bad, ok):
            registry.publish(
                "digits",
                arrays,
                run="constructed",
                round=0,
                metrics=v1.metrics,
                client_summary=None,
                factory=v1.factory,
                factory_params=v1.factory_params,
                signature=v1.signature,
            )

    runner = CliRunner()
    out = tmp_path / "sites"
    result = runner.invoke(
        cli,
        [
            "evaluate-sites",
            *_set_args(settings),
            "--version",
            "production",
            "--version",
            "2",
            "--version",
            "digits:3",
            "--out",
            str(out),
            "--name",
            "e1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "attached to 3 registry version(s)" in result.output

    # the matrix, read back from the run store: 3 versions x 10 sites, every value equal
    # to the client's own evaluate() with that version's weights
    matrix = read_matrix(out / "run.db", "e1")
    assert [e.label for e in matrix.entries] == ["digits v1", "digits v2", "digits v3"]
    assert "production" in matrix.entries[0].aliases
    assert len(matrix.cells) == 3 * CLIENTS and all(c.ok for c in matrix.cells)
    direct = {}
    for label, arrays in (("digits v1", base), ("digits v2", bad), ("digits v3", ok)):
        direct[label] = _direct(config, arrays)
        for cid, expected in enumerate(direct[label]):
            cell = matrix.cell(label, cid)
            assert cell is not None
            assert cell.num_examples == expected.num_examples
            assert cell.loss == expected.loss
            assert cell.metrics == expected.metrics
    assert matrix.metrics() == ["accuracy", "loss"]

    # summaries and deltas, by hand
    acc = {label: _accuracies(results) for label, results in direct.items()}
    s2 = matrix.summary("digits v2", "accuracy")
    assert s2 is not None
    assert s2.worst == acc["digits v2"].min() and s2.best == acc["digits v2"].max()
    assert s2.worst_site == str(int(np.argmin(acc["digits v2"])))
    assert s2.spread == pytest.approx(acc["digits v2"].max() - acc["digits v2"].min())
    assert s2.mean == pytest.approx(acc["digits v2"].mean())
    drops = acc["digits v1"] - acc["digits v2"]
    deltas = matrix.deltas("digits v1", "accuracy")["digits v2"]
    assert [deltas[str(c)] for c in range(CLIENTS)] == pytest.approx(-drops)

    # the construction: one site clearly worse than every other
    order = np.argsort(-drops)
    site, runner_up = int(order[0]), int(order[1])
    assert drops[site] > drops[runner_up] + 0.1
    limit = float((drops[site] + drops[runner_up]) / 2)
    assert (acc["digits v1"] - acc["digits v3"]).max() <= limit

    # exports: CSV rows and JSON agree with the store
    files = out / "e1"
    with open(files / "matrix.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * CLIENTS
    row = next(r for r in rows if r["entry"] == "digits v2" and r["site"] == str(site))
    assert float(row["accuracy"]) == acc["digits v2"][site]
    document = json.loads((files / "matrix.json").read_text())
    assert document["baseline"] == "digits v1"
    assert document["matrix"]["accuracy"]["digits v2"][str(site)] == acc["digits v2"][site]
    assert (files / "matrix.png").is_file() == can_plot()
    with open(files / "summary.csv") as f:
        summary = {(r["entry"], r["metric"]): r for r in csv.DictReader(f)}
    assert summary[("digits v2", "accuracy")]["worst_site"] == str(site)

    # the gate: the aggregate rule is left loose so that the site rule decides
    with ModelRegistry(registry_root) as registry:
        attached = registry.site_results("digits", 2)
        assert list(attached) == ["e1"] and len(attached["e1"]) == CLIENTS
        assert _judge(registry.get("digits", 2), v1, Gate("accuracy", tolerance=1.0)).promoted
    refused = runner.invoke(
        cli,
        [
            "models",
            "promote",
            "digits",
            "2",
            "--registry",
            str(registry_root),
            "--tolerance",
            "1",
            "--max-site-regression",
            f"{limit}",
        ],
    )
    assert refused.exit_code == 1, refused.output
    text = " ".join(refused.output.split())
    assert f"at site {site} accuracy=" in text and "max_site_regression" in text
    with ModelRegistry(registry_root) as registry:
        decision = registry.promote(
            "digits", 3, Gate("accuracy", tolerance=1.0, max_site_regression=limit)
        )
        assert decision.promoted, decision.reason
        assert f"every one of {CLIENTS} sites within max_site_regression" in decision.reason
        assert registry.aliases("digits")["production"] == 3
        last = registry.decisions("digits")[-2]
        assert (last.version, last.promoted) == (2, False) and f"site {site}" in last.reason


def test_without_a_shared_evaluation_the_site_rule_is_not_applied(tmp_path: Path) -> None:
    arrays = {"w": np.zeros(2, dtype=np.float32)}
    signature = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
    with ModelRegistry(tmp_path) as registry:
        for value in (0.8, 0.8):
            registry.publish(
                "m",
                arrays,
                run="r",
                round=1,
                metrics={"accuracy": value},
                client_summary=None,
                factory="clients.tabular:build_model",
                signature=signature,
            )
        gate = Gate("accuracy", max_site_regression=0.01)
        assert registry.promote("m", 1, gate).promoted
        decision = registry.promote("m", 2, gate)
        assert decision.promoted and "max_site_regression not applied" in decision.reason


def test_local_models_are_each_sites_own_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    settings = {**_settings(tmp_path, clients=3), "run.rounds": 1}
    config = load_config(None, settings)
    run_job(config)
    result = evaluate_sites(
        config,
        registry=tmp_path / "registry",
        out=tmp_path / "sites",
        local=True,
        local_rounds=2,
        evaluation="e-local",
        attach=False,
    )
    matrix = result.matrix
    assert [e.label for e in matrix.entries] == ["digits v1", "local 0", "local 1", "local 2"]
    app = client_app_factory(config)()
    initial = app.initial_arrays(0)  # type: ignore[attr-defined]
    for owner in range(3):
        own = train_locally(app, initial, owner, 2, 0)
        for cid in range(3):
            expected = app.evaluate(own, {}, ClientContext(cid, 0, 0))
            cell = matrix.cell(f"local {owner}", cid)
            assert cell is not None and cell.loss == expected.loss
            assert cell.metrics == expected.metrics
    with ModelRegistry(tmp_path / "registry") as registry:
        assert registry.site_results("digits", 1) == {}  # attach=False
    store = RunStore(tmp_path / "sites" / "run.db", run_id="e-local", read_only=True)
    try:
        assert store.run_info()["status"] == "finished"
        assert len(store.site_evaluations()) == 4 * 3
    finally:
        store.close()


def test_deployed_sites_evaluate_through_the_coordinator(tmp_path: Path) -> None:
    from deployment import APP, PARAMS, Deployment, simulated_data
    from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
    from fedlearn.config.loading import load_toml
    from fedlearn.crosssite.deployed import evaluate_deployed
    from fedlearn.deploy.launch import build_site
    from fedlearn.engine.references import resolve

    d = Deployment(tmp_path, num_sites=3, rounds=1)
    registry_root = tmp_path / "registry"
    rng = np.random.default_rng(1)
    versions = [
        d.initial,
        {k: v + rng.normal(0, 0.5, v.shape).astype(v.dtype) for k, v in d.initial.items()},
    ]
    with ModelRegistry(registry_root) as registry:
        for arrays in versions:
            registry.publish(
                "bc",
                arrays,
                run="run",
                round=1,
                metrics={"accuracy": 0.5},
                client_summary=None,
                factory="clients.tabular:build_model",
                factory_params={"in_features": 30, "num_classes": 2, "hidden": 32},
                signature={
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
                },
            )
    config = load_toml(CoordinatorConfig, d.root / "coordinator.toml")
    ready = threading.Event()
    outcome: dict[str, Any] = {}

    def evaluate() -> None:
        try:
            outcome["result"] = evaluate_deployed(
                config,
                registry=registry_root,
                out=tmp_path / "sites",
                model="bc",
                evaluation="deployed",
                on_ready=lambda port: ready.set(),
            )
        except BaseException as exc:
            outcome["error"] = exc
            ready.set()

    coordinator = threading.Thread(target=evaluate, daemon=True)
    coordinator.start()
    assert ready.wait(30)
    stops, threads = [], []
    for i in range(3):
        site = build_site(load_toml(SiteConfig, d.root / f"site-{i}.toml"))
        stop = threading.Event()
        thread = threading.Thread(target=site.run, args=(stop,), daemon=True)
        thread.start()
        stops.append(stop)
        threads.append(thread)
    coordinator.join(120)
    for stop in stops:
        stop.set()
    for thread in threads:
        thread.join(10)
    assert "error" not in outcome, outcome.get("error")
    matrix = outcome["result"].matrix
    assert [e.label for e in matrix.entries] == ["bc v1", "bc v2"]
    assert sorted(matrix.sites.values()) == ["site-0", "site-1", "site-2"]
    # each cell is the site app's own evaluation of that version on its data
    app = resolve(APP, "client.app")(simulated_data(3, d.seed), **PARAMS)
    for label, arrays in zip(("bc v1", "bc v2"), versions, strict=True):
        for cid in matrix.sites:
            expected = app.evaluate(arrays, {}, ClientContext(cid, 0, 0))
            cell = matrix.cell(label, cid)
            assert cell is not None and cell.ok
            assert (cell.loss, cell.metrics) == (expected.loss, expected.metrics)
    assert read_matrix(tmp_path / "sites" / "run.db", "deployed").cells == matrix.cells
    with ModelRegistry(registry_root) as registry:
        assert list(registry.site_results("bc", 2)) == ["deployed"]


def test_evaluate_sites_refuses_a_config_and_a_coordinator_together(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["evaluate-sites", "x.toml", "--coordinator", str(tmp_path / "c.toml")]
    )
    assert result.exit_code == 2
    assert "--coordinator evaluates on the deployed sites" in " ".join(result.output.split())
