"""Export a published model version to an MLflow tracking server and model registry.

MLflow is optional: ``pip install 'fedlearn[mlflow]'`` (``mlflow-skinny`` plus SQLAlchemy
and Alembic for ``sqlite:///`` stores). It is imported only when an export runs.

One export creates, in experiment ``fedlearn`` (by default):

* a run named ``<name> v<N>`` with params ``fedlearn.{model, version, run, round, factory,
  factory_params, sha256, parent}``, the version's metrics (step = round) and its client
  summary as ``clients/<key>``, and ``fedlearn.*`` tags;
* artifacts under ``model/``: ``model.safetensors`` (the registry's file, byte for byte),
  ``fedlearn.json`` (name, version, factory, factory_params, signature, sha256) and an
  ``MLmodel`` file whose ``fedlearn`` flavor names them, with the OIP signature as an MLflow
  tensor signature where the datatypes map to numpy;
* a version of registered model ``registered_name`` (default: the fedlearn name) whose
  source is that ``model/`` directory, tagged with the fedlearn name, version and sha256.

Nothing is pickled: the ``MLmodel`` file is YAML and has no ``python_function`` flavor, so
``mlflow.pyfunc.load_model`` does not apply; rebuild with the factory and load the weights
(:func:`fedlearn.serving.models.build_module` does both, and, like ``fedlearn serve``, calls
only a registered model builder of an allowed module, never whatever ``factory`` names).
Exporting a version again returns the MLflow version already registered for the same
file (same sha256) instead of creating another one.

MLflow's usage telemetry is turned off (``MLFLOW_DISABLE_TELEMETRY``, unless set) before
it is imported, so an export against a local store makes no network call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlearn.errors import ConfigError, SerializationError
from fedlearn.registry.model_registry import ModelRegistry, ModelVersion

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

DEFAULT_EXPERIMENT = "fedlearn"
ARTIFACT_PATH = "model"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "fedlearn.json"
FLAVOR = "fedlearn"

# Open Inference Protocol datatypes -> numpy dtype names (BF16 and BYTES have none).
_OIP_TO_NUMPY = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}


@dataclass(frozen=True)
class MlflowExport:
    """Where a fedlearn version landed in MLflow."""

    fedlearn_name: str
    fedlearn_version: int
    registered_name: str
    version: str
    """The MLflow model version (MLflow numbers its own versions)."""
    run_id: str
    experiment_id: str
    source: str
    """The artifact URI of the ``model/`` directory."""
    created: bool
    """False when an MLflow version of the same file already existed and was returned."""

    @property
    def model_uri(self) -> str:
        """``models:/<registered_name>/<version>``."""
        return f"models:/{self.registered_name}/{self.version}"


def export_version(
    registry_root: str | Path,
    name: str,
    version: int | str,
    *,
    tracking_uri: str,
    registered_name: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_location: str | None = None,
) -> MlflowExport:
    """Log version ``version`` (number or alias) of ``name`` as an MLflow run and register it.

    ``tracking_uri`` serves as both tracking and registry URI (``sqlite:///mlflow.db``,
    ``http://host:5000``, ...). ``artifact_location`` applies only when ``experiment`` is
    created here. Raises :class:`ConfigError` when MLflow is not installed, the version is
    unknown or MLflow rejects what it is given; :class:`SerializationError` when the weights
    file does not match its recorded sha256.
    """
    root = Path(registry_root)
    if not (root / "registry.db").is_file():
        raise ConfigError(f"no model registry at {root}")
    with ModelRegistry(root) as registry:
        info = registry.resolve(name, version)
    target = registered_name or info.name
    if not target or "'" in target:
        raise ConfigError(f"registered name {target!r}: must be non-empty and have no quote")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise ConfigError(
            f"MLflow export needs MLflow: pip install 'fedlearn[mlflow]' ({exc})"
        ) from exc

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        existing = _find_existing(client, target, info)
        if existing is not None:
            return existing
        with tempfile.TemporaryDirectory(prefix="fedlearn-mlflow-") as tmp:
            staged = Path(tmp) / ARTIFACT_PATH
            _stage(info, staged)
            experiment_id = _experiment(client, experiment, artifact_location)
            return _log_and_register(client, experiment_id, target, info, root, staged)
    except MlflowException as exc:
        raise ConfigError(f"MLflow export of {name!r} v{info.version} failed: {exc}") from exc


def oip_to_mlflow_schema(tensors: list[Mapping[str, Any]]) -> str | None:
    """The MLflow tensor-spec schema (JSON) of OIP ``{name, datatype, shape}`` entries.

    ``None`` when a datatype has no numpy equivalent (MLflow tensor specs need one).
    """
    import numpy as np
    from mlflow.types.schema import ColSpec, Schema, TensorSpec

    specs: list[TensorSpec | ColSpec] = []
    for t in tensors:
        dtype = _OIP_TO_NUMPY.get(str(t["datatype"]).upper())
        if dtype is None:
            return None
        specs.append(TensorSpec(np.dtype(dtype), tuple(int(d) for d in t["shape"]), t["name"]))
    return str(Schema(specs).to_json())


# -- internals -----------------------------------------------------------------------------


def _experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifact_location))


def _find_existing(client: MlflowClient, target: str, info: ModelVersion) -> MlflowExport | None:
    """An MLflow version of ``target`` already holding this exact file, if any."""
    for mv in client.search_model_versions(f"name = '{target}'"):
        tags = mv.tags or {}
        if (
            tags.get("fedlearn.sha256") == info.sha256
            and tags.get("fedlearn.model") == info.name
            and tags.get("fedlearn.version") == str(info.version)
        ):
            run = client.get_run(mv.run_id) if mv.run_id else None
            return MlflowExport(
                fedlearn_name=info.name,
                fedlearn_version=info.version,
                registered_name=target,
                version=str(mv.version),
                run_id=str(mv.run_id or ""),
                experiment_id="" if run is None else str(run.info.experiment_id),
                source=str(mv.source),
                created=False,
            )
    return None


def _stage(info: ModelVersion, out: Path) -> None:
    """Copy the weights (checking the copy's sha256) and write the JSON and MLmodel files."""
    out.mkdir()
    weights = out / WEIGHTS_FILE
    try:
        shutil.copyfile(info.path, weights)
    except OSError as exc:
        raise SerializationError(f"model file {info.path} is unreadable: {exc}") from exc
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != info.sha256:
        raise SerializationError(
            f"model file {info.path} does not match the sha256 recorded for "
            f"{info.name!r} v{info.version}"
        )
    (out / INFO_FILE).write_text(json.dumps(_info(info), indent=2, sort_keys=True) + "\n")


def _info(info: ModelVersion) -> dict[str, Any]:
    return {
        "name": info.name,
        "version": info.version,
        "run": info.run,
        "round": info.round,
        "factory": info.factory,
        "factory_params": info.factory_params,
        "signature": info.signature,
        "sha256": info.sha256,
        "parent": info.parent,
        "weights": WEIGHTS_FILE,
        "format": "safetensors",
    }


def _write_mlmodel(out: Path, info: ModelVersion, run_id: str) -> None:
    """Write ``MLmodel`` (YAML, no pickle): a ``fedlearn`` flavor and the tensor signature."""
    from mlflow.models import Model
    from mlflow.utils.yaml_utils import write_yaml

    model = Model(
        artifact_path=ARTIFACT_PATH,
        run_id=run_id,
        flavors={
            FLAVOR: {
                "weights": WEIGHTS_FILE,
                "format": "safetensors",
                "info": INFO_FILE,
                "factory": info.factory,
                "factory_params": info.factory_params,
                "sha256": info.sha256,
            }
        },
        metadata={"fedlearn.model": info.name, "fedlearn.version": info.version},
        model_size_bytes=(out / WEIGHTS_FILE).stat().st_size,
    )
    document: dict[str, Any] = model.to_dict()
    inputs = oip_to_mlflow_schema(info.signature["inputs"])
    outputs = oip_to_mlflow_schema(info.signature["outputs"])
    if inputs is not None and outputs is not None:
        document["signature"] = {"inputs": inputs, "outputs": outputs, "params": None}
    write_yaml(  # type: ignore[no-untyped-call]
        str(out), "MLmodel", document, ensure_yaml_extension=False
    )


def _log_and_register(
    client: MlflowClient,
    experiment_id: str,
    target: str,
    info: ModelVersion,
    root: Path,
    staged: Path,
) -> MlflowExport:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

    created_ms = int(info.created * 1000)
    tags = {
        "fedlearn.model": info.name,
        "fedlearn.version": str(info.version),
        "fedlearn.sha256": info.sha256,
    }
    note = f"fedlearn {info.name} v{info.version}, exported from the registry at {root.resolve()}"
    run = client.create_run(
        experiment_id,
        tags={
            **tags,
            "fedlearn.registry.model_registry": str(root.resolve()),
            "fedlearn.run": info.run,
            "mlflow.note.content": note,
        },
        run_name=f"{info.name} v{info.version}",
    )
    run_id = str(run.info.run_id)
    try:
        params = {
            "fedlearn.model": info.name,
            "fedlearn.version": str(info.version),
            "fedlearn.run": info.run,
            "fedlearn.round": str(info.round),
            "fedlearn.factory": info.factory,
            "fedlearn.factory_params": json.dumps(info.factory_params, sort_keys=True),
            "fedlearn.sha256": info.sha256,
            "fedlearn.parent": "none" if info.parent is None else str(info.parent),
        }
        metrics = dict(info.metrics)
        metrics.update({f"clients/{k}": v for k, v in (info.client_summary or {}).items()})
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), created_ms, info.round) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        _write_mlmodel(staged, info, run_id)
        client.log_artifacts(run_id, str(staged), ARTIFACT_PATH)
        source = f"{str(run.info.artifact_uri).rstrip('/')}/{ARTIFACT_PATH}"
        try:
            client.create_registered_model(
                target, description=f"fedlearn model {info.name!r}, exported from its registry"
            )
        except MlflowException as exc:
            exists = (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS))
            if exc.error_code not in exists:
                raise
        mv = client.create_model_version(
            target,
            source,
            run_id=run_id,
            tags=tags,
            description=(
                f"fedlearn {info.name} v{info.version} (run {info.run}, round {info.round})"
            ),
        )
        client.log_batch(run_id, tags=[RunTag("fedlearn.mlflow_version", str(mv.version))])
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return MlflowExport(
        fedlearn_name=info.name,
        fedlearn_version=info.version,
        registered_name=target,
        version=str(mv.version),
        run_id=run_id,
        experiment_id=experiment_id,
        source=str(mv.source),
        created=True,
    )


__all__ = [
    "DEFAULT_EXPERIMENT",
    "MlflowExport",
    "export_version",
    "oip_to_mlflow_schema",
]
