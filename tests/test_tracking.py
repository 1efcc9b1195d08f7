"""Run tracking in MLflow against an offline sqlite store (issue 13, acceptance 4): a run's
params, per-round metrics (ε included), per-client tables and report as artifacts, and
the link to the registry version both ways; a tracking failure never fails or loses the
run; the coordinator tracks the same way."""

from __future__ import annotations

import csv
import io
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from deployment import Deployment, in_process_coordinator
from fedlearn.config.simulation import load_config
from fedlearn.engine.messages import Stage
from fedlearn.engine.store import RunStore
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.run.identity import as_stored, flatten
from fedlearn.run.job import run_job
from fedlearn.tracking import Tracking
from fedlearn.tracking.mlflow_run import MlflowRun, public_uri

ROOT = Path(__file__).resolve().parents[1]

# MLflow's SQLAlchemy store uses a loader strategy SQLAlchemy 2.1 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record (and refuse) every outgoing socket connection."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite tracking store for the module (creating one runs MLflow's migrations);
    each test has its own experiment in it."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def tracking(store_uri: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    return {
        "tracking.mlflow_uri": store_uri,
        "tracking.experiment": request.node.name,
        "tracking.artifact_location": (tmp_path / "artifacts").as_uri(),
    }


def _config(tmp_path: Path, tracking: dict[str, Any], **extra: Any):  # type: ignore[no-untyped-def]
    settings: dict[str, Any] = {
        "run.name": "bc",
        "run.rounds": 3,
        "run.clients": 10,
        "run.out_dir": str(tmp_path / "run"),
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "clients.tabular:make_app",
        "client.params": {"epochs": 1, "lr": 0.05, "hidden": 0},
        "strategy.params.fraction_train": 0.5,
        "backend.kind": "inprocess",
        "publish.every": 2,
        "publish.registry": str(tmp_path / "registry"),
        **tracking,
    }
    settings.update(extra)
    return load_config(None, settings)


def _client(tracking: dict[str, Any]) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking["tracking.mlflow_uri"])


def _only_run(client: MlflowClient, tracking: dict[str, Any]) -> Any:
    experiment = client.get_experiment_by_name(tracking["tracking.experiment"])
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_simulation_is_tracked_with_its_registry_link(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_network: list[Any],
    tracking: dict[str, Any],
) -> None:
    monkeypatch.chdir(ROOT)
    config = _config(
        tmp_path,
        tracking,
        **{
            "privacy.mode": "central",
            "privacy.noise_multiplier": 1.0,
            "privacy.clip": 1.0,
            "privacy.delta": 1e-3,
            "privacy.noise": "seeded",
        },
    )
    job = run_job(config)
    assert job.outcome.status == "finished"
    assert [p.version.version for p in job.published] == [1, 2]  # round 2, then the final

    client = _client(tracking)
    run = _only_run(client, tracking)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "bc"
    # params: the whole config, flattened
    expected = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(as_stored(config)).items()
    }
    assert run.data.params == expected
    assert run.data.params["client.params.lr"] == "0.05"

    # per-round metrics, step = round, the same numbers as the run store
    store = RunStore(tmp_path / "run" / "run.db", run_id="bc", read_only=True)
    try:
        rounds = store.rounds()
        privacy = store.privacy_rows()
        clients = store.clients()
    finally:
        store.close()
    assert _history(client, run_id, "accuracy") == [
        (r.round, r.eval_metrics["accuracy"]) for r in rounds
    ]
    assert _history(client, run_id, "round/eval_ok") == [(r.round, r.eval_ok) for r in rounds]
    assert _history(client, run_id, "dp.epsilon") == [(p.round, p.epsilon) for p in privacy]
    assert len(privacy) == 3 and privacy[0].epsilon < privacy[-1].epsilon
    worst = min(
        float(c.metrics["accuracy"]) for c in clients if c.round == 3 and c.stage is Stage.EVALUATE
    )
    assert _history(client, run_id, "clients/accuracy_worst")[-1] == (3, worst)

    # artifacts: a client table per round, and the report
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert artifacts >= {"clients", "report"}
    tables = sorted(a.path for a in client.list_artifacts(run_id, "clients"))
    assert tables == [f"clients/round-000{r}.csv" for r in (1, 2, 3)]
    local = Path(client.download_artifacts(run_id, "clients/round-0002.csv", str(tmp_path)))
    rows = list(csv.DictReader(io.StringIO(local.read_text())))
    assert [(int(r["client_id"]), r["stage"]) for r in rows] == [
        (c.client_id, c.stage.value) for c in clients if c.round == 2
    ]
    report = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.json", "report/clients.csv", "report/rounds.csv"} <= report
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(tmp_path)

    # the registry link, both ways
    assert run.data.tags["fedlearn.registry.model"] == "bc"
    assert run.data.tags["fedlearn.registry.version"] == "2"
    assert run.data.tags["fedlearn.registry.versions"] == "bc:1, bc:2"
    assert run.data.tags["fedlearn.registry.root"] == str((tmp_path / "registry").resolve())
    with ModelRegistry(tmp_path / "registry") as registry:
        for version in (1, 2):
            meta = registry.metadata("bc", version)
            assert meta["mlflow.run_id"] == run_id
            assert meta["mlflow.experiment_id"] == run.info.experiment_id
    assert no_network == []


def test_a_tracking_failure_neither_fails_nor_loses_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tracking: dict[str, Any],
) -> None:
    monkeypatch.chdir(ROOT)
    original = MlflowRun.round
    calls = []

    def flaky(self: MlflowRun, round: Any, clients: Any, privacy: Any) -> None:
        calls.append(round.round)
        if round.round == 2:
            raise ConnectionError("tracking server unreachable")
        original(self, round, clients, privacy)

    monkeypatch.setattr(MlflowRun, "round", flaky)
    with caplog.at_level(logging.WARNING, logger="fedlearn.tracking"):
        job = run_job(_config(tmp_path, tracking, **{"publish.enabled": False}))
    assert job.outcome.status == "finished" and len(job.outcome.rounds) == 3
    assert calls == [1, 2]  # off after the failure: round 3 was not tried
    assert "MLflow tracking failed (round 2)" in caplog.text
    assert "tracking server unreachable" in caplog.text
    store = RunStore(tmp_path / "run" / "run.db", run_id="bc", read_only=True)
    try:
        failed = [e for e in store.events() if e.kind == "tracking-failed"]
        assert len(failed) == 1 and "tracking server unreachable" in (failed[0].detail or "")
        accuracy = [(r.round, r.eval_metrics["accuracy"]) for r in store.rounds()]
    finally:
        store.close()
    client = _client(tracking)
    run = _only_run(client, tracking)
    assert _history(client, run.info.run_id, "accuracy") == accuracy[:1]
    assert run.info.status == "RUNNING"  # its end was not logged either

    # resuming (one more round) takes up the same MLflow run and logs what was missed
    monkeypatch.setattr(MlflowRun, "round", original)
    more = run_job(
        _config(tmp_path, tracking, **{"publish.enabled": False, "run.rounds": 4}), resume=True
    )
    assert more.outcome.status == "finished"
    again = _only_run(client, tracking)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = _history(client, run.info.run_id, "accuracy")
    assert [step for step, _ in history] == [1, 2, 3, 4] and history[:3] == accuracy
    assert again.data.tags["fedlearn.logged_round"] == "4"


def test_a_tracking_store_that_cannot_open_leaves_the_run_alone(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tracking: dict[str, Any],
) -> None:
    monkeypatch.chdir(ROOT)
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    settings = {
        "run.rounds": 1,
        "publish.enabled": False,
        "tracking.mlflow_uri": f"sqlite:///{blocked / 'mlflow.db'}",
    }
    with caplog.at_level(logging.WARNING, logger="fedlearn.tracking"):
        job = run_job(_config(tmp_path, tracking, **settings))
    assert job.outcome.status == "finished"
    assert "MLflow tracking failed (start)" in caplog.text


def test_no_password_reaches_a_log_or_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = "https://alice:s3cret@mlflow.example:5000/x"
    assert public_uri(uri) == "https://mlflow.example:5000/x"
    assert public_uri("sqlite:///tmp/mlflow.db") == "sqlite:///tmp/mlflow.db"

    def unreachable() -> MlflowRun:
        raise ConnectionError(f"cannot reach {uri}/api/2.0/mlflow/runs/create")

    store = RunStore(tmp_path / "run.db", run_id="r")
    store.start_run(0, {})
    with caplog.at_level(logging.WARNING, logger="fedlearn.tracking"):
        tracking = Tracking(store, unreachable, uri)
    assert not tracking.active and tracking.error is not None
    assert "s3cret" not in caplog.text and "mlflow.example:5000" in caplog.text
    assert all("s3cret" not in (e.detail or "") for e in store.events())
    store.close()


def test_the_coordinator_is_tracked(tmp_path: Path, tracking: dict[str, Any]) -> None:
    d = Deployment(tmp_path, rounds=2)
    overrides = {
        **tracking,
        "publish.enabled": True,
        "publish.model": "bc",
        "publish.factory": "clients.tabular:build_model",
        "publish.factory_params": {"in_features": 30, "num_classes": 2, "hidden": 32},
        "publish.inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
        "publish.outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
    }
    with in_process_coordinator(d, overrides) as c:
        for i in range(d.num_sites):
            c.start_site(i)
        c.wait(120)
    client = _client(tracking)
    run = _only_run(client, tracking)
    assert run.info.status == "FINISHED"
    assert run.data.params["server.insecure"] in ("true", "false")
    store = RunStore(d.state_dir / "run.db", run_id="run", read_only=True)
    try:
        accuracy = [(r.round, r.eval_metrics["accuracy"]) for r in store.rounds()]
    finally:
        store.close()
    assert _history(client, run.info.run_id, "accuracy") == accuracy and len(accuracy) == 2
    assert run.data.tags["fedlearn.registry.version"] == "1"
    with ModelRegistry(d.state_dir / "registry") as registry:
        assert registry.metadata("bc", 1)["mlflow.run_id"] == run.info.run_id


def test_simulate_takes_the_tracking_store_from_a_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_uri: str
) -> None:
    from typer.testing import CliRunner

    from fedlearn.cli.main import app

    monkeypatch.chdir(ROOT)
    args = ["simulate", "--rounds", "1", "--clients", "2", "--out", str(tmp_path / "run")]
    args += ["--no-check-serving", "--mlflow-uri", store_uri]
    for key, value in {
        "run.name": "flagged",
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "clients.tabular:make_app",
        "client.params": "{epochs = 1, hidden = 0}",
        "backend.kind": "inprocess",
        "publish.enabled": "false",
        "tracking.experiment": "flagged",
        "tracking.artifact_location": json.dumps((tmp_path / "artifacts").as_uri()),
    }.items():
        args += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri=store_uri)
    run = _only_run(client, {"tracking.experiment": "flagged"})
    assert run.info.status == "FINISHED" and run.data.params["tracking.mlflow_uri"] == store_uri
    assert [step for step, _ in _history(client, run.info.run_id, "accuracy")] == [1]
