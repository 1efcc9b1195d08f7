"""Export of a registry version to MLflow (a local sqlite store, fully offline)."""

from __future__ import annotations

import hashlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml  # type: ignore[import-untyped]
from mlflow.tracking import MlflowClient
from mlflow.types.schema import Schema, TensorSpec
from safetensors.numpy import load_file
from typer.testing import CliRunner

from fedlearn.cli.main import app
from fedlearn.errors import ConfigError, SerializationError
from fedlearn.registry.mlflow_export import export_version
from fedlearn.registry.model_registry import ModelRegistry
from serving import MNIST_FACTORY, publish_mnist

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_logs_run_artifacts_and_registers(tmp_path: Path, no_network: list[Any]) -> None:
    root = tmp_path / "registry"
    publish_mnist(root, seeds=(0, 1))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = tmp_path / "artifacts"

    result = export_version(root, "mnist", 2, tracking_uri=uri, artifact_location=str(artifacts))
    assert result.created and (result.fedlearn_name, result.fedlearn_version) == ("mnist", 2)
    assert (result.registered_name, result.version) == ("mnist", "1")
    assert result.model_uri == "models:/mnist/1"

    with ModelRegistry(root) as registry:
        info = registry.get("mnist", 2)
        arrays = registry.load("mnist", 2)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    mv = client.get_model_version("mnist", "1")
    assert mv.run_id == result.run_id and mv.source == result.source
    assert mv.tags == {
        "fedlearn.model": "mnist",
        "fedlearn.version": "2",
        "fedlearn.sha256": info.sha256,
    }

    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "mnist v2"
    assert client.get_experiment(run.info.experiment_id).name == "fedlearn"
    assert run.data.params == {
        "fedlearn.model": "mnist",
        "fedlearn.version": "2",
        "fedlearn.run": "test",
        "fedlearn.round": "2",
        "fedlearn.factory": MNIST_FACTORY,
        "fedlearn.factory_params": "{}",
        "fedlearn.sha256": info.sha256,
        "fedlearn.parent": "none",
    }
    assert info.client_summary is not None
    assert run.data.metrics == {
        "accuracy": 0.51,
        "clients/accuracy_worst": info.client_summary["accuracy_worst"],
    }
    assert [m.step for m in client.get_metric_history(result.run_id, "accuracy")] == [2]
    assert run.data.tags["fedlearn.mlflow_version"] == "1"
    assert run.data.tags["fedlearn.registry.model_registry"] == str(root.resolve())

    # the registered version's files: the same weights, a JSON description, an MLmodel
    download = Path(client.get_model_version_download_uri("mnist", "1"))
    assert download.is_relative_to(artifacts)
    assert sorted(p.name for p in download.iterdir()) == [
        "MLmodel",
        "fedlearn.json",
        "model.safetensors",
    ]
    weights = download / "model.safetensors"
    assert _sha256(weights) == info.sha256
    loaded = load_file(str(weights))
    assert loaded.keys() == arrays.keys()
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    described = json.loads((download / "fedlearn.json").read_text())
    assert described["signature"] == info.signature and described["factory"] == MNIST_FACTORY
    mlmodel = yaml.safe_load((download / "MLmodel").read_text())
    assert mlmodel["flavors"] == {
        "fedlearn": {
            "weights": "model.safetensors",
            "format": "safetensors",
            "info": "fedlearn.json",
            "factory": MNIST_FACTORY,
            "factory_params": {},
            "sha256": info.sha256,
        }
    }
    assert mlmodel["run_id"] == result.run_id
    (spec,) = Schema.from_json(mlmodel["signature"]["inputs"]).inputs
    assert isinstance(spec, TensorSpec) and spec.name == "input"
    assert spec.type == np.dtype("float32") and spec.shape == (-1, 1, 28, 28)
    (out,) = Schema.from_json(mlmodel["signature"]["outputs"]).inputs
    assert isinstance(out, TensorSpec) and out.shape == (-1, 10)

    # the same file again: the existing MLflow version, no new run; another version: v2
    again = export_version(root, "mnist", "latest", tracking_uri=uri)
    assert not again.created and (again.version, again.run_id) == ("1", result.run_id)
    first = export_version(root, "mnist", 1, tracking_uri=uri)
    assert first.created and first.version == "2" and first.run_id != result.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 2
    assert no_network == []


def test_cli_export_and_errors(tmp_path: Path, no_network: list[Any]) -> None:
    root = tmp_path / "registry"
    publish_mnist(root, seeds=(0, 1))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = CliRunner()
    args = ["models", "export-mlflow", "mnist", "--registry", str(root), "--tracking-uri", uri]
    args += ["--artifact-location", str(tmp_path / "artifacts")]

    result = runner.invoke(app, [*args, "--registered-name", "fl-mnist"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    # the default version is production (v2)
    assert "mnist v2: registered models:/fl-mnist/1" in result.output
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_model_version("fl-mnist", "1").tags["fedlearn.version"] == "2"

    result = runner.invoke(app, [*args, "7"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "model 'mnist' has no version 7" in result.output
    with pytest.raises(ConfigError, match="has no alias 'candidate'"):
        export_version(root, "mnist", "candidate", tracking_uri=uri)
    with pytest.raises(ConfigError, match="no model registry"):
        export_version(tmp_path / "nowhere", "mnist", 1, tracking_uri=uri)
    # a weights file that no longer matches its sha256 is refused before any run is created
    with ModelRegistry(root) as registry:
        path = registry.get("mnist", 1).path
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with pytest.raises(SerializationError, match="does not match the sha256"):
        export_version(root, "mnist", 1, tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedlearn")
    assert experiment is not None and len(client.search_runs([experiment.experiment_id])) == 1
    assert no_network == []


def test_missing_mlflow_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish_mnist(tmp_path, seeds=(0,))
    monkeypatch.setitem(sys.modules, "mlflow.exceptions", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedlearn\[mlflow\]'"):
        export_version(tmp_path, "mnist", 1, tracking_uri="sqlite:///unused.db")
