"""[tracking]: log a run to an MLflow tracking server (``fedlearn simulate`` and the
coordinator alike; see :mod:`fedlearn.tracking.mlflow_run`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrackingSection(BaseModel):
    """[tracking]: off unless ``mlflow_uri`` is set (``sqlite:///mlflow.db``,
    ``http://host:5000``, ...; needs the ``mlflow`` extra).

    ``experiment`` is created when missing, with ``artifact_location`` when given (for a
    ``sqlite:///PATH`` store: ``mlartifacts/`` beside PATH by default, never the working
    directory). ``run_name`` defaults to the run's name. ``client_tables`` logs each
    round's per-client results as a CSV artifact.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mlflow_uri: str | None = Field(None, min_length=1)
    experiment: str = Field("fedlearn", min_length=1)
    artifact_location: str | None = None
    run_name: str | None = None
    client_tables: bool = True
