"""Simulation configs: TOML files validated with pydantic; errors name the bad field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedlearn.config.loading import load_toml, validate
from fedlearn.config.tracking import TrackingSection

Scalar = bool | int | float | str


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Section):
    """[run]: what to run and for how long."""

    name: str = Field("mnist-fedavg", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    rounds: int = Field(10, ge=1)
    clients: int = Field(20, ge=1)
    evaluate_every: int = Field(1, ge=0)
    out_dir: str | None = None


class DataSection(_Section):
    """[data]: which real dataset and how to split it across clients."""

    dataset: Literal["mnist5k", "digits", "breast_cancer", "wine", "shakespeare"] = "mnist5k"
    partitioner: Literal["iid", "dirichlet", "shards", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, ge=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    min_size: int = Field(10, ge=1)
    """Dirichlet: the fewest samples a client may hold (the draw is repeated until every
    client has them; 250 MNIST-5k clients at alpha 0.5 need 5 or fewer)."""


def _default_client_params() -> dict[str, Scalar]:
    return {"epochs": 2, "batch_size": 32, "lr": 0.1}


class ClientSection(_Section):
    """[client]: the ClientApp factory (``module:function``) and its parameters."""

    app: str = Field("clients.mnist:make_app", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    params: dict[str, Scalar] = Field(default_factory=_default_client_params)


class StrategySection(_Section):
    """[strategy]: a built-in strategy by name (or ``module:Class``) and its settings."""

    name: str = "fedavg"
    params: dict[str, Scalar] = Field(default_factory=dict)


class BackendSection(_Section):
    """[backend]: where simulated clients run.

    ``workers``: pool processes, or Ray actors (default: one per core; for Ray, as many
    as the cluster has room for at ``num_cpus`` and ``num_gpus`` each). ``address``
    (``host:port`` of a Ray head) joins an existing Ray cluster instead of starting a
    private local one; ``num_cpus`` and ``num_gpus`` are the Ray resources each actor
    (one ClientApp, serving many clients in turn) reserves. ``start_method``: how the
    pool starts its workers (``auto``: ``forkserver`` with a CUDA build of torch, else
    ``fork``; see :mod:`fedlearn.simulation.pool`).
    """

    kind: Literal["inprocess", "pool", "ray"] = "pool"
    workers: int | None = Field(None, ge=1)
    address: str | None = Field(None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    start_method: Literal["auto", "fork", "forkserver", "spawn"] = "auto"

    @model_validator(mode="after")
    def _ray_only(self) -> BackendSection:
        ray_only = {"address": None, "num_cpus": 1.0, "num_gpus": 0.0}
        changed = [k for k, default in ray_only.items() if getattr(self, k) != default]
        if self.kind != "ray" and changed:
            raise ValueError(f"{', '.join(changed)} applies to kind = 'ray' only")
        if self.kind != "pool" and self.start_method != "auto":
            raise ValueError("start_method applies to kind = 'pool' only")
        return self


class LatencySection(_Section):
    """[latency]: simulated client latency (virtual seconds per training task).

    It orders an asynchronous strategy's replies (``strategy.name = "fedbuff"``) and, when
    the section is given, every round records its virtual time (a synchronous round lasts
    as long as its slowest client). ``kind``: ``constant`` (``value``), ``uniform``
    (``low``..``high``) or ``lognormal`` (``median``, ``sigma``); ``per``: a new draw per
    ``task`` or one per ``client``. Draws are seeded by the run's seed.
    """

    kind: Literal["constant", "uniform", "lognormal"] = "constant"
    value: float = Field(1.0, gt=0, allow_inf_nan=False)
    low: float = Field(0.5, ge=0, allow_inf_nan=False)
    high: float = Field(1.5, gt=0, allow_inf_nan=False)
    median: float = Field(1.0, gt=0, allow_inf_nan=False)
    sigma: float = Field(1.0, gt=0, allow_inf_nan=False)
    per: Literal["task", "client"] = "task"

    @model_validator(mode="after")
    def _range(self) -> LatencySection:
        if self.kind == "uniform" and not self.low < self.high:
            raise ValueError(f"uniform latency needs low < high, got {self.low} and {self.high}")
        return self


class SecAggSection(_Section):
    """[secagg]: secure aggregation (SecAgg+); the coordinator then sees only the sum."""

    enabled: bool = False
    clip: float = Field(1.0, gt=0)
    max_weight: int = Field(100_000, ge=1)
    modulus_bits: int = Field(32, ge=8, le=64)
    neighbours: int | None = Field(None, ge=1)
    threshold: int | None = Field(None, ge=2)


PrivacyMode = Literal["off", "central", "local", "distributed", "example"]


class PrivacySection(_Section):
    """[privacy]: differential privacy and its accounting (``fedlearn.privacy``).

    ``mode``: ``central`` clips each client's update to ``clip`` on the coordinator and adds
    Gaussian noise ``noise_multiplier * clip`` to their sum (DP-FedAvg); ``local`` clips and
    noises each update on the client before it leaves; ``distributed`` has each client add
    its share of discrete noise under secure aggregation (needs ``[secagg]``); ``example``
    runs DP-SGD on each client (Opacus; ``clip`` bounds each example's gradient).
    ``budget`` is an epsilon at ``delta``: training stops before a round would exceed it.
    """

    mode: PrivacyMode = "off"
    noise_multiplier: float = Field(1.0, gt=0)
    clip: float = Field(1.0, gt=0)
    adaptive_clip: bool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    clipped_count_stddev: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = "rdp"
    sampling: Literal["fixed", "poisson"] = "fixed"
    noise: Literal["secure", "seeded"] = "secure"
    budget: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _adaptive(self) -> PrivacySection:
        if self.adaptive_clip and self.mode != "central":
            raise ValueError("adaptive_clip is for mode = 'central' only")
        return self


class FlowerSection(_Section):
    """[flower]: run a Flower app project unchanged (``fedlearn simulate --flower-app DIR``).

    ``app`` is the project directory (its ``pyproject.toml`` names the ServerApp and the
    ClientApp); ``run_config`` overrides its ``[tool.flwr.app.config]``. The ClientApp
    replaces ``[client]`` and ``[data]`` (a Flower app loads its own data). ``[strategy]``
    and ``run.rounds`` are what the CLI took from the ServerApp (``fedlearn.run.flower``).
    """

    app: str | None = None
    run_config: dict[str, Scalar] = Field(default_factory=dict)


class TensorSection(_Section):
    """One input or output tensor of a published model (``-1`` in a shape: any size)."""

    name: str = Field(min_length=1)
    datatype: Literal[
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
    ]
    shape: list[Annotated[int, Field(ge=-1)]]


class GateSection(_Section):
    """[publish.gate]: what a new version must meet to become ``production``.

    ``tolerance`` is the regression allowed versus the current production, in the
    metric's units (0.005 = half a point of accuracy); ``min_worst_client`` bounds the
    worst client's value. ``higher_is_better`` defaults from the metric's name (loss and
    error are lower-is-better). ``max_site_regression`` bounds how much worse than
    production the metric may be at any one site, when a cross-site evaluation
    (``fedlearn evaluate-sites``) holds both versions.
    """

    metric: str = Field("accuracy", min_length=1)
    higher_is_better: bool | None = None
    tolerance: float = Field(0.005, ge=0)
    min_worst_client: float | None = None
    max_epsilon: float | None = Field(None, gt=0)
    max_site_regression: float | None = Field(None, ge=0)


class PublishSection(_Section):
    """[publish]: publish the global model to a registry (and through it to ``fedlearn serve``).

    The final model is published when the run ends, and every ``every`` rounds when that
    is > 0; each version then goes through the gate. ``registry`` defaults to
    ``registry/`` next to the run directory (``runs/registry`` for ``runs/<name>``).
    ``factory``, ``factory_params``, ``inputs`` and ``outputs`` default to what the client
    app describes (a TorchClientApp derives them from its model and data).
    """

    enabled: bool = True
    registry: str | None = None
    model: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    every: int = Field(0, ge=0)
    factory: str | None = Field(None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    factory_params: dict[str, Scalar] = Field(default_factory=dict)
    inputs: list[TensorSection] | None = None
    outputs: list[TensorSection] | None = None
    gate: GateSection = Field(default_factory=GateSection)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _signature(self) -> PublishSection:
        if (self.inputs is None) != (self.outputs is None):
            raise ValueError("set both inputs and outputs, or neither")
        if self.inputs is not None and self.factory is None:
            raise ValueError("inputs and outputs describe a factory's model: set factory too")
        return self


class DriftSection(_Section):
    """[drift]: drift monitoring of the clients' training data (``fedlearn.drift``).

    Every training task asks its client for a summary of its data over ``bins`` fixed
    bins between ``low`` and ``high`` (the same for every feature, plus an underflow and an
    overflow bin, so summaries add up across clients); the report flags a client whose
    summary moved from its previous round by PSI > ``psi_threshold`` or a feature mean
    shift > ``mean_shift_threshold`` pooled standard deviations (under secure aggregation:
    the population). A published version keeps the last round's summed summary as the
    reference distribution ``fedlearn serve`` compares its inputs with.
    """

    enabled: bool = False
    bins: int = Field(12, ge=1, le=1000)
    low: float = -3.0
    high: float = 3.0
    psi_threshold: float = Field(0.2, gt=0)
    mean_shift_threshold: float = Field(0.5, gt=0)
    features: int = Field(0, ge=0)
    """Values per input row (0: a simulation's dataset's; a coordinator under secure
    aggregation must set it, since it sizes the secure vector before any site answers)."""
    classes: int = Field(0, ge=0)
    """Label classes (0: as for ``features``)."""

    @model_validator(mode="after")
    def _range(self) -> DriftSection:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


class SimulationConfig(_Section):
    """A whole simulation config."""

    run: RunSection = Field(default_factory=RunSection)  # type: ignore[arg-type]
    data: DataSection = Field(default_factory=DataSection)  # type: ignore[arg-type]
    client: ClientSection = Field(default_factory=ClientSection)  # type: ignore[arg-type]
    strategy: StrategySection = Field(default_factory=StrategySection)
    backend: BackendSection = Field(default_factory=BackendSection)  # type: ignore[arg-type]
    secagg: SecAggSection = Field(default_factory=SecAggSection)  # type: ignore[arg-type]
    privacy: PrivacySection = Field(default_factory=PrivacySection)  # type: ignore[arg-type]
    publish: PublishSection = Field(default_factory=PublishSection)  # type: ignore[arg-type]
    flower: FlowerSection = Field(default_factory=FlowerSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)  # type: ignore[arg-type]
    latency: LatencySection | None = None
    drift: DriftSection = Field(default_factory=DriftSection)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _privacy(self) -> SimulationConfig:
        check_privacy(self.privacy, self.secagg)
        return self


def check_privacy(privacy: PrivacySection, secagg: SecAggSection) -> None:
    """Privacy settings that contradict the secure-aggregation ones."""
    if privacy.mode == "distributed" and not secagg.enabled:
        raise ValueError(
            "privacy.mode = 'distributed' adds noise under secure aggregation: "
            "set secagg.enabled = true (or use mode = 'central' or 'local')"
        )


def parse_config(raw: dict[str, Any]) -> SimulationConfig:
    """Validate a simulation config mapping."""
    return validate(SimulationConfig, raw)


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None
) -> SimulationConfig:
    """A simulation config from TOML (or the embedded defaults when ``path`` is None)."""
    return load_toml(SimulationConfig, path, overrides)
