"""Deployment configs: ``coordinator.toml`` and ``site.toml``, validated; errors name the field."""

from __future__ import annotations

import ipaddress
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlearn.config.simulation import (
    DataSection,
    DriftSection,
    PrivacySection,
    PublishSection,
    Scalar,
    SecAggSection,
    StrategySection,
    check_privacy,
)
from fedlearn.config.tracking import TrackingSection


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or ``localhost``) answers on loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSection(_Section):
    """What both ends set about the channel. Plaintext only with ``insecure = true``; the
    certificate fields differ by side (:class:`ServerSection`, :class:`ConnectSection`)."""

    insecure: bool = False
    payload_digest: Literal["auto", "always"] = "auto"
    """``auto``: payloads carry a SHA-256 on plaintext channels only (TLS authenticates
    every record); ``always``: this end attaches one to what it sends over TLS too."""

    field_hints: ClassVar[dict[str, str]] = {}
    """Unknown fields that deserve more than a nearest-name guess (config.loading)."""


class ServerSection(TlsSection):
    """[server]: where the coordinator listens and whom it admits."""

    cert: str | None = None
    """The coordinator's certificate chain (PEM)."""
    key: str | None = None
    """Its private key (PEM, unencrypted)."""
    client_ca: str | None = None
    """Mutual TLS: every site must present a client certificate signed by this CA (PEM);
    a site without one is refused during the TLS handshake, before it can say Hello."""
    address: str = "127.0.0.1:7443"
    allowlist: str = "sites.toml"
    """Enrolled sites; re-read whenever the file changes (and on SIGHUP)."""
    allowlist_poll_s: float = Field(0.5, gt=0)
    """How often the allowlist file is checked for changes."""
    state_dir: str = "coordinator-state"
    server_id: str = "fedlearn-coordinator"
    max_payload_mb: int = Field(4096, ge=1)
    max_inflight_upload_mb: int = Field(2048, ge=1)
    """Memory all sites' uploads in flight may hold together; past it, uploads wait."""
    handshake_timeout_s: float = Field(10.0, gt=0)
    max_joins_per_peer: int = Field(32, ge=1)
    """Joins in progress (streams not yet past the Welcome) from one network address; a
    stream over the limit is refused at once with RESOURCE_EXHAUSTED."""
    joins_per_peer_per_s: float = Field(50.0, gt=0)
    """Sustained rate of new streams from one network address (a token bucket)..."""
    join_burst_per_peer: int = Field(100, ge=1)
    """... with bursts of up to this many."""
    max_joins: int = Field(256, ge=1)
    """Joins in progress from all addresses together."""
    hold_replies_mb: int = Field(1024, ge=0)
    """Memory for replies that arrive before their turn; beyond it they wait on disk."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Prometheus ``/metrics`` on this port (0: any free one); none without it."""
    metrics_address: str | None = Field(None, min_length=1)
    """Where ``/metrics`` listens (default ``127.0.0.1``: loopback only); ``0.0.0.0`` in a
    container, so that Prometheus can scrape it from outside."""
    ui_port: int | None = Field(None, ge=0, le=65535)
    """The live run page (``fedlearn.ui``) on ``http://127.0.0.1:<port>/`` (needs the
    serve extra); None: no page, and no events built."""
    ui_address: str | None = Field(None, min_length=1)
    """Where the page listens (default ``127.0.0.1``). Beyond loopback it is served over
    TLS with ``cert`` and ``key`` (and with ``client_ca``, only to browsers that present a
    certificate signed by it, as sites must); ``insecure = true`` refuses such an address."""
    ui_endpoint: str | None = Field(None, min_length=1)
    """A ``fedlearn serve`` of this run's registry (``http://127.0.0.1:PORT``, loopback
    only): the page shows its request counts per answering version from its ``/metrics``."""

    field_hints: ClassVar[dict[str, str]] = {
        "ca": "the coordinator's own certificate is server.cert and server.key; to require "
        "a client certificate from every site, set server.client_ca (the CA that signs them)"
    }

    @model_validator(mode="after")
    def _tls(self) -> ServerSection:
        if self.insecure:
            if self.client_ca is not None:
                raise ValueError("client_ca needs TLS: remove insecure = true, or remove client_ca")
        elif self.cert is None or self.key is None:
            raise ValueError("TLS is on by default: set cert and key, or insecure = true")
        if self.ui_address is not None and not is_loopback(self.ui_address) and self.insecure:
            raise ValueError(
                f"ui_address {self.ui_address!r} is beyond loopback: the live page is then "
                "served over TLS only (cert and key); remove insecure = true, or listen on "
                "127.0.0.1 and reach it through an SSH tunnel"
            )
        if self.max_joins < self.max_joins_per_peer:
            raise ValueError("max_joins must be at least max_joins_per_peer")
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
    privacy: PrivacySection = Field(default_factory=PrivacySection)  # type: ignore[arg-type]
    publish: CoordinatorPublishSection = Field(default_factory=CoordinatorPublishSection)  # type: ignore[arg-type]
    tracking: TrackingSection = Field(default_factory=TrackingSection)  # type: ignore[arg-type]
    drift: DriftSection = Field(default_factory=DriftSection)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _privacy(self) -> CoordinatorConfig:
        check_privacy(self.privacy, self.secagg)
        return self


class ConnectSection(TlsSection):
    """[coordinator]: where the site dials out to, and whom it expects to find there."""

    address: str = "127.0.0.1:7443"
    ca: str | None = None
    """The CA that signed the coordinator's certificate (PEM): the only one trusted."""
    cert: str | None = None
    """Mutual TLS: this site's client certificate (PEM), for a coordinator with
    ``client_ca``; set together with ``key``."""
    key: str | None = None
    """The private key of ``cert`` (PEM; not the site's Ed25519 identity key)."""
    server_name: str | None = None
    server_id: str | None = Field(None, min_length=1, max_length=1024)
    """The coordinator's ``server_id``: the site refuses to sign a challenge from a
    coordinator that calls itself anything else. Over TLS the proof is also bound to the
    coordinator's certificate; on a plaintext channel this is the only binding."""
    backoff_initial_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    exit_when_finished: bool = False

    @model_validator(mode="after")
    def _client_cert(self) -> ConnectSection:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "set both coordinator.cert and coordinator.key (a client certificate for "
                "mutual TLS), or neither"
            )
        return self


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
    """[client]: the ClientApp factory, called as ``factory(data, **params)``; or a Flower
    app project run unchanged (``flower_app``: its directory).

    For a Flower app, ``node_config`` is the node's ``context.node_config`` (what
    ``flower-supernode --node-config`` gives, e.g. ``{"partition-id" = 0,
    "num-partitions" = 2}``), ``run_config`` overrides the project's
    ``[tool.flwr.app.config]``. The app loads its own data, so ``[data]`` is not needed.

    ``state_dir`` keeps the app's own state on the site's disk across daemon restarts
    (default: in the daemon's memory): ``ctx.state`` of any ClientApp (SCAFFOLD's control
    variate, files ``client-<id>.state``) and a Flower app's ``context.state``.
    """

    app: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    params: dict[str, Scalar] = Field(default_factory=dict)
    flower_app: str | None = None
    node_config: dict[str, Scalar] = Field(default_factory=dict)
    run_config: dict[str, Scalar] = Field(default_factory=dict)
    state_dir: str | None = None

    @model_validator(mode="after")
    def _one_app(self) -> SiteAppSection:
        if (self.app is None) == (self.flower_app is None):
            raise ValueError("set exactly one of app or flower_app")
        return self


class SitePrivacySection(_Section):
    """[privacy] of a site: the least local DP it applies to every update it sends.

    With ``min_noise_multiplier`` set, the site clips and noises each update itself
    (:mod:`fedlearn.privacy.local`), whatever the coordinator asks: with sigma raised to at
    least ``min_noise_multiplier`` when the coordinator asks for local DP, and with
    ``clip`` and that sigma when it asks for none. Seeded noise only with
    ``noise = "seeded"`` here too (tests; it protects nobody who knows the run's seed).
    """

    min_noise_multiplier: float | None = Field(None, gt=0)
    clip: float = Field(1.0, gt=0)
    noise: Literal["secure", "seeded"] = "secure"


class SiteConfig(_Section):
    """site.toml."""

    coordinator: ConnectSection = Field(default_factory=ConnectSection)  # type: ignore[arg-type]
    site: SiteSection
    data: SiteDataSection | None = None
    client: SiteAppSection
    privacy: SitePrivacySection = Field(default_factory=SitePrivacySection)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _data(self) -> SiteConfig:
        if self.client.app is not None and self.data is None:
            raise ValueError("[data] is needed by client.app (a Flower app loads its own)")
        return self
