"""Deployment configs: ``coordinator.toml`` and ``site.toml``, validated; errors name the field."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlearn.config.simulation import (
    DataSection,
    PublishSection,
    Scalar,
    SecAggSection,
    StrategySection,
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSection(_Section):
    """TLS material. Plaintext only with ``insecure = true``."""

    insecure: bool = False
    payload_digest: Literal["auto", "always"] = "auto"
    """``auto``: payloads carry a SHA-256 on plaintext channels only (TLS authenticates
    every record); ``always``: this end attaches one to what it sends over TLS too."""
    ca: str | None = None
    cert: str | None = None
    key: str | None = None


class ServerSection(TlsSection):
    """[server]: where the coordinator listens and whom it admits."""

    address: str = "127.0.0.1:7443"
    allowlist: str = "sites.toml"
    state_dir: str = "coordinator-state"
    server_id: str = "fedlearn-coordinator"
    max_payload_mb: int = Field(4096, ge=1)
    max_inflight_upload_mb: int = Field(2048, ge=1)
    """Memory all sites' uploads in flight may hold together; past it, uploads wait."""
    handshake_timeout_s: float = Field(10.0, gt=0)
    hold_replies_mb: int = Field(1024, ge=0)
    """Memory for replies that arrive before their turn; beyond it they wait on disk."""
    metrics_port: int | None = Field(None, ge=0, le=65535)

    @model_validator(mode="after")
    def _tls(self) -> ServerSection:
        if not self.insecure and (self.cert is None or self.key is None):
            raise ValueError("TLS is on by default: set cert and key, or insecure = true")
        return self


class CoordinatorRunSection(_Section):
    """[run]: the federated run the coordinator drives."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    rounds: int = Field(3, ge=1)
    min_clients: int = Field(1, ge=1)
    join_timeout_s: float = Field(300.0, gt=0)
    stage_timeout_s: float = Field(600.0, gt=0)
    evaluate_every: int = Field(1, ge=0)


class ModelSection(_Section):
    """[model]: the initial global model (a safetensors file or ``module:function(seed)``)."""

    weights: str | None = None
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

    @model_validator(mode="after")
    def _one(self) -> ModelSection:
        if (self.weights is None) == (self.factory is None):
            raise ValueError("set exactly one of weights or factory")
        return self


class CoordinatorPublishSection(PublishSection):
    """[publish] of a coordinator: off unless enabled; the coordinator holds no client app,
    so ``factory``, ``inputs`` and ``outputs`` must be set. ``registry`` defaults to
    ``<state_dir>/registry``."""

    enabled: bool = False

    @model_validator(mode="after")
    def _explicit(self) -> CoordinatorPublishSection:
        if self.enabled and (self.factory is None or self.inputs is None):
            raise ValueError("a coordinator publishes only with factory, inputs and outputs set")
        return self


class CoordinatorConfig(_Section):
    """coordinator.toml."""

    server: ServerSection = Field(default_factory=ServerSection)  # type: ignore[arg-type]
    run: CoordinatorRunSection = Field(default_factory=CoordinatorRunSection)  # type: ignore[arg-type]
    model: ModelSection
    strategy: StrategySection = Field(default_factory=StrategySection)
    secagg: SecAggSection = Field(default_factory=SecAggSection)  # type: ignore[arg-type]
    publish: CoordinatorPublishSection = Field(default_factory=CoordinatorPublishSection)  # type: ignore[arg-type]


class ConnectSection(TlsSection):
    """[coordinator]: where the site dials out to."""

    address: str = "127.0.0.1:7443"
    server_name: str | None = None
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    exit_when_finished: bool = False


class SiteSection(_Section):
    """[site]: this site's identity."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    key: str = "site.key"


class SiteDataSection(_Section):
    """[data]: the site's own files (``path``: .npz with x_train, y_train, x_test, y_test)
    or, for demos and tests, a partition of a bundled dataset (``simulated``)."""

    path: str | None = None
    simulated: DataSection | None = None
    num_clients: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one(self) -> SiteDataSection:
        if (self.path is None) == (self.simulated is None):
            raise ValueError("set exactly one of path or simulated")
        if self.simulated is not None and self.num_clients is None:
            raise ValueError("simulated data needs num_clients")
        return self


class SiteAppSection(_Section):
    """[client]: the ClientApp factory, called as ``factory(data, **params)``."""

    app: str = Field(..., pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    params: dict[str, Scalar] = Field(default_factory=dict)


class SiteConfig(_Section):
    """site.toml."""

    coordinator: ConnectSection = Field(default_factory=ConnectSection)  # type: ignore[arg-type]
    site: SiteSection
    data: SiteDataSection
    client: SiteAppSection
