"""A run, as it goes, in an MLflow tracking store.

One MLflow run per fedlearn run (in ``[tracking] experiment``), holding:

* **params**: the run's config, flattened (``strategy.name``, ``client.params.lr``, ...);
  tags ``fedlearn.run`` (its name) and ``fedlearn.directory``;
* **metrics, step = round**: the strategy's evaluation metrics under their own names
  (``accuracy``, ``loss``), training metrics as ``train/<name>``, the per-client summary
  as ``clients/<metric>_worst|_p10|_p50|_mean``, ``round/ok``, ``round/train_ok``,
  ``round/eval_ok``, ``round/duration_s``, and ``dp.epsilon`` (at ``dp.delta``) when the
  run has differential privacy;
* **artifacts**: ``clients/round-NNNN.csv``, each round's per-client results, and at the
  end the report's files under ``report/`` (``report.json``, ``clients.csv``,
  ``rounds.csv``, the plots);
* **the registry link**, both ways: tags ``fedlearn.registry.model`` and
  ``fedlearn.registry.version`` (the newest version the run published),
  ``fedlearn.registry.versions`` (all of them) and ``fedlearn.registry.root``; and the
  registry version's metadata ``mlflow.run_id``, ``mlflow.experiment_id`` and
  ``mlflow.tracking_uri`` (without any user:password part).

The MLflow run's id is recorded in the run store (an event ``tracking``), so a resumed run
continues the same MLflow run, and the tag ``fedlearn.logged_round`` says how far it got:
whatever the store committed past it (rounds run while tracking was off or failing) is
logged when the run starts again. MLflow is imported only here, with its usage telemetry
off (``MLFLOW_DISABLE_TELEMETRY``, unless set).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlearn.config.tracking import TrackingSection
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import PrivacyRow, Publication, RunStore
from fedlearn.errors import ConfigError

if TYPE_CHECKING:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

#: The run store event that records the MLflow run of a fedlearn run.
EVENT = "tracking"
LOGGED_ROUND = "fedlearn.logged_round"
REPORT_FILES = ("report.json", "clients.csv", "rounds.csv")
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
_BATCH = 100  # params and tags per log_batch (MLflow's limit)
_MAX_PARAM = 6000  # characters of a param value (MLflow's limit)


def public_uri(uri: str) -> str:
    """``uri`` without a ``user:password@`` part (what may be written down)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def default_artifact_location(uri: str) -> str | None:
    """``mlartifacts/`` beside a ``sqlite:///PATH`` store (None for other stores: the
    server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///") :])
    return (path.resolve().parent / "mlartifacts").as_uri()


class MlflowRun:
    """The MLflow side of one fedlearn run (see the module docstring). Every method may
    raise; :class:`fedlearn.tracking.Tracking` keeps that from reaching the run."""

    def __init__(self, section: TrackingSection, name: str, directory: Path) -> None:
        if section.mlflow_uri is None:
            raise ConfigError("tracking.mlflow_uri is not set")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise ConfigError(
                f"tracking in MLflow needs MLflow: pip install 'fedlearn[mlflow]' ({exc})"
            ) from exc
        self.section = section
        self.uri = section.mlflow_uri
        self.name = name
        self.directory = directory
        self.client: MlflowClient = MlflowClient(tracking_uri=self.uri)
        self.run_id = ""
        self.experiment_id = ""
        self.logged_round = 0
        self.versions: list[str] = []

    # -- the run -------------------------------------------------------------------------

    def start(self, store: RunStore) -> None:
        """Create the MLflow run, or take up the one the store names, and log whatever
        the store committed that it does not have yet."""
        self.experiment_id = self._experiment()
        existing = self._recorded_run(store)
        config = store.run_info().get("config", {})
        if existing is None:
            run = self.client.create_run(
                self.experiment_id,
                tags={
                    "fedlearn.run": self.name,
                    "fedlearn.directory": str(self.directory.resolve()),
                    LOGGED_ROUND: "0",
                },
                run_name=self.section.run_name or self.name,
            )
            self.run_id = str(run.info.run_id)
            store.add_event(EVENT, store.committed_round(), f"mlflow {self.run_id}")
            self._params(_flat_params(config), {})
        else:
            self.run_id = existing
            self.client.update_run(self.run_id, "RUNNING")
            run = self.client.get_run(self.run_id)
            self.logged_round = int(run.data.tags.get(LOGGED_ROUND, "0"))
            versions = run.data.tags.get("fedlearn.registry.versions", "")
            self.versions = [v for v in versions.split(", ") if v]
            self._params(_flat_params(config), dict(run.data.params))
        self.catch_up(store)

    def catch_up(self, store: RunStore) -> None:
        """Log the committed rounds past ``fedlearn.logged_round`` (and their privacy
        rows) from the store."""
        rounds = [r for r in store.rounds() if r.round > self.logged_round]
        if not rounds:
            return
        clients: dict[int, list[ClientRecord]] = {}
        for c in store.clients():
            clients.setdefault(c.round, []).append(c)
        privacy = {p.round: p for p in store.privacy_rows()}
        for r in rounds:
            self.round(r, clients.get(r.round, []), privacy.get(r.round))

    def round(
        self, round: RoundRecord, clients: Sequence[ClientRecord], privacy: PrivacyRow | None
    ) -> None:
        """Log one committed round: its metrics (step = round) and its client table."""
        from mlflow.entities import RunTag

        step, now = round.round, int(time.time() * 1000)
        values: dict[str, float] = {
            "round/ok": float(round.ok),
            "round/train_ok": float(round.train_ok),
            "round/eval_ok": float(round.eval_ok),
            "round/duration_s": float(round.duration_s),
        }
        values.update(_numbers(round.eval_metrics.items()))
        values.update(_numbers((f"train/{k}", v) for k, v in round.train_metrics.items()))
        from fedlearn.registry.publish import client_summary

        values.update(
            _numbers((f"clients/{k}", v) for k, v in client_summary(clients, step).items())
        )
        if privacy is not None:
            values.update(_numbers([("dp.epsilon", privacy.epsilon), ("dp.delta", privacy.delta)]))
        self._metrics([_metric(k, v, now, step) for k, v in values.items()])
        if self.section.client_tables and clients:
            self.client.log_text(
                self.run_id, client_table(clients), f"clients/round-{step:04d}.csv"
            )
        self.logged_round = max(self.logged_round, step)
        self.client.log_batch(self.run_id, tags=[RunTag(LOGGED_ROUND, str(self.logged_round))])

    def published(self, publication: Publication, registry_root: Path) -> None:
        """Link the run and a version it published, both ways."""
        from mlflow.entities import RunTag

        from fedlearn.registry.model_registry import ModelRegistry

        label = f"{publication.model}:{publication.version}"
        if label not in self.versions:
            self.versions.append(label)
        tags = {
            "fedlearn.registry.model": publication.model,
            "fedlearn.registry.version": str(publication.version),
            "fedlearn.registry.versions": ", ".join(self.versions),
            "fedlearn.registry.root": str(registry_root.resolve()),
        }
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        with ModelRegistry(registry_root) as registry:
            for key, value in (
                ("mlflow.run_id", self.run_id),
                ("mlflow.experiment_id", self.experiment_id),
                ("mlflow.tracking_uri", public_uri(self.uri)),
            ):
                registry.set_metadata(publication.model, publication.version, key, value)

    def finish(self, status: str) -> None:
        """Log the report's files and end the MLflow run with the fedlearn run's status."""
        for name in REPORT_FILES:
            if (self.directory / name).is_file():
                self.client.log_artifact(self.run_id, str(self.directory / name), "report")
        for png in sorted(self.directory.glob("*.png")):
            self.client.log_artifact(self.run_id, str(png), "report")
        self.client.set_terminated(self.run_id, _STATUS.get(status, "FAILED"))

    # -- internals -----------------------------------------------------------------------

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.section.experiment)
        if found is not None:
            return str(found.experiment_id)
        location = self.section.artifact_location or default_artifact_location(self.uri)
        return str(self.client.create_experiment(self.section.experiment, location))

    def _recorded_run(self, store: RunStore) -> str | None:
        """The MLflow run the store names, if it is in this experiment."""
        from mlflow.exceptions import MlflowException

        recorded = [e.detail for e in store.events() if e.kind == EVENT and e.detail]
        if not recorded:
            return None
        run_id = recorded[-1].removeprefix("mlflow ")
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None  # another tracking store than the one that run went to
        return run_id if str(run.info.experiment_id) == self.experiment_id else None

    def _params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        """Log the params not logged yet (a param cannot change: a resumed run's
        operational changes are in the run store's history and the report)."""
        from mlflow.entities import Param

        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), _BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _BATCH])

    def _metrics(self, metrics: list[Metric]) -> None:
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])


def client_table(clients: Sequence[ClientRecord]) -> str:
    """One round's client results as CSV: round, stage, client, outcome, every metric; in
    the run store's order (stage, then client)."""
    names = sorted({k for c in clients for k in c.metrics})
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["round", "stage", "client_id", "ok", "num_examples", "loss", *names, "error"])
    for c in sorted(clients, key=lambda c: (c.round, c.stage.value, c.client_id)):
        writer.writerow(
            [
                c.round,
                c.stage.value,
                c.client_id,
                int(c.ok),
                c.num_examples,
                "" if c.loss is None else repr(float(c.loss)),
                *(_cell(c.metrics.get(n)) for n in names),
                c.error or "",
            ]
        )
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _flat_params(config: dict[str, Any]) -> dict[str, str]:
    from fedlearn.run.identity import flatten

    out = {}
    for key, value in flatten(config).items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key == "tracking.mlflow_uri" and isinstance(value, str):
            text = public_uri(value)  # never a password into the tracking store
        out[key] = text[:_MAX_PARAM]
    return out


def _numbers(items: Iterable[tuple[str, Any]]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in items
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def _metric(key: str, value: float, timestamp: int, step: int) -> Metric:
    from mlflow.entities import Metric

    return Metric(key, value, timestamp, step)
