"""A site daemon runs a Flower app project unchanged: over TLS on loopback the run equals
the simulation of the same ClientApp."""

from __future__ import annotations

import os
from pathlib import Path

import flower_projects

from deployment import FAULT_APP, FAULT_PARAMS, Deployment, in_process_coordinator
from fedlearn.apps.flower_project import make_client_app, plan_server, read_project
from fedlearn.config.deployment import SiteConfig
from fedlearn.config.loading import load_toml
from fedlearn.engine.messages import Stage
from fedlearn.engine.weights import save_weights
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SITES = 2


def _site_config(d: Deployment, i: int, project: Path) -> Path:
    path = d.root / f"site-{i}.toml"
    path.write_text(
        f"""
[coordinator]
address = "127.0.0.1:{d.port}"
ca = "{d.pki.ca_cert}"
backoff_initial_s = 0.2
backoff_max_s = 1.0
exit_when_finished = true

[site]
name = "site-{i}"
key = "{d.root / f"site-{i}.key"}"

[client]
flower_app = "{project}"
node_config = {{ "partition-id" = {i}, "num-partitions" = {SITES} }}
run_config = {{ "local-epochs" = 2 }}
"""
    )
    return path


def test_site_daemons_run_a_flower_app_and_the_run_equals_the_simulation(tmp_path: Path) -> None:
    project = flower_projects.numpy_project(tmp_path / "app", "fl_numpy_sites", nodes=SITES)
    info = read_project(project)
    run_config = {**info.config, "local-epochs": 2}
    plan = plan_server(info, run_config, SITES)
    d = Deployment(
        tmp_path / "deploy",
        num_sites=SITES,
        rounds=2,
        app=FAULT_APP,  # only for the harness's own setup; the sites below run the Flower app
        params=dict(FAULT_PARAMS),
        strategy=plan.strategy_name,
        strategy_params=dict(plan.strategy_params),
    )
    save_weights(plan.initial_arrays, d.root / "init.safetensors")
    for i in range(SITES):
        config = load_toml(SiteConfig, _site_config(d, i, project))
        assert config.data is None and config.client.flower_app == str(project)
    with in_process_coordinator(d) as c:
        for i in range(SITES):
            c.start_site(i)
        result = c.wait(60)
    assert [r.ok for r in result.rounds] == [True, True]
    evals = [r for r in result.clients if r.stage is Stage.EVALUATE]
    assert sorted(r.client_id for r in evals) == [0, 0, 1, 1]
    assert all(r.ok and "eval_acc" in r.metrics for r in evals)

    app = make_client_app(info, run_config, plan, num_partitions=SITES)
    simulated = run_simulation(
        lambda: app,
        build_strategy(plan.strategy_name, plan.strategy_params),
        num_clients=SITES,
        rounds=2,
        initial_arrays=plan.initial_arrays,
        seed=d.seed,
    )
    assert list(result.arrays) == list(simulated.arrays) == ["0", "1"]
    for name in result.arrays:
        assert result.arrays[name].tobytes() == simulated.arrays[name].tobytes(), name
    ours = sorted((r.client_id, r.round, r.metrics["eval_acc"]) for r in evals)
    theirs = sorted(
        (r.client_id, r.round, r.metrics["eval_acc"])
        for r in simulated.clients
        if r.stage is Stage.EVALUATE
    )
    assert ours == theirs
