"""Publishing a run's global model to a registry, through the publish gate.

A :class:`Publisher` turns a round's model and evaluation into a registry version: the
strategy's aggregate evaluation metrics become the version's ``metrics``, the clients'
individual results its per-client summary (``<metric>_worst``, ``_p10``, ``_p50``,
``_mean``, ``clients``); each new version becomes ``candidate`` and goes through
:meth:`ModelRegistry.promote`
with the configured :class:`Gate`, whose decision is recorded and returned.
The run lifecycle (:mod:`fedlearn.run.lifecycle`) decides when: every N committed rounds
and the final model, each round at most once.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from fedlearn.config.simulation import PublishSection
from fedlearn.drift.reference import Reference, combined, save_reference
from fedlearn.drift.stats import DataSummary, SummarySpec
from fedlearn.engine.messages import Stage
from fedlearn.engine.records import Arrays
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.errors import ConfigError
from fedlearn.registry.builders import registered_builder
from fedlearn.registry.model_registry import Decision, Gate, ModelRegistry, ModelVersion
from fedlearn.registry.spec import ServingSpec
from fedlearn.report.summary import evaluation_values, lower_is_better, metric_summary

log = logging.getLogger(__name__)

#: The alias each newly published version gets before the gate decides on ``production``.
CANDIDATE = "candidate"


@runtime_checkable
class ProvidesServingSpec(Protocol):
    """A client app that can describe its model for serving (e.g. TorchClientApp)."""

    def serving_spec(self) -> ServingSpec: ...


@dataclass(frozen=True)
class Published:
    """One published version and the gate's decision about it."""

    version: ModelVersion
    decision: Decision


def serving_spec(section: PublishSection, app: object | None) -> ServingSpec:
    """The spec to publish with: the config's own, else what ``app`` describes."""
    if section.factory is not None and section.inputs is not None and section.outputs is not None:
        return ServingSpec(
            section.factory,
            {
                "inputs": [t.model_dump() for t in section.inputs],
                "outputs": [t.model_dump() for t in section.outputs],
            },
            dict(section.factory_params),
        )
    if isinstance(app, ProvidesServingSpec):
        spec = app.serving_spec()
        if section.factory is None:
            return spec
        return ServingSpec(section.factory, spec.signature, dict(section.factory_params))
    raise ConfigError(
        "publish: the client app cannot describe its model for serving; set publish.factory, "
        "publish.inputs and publish.outputs, or publish.enabled = false"
    )


def unservable_reason(factory: str) -> str | None:
    """Why ``fedlearn serve`` would refuse to build ``factory``'s versions (None: it would
    not, as far as this process can tell: a registered model builder).

    Publishing still goes on: the registry keeps the version, and the builder can be
    registered before it is served. The module is imported (it is the run's own code,
    named by its config) to see whether it registers the builder.
    """
    if registered_builder(factory) is not None:
        return None
    module, _, name = factory.partition(":")
    try:
        importlib.import_module(module)
    except Exception as exc:
        return (
            f"publish: the model builder {factory} cannot be imported here "
            f"({type(exc).__name__}: {exc}); `fedlearn serve` will load the published "
            f"versions only where it can import {module} and {name} is decorated with "
            "@fedlearn.model_builder"
        )
    if registered_builder(factory) is None:
        return (
            f"publish: {factory} is not a registered model builder, so `fedlearn serve` "
            f"will refuse to load the published versions; decorate {name} in {module} with "
            "@fedlearn.model_builder"
        )
    return None


def make_gate(section: PublishSection) -> Gate:
    """The promotion gate a ``[publish.gate]`` section describes."""
    g = section.gate
    higher = not lower_is_better(g.metric) if g.higher_is_better is None else g.higher_is_better
    return Gate(
        g.metric, higher, g.tolerance, g.min_worst_client, g.max_epsilon, g.max_site_regression
    )


def client_summary(clients: Sequence[ClientRecord], round: int) -> dict[str, float]:
    """Per-client statistics of ``round``'s successful evaluations, flattened for a registry."""
    rows: dict[str, list[tuple[int, int, float]]] = {}
    for record in clients:
        if record.round != round or record.stage is not Stage.EVALUATE or not record.ok:
            continue
        for name, value in evaluation_values(record).items():
            rows.setdefault(name, []).append((record.client_id, record.num_examples, value))
    out: dict[str, float] = {}
    for name, values in sorted(rows.items()):
        summary = metric_summary(name, values)
        if summary is None:
            continue
        out[f"{name}_worst"] = summary.worst
        out[f"{name}_p10"] = summary.p10
        out[f"{name}_p50"] = summary.p50
        out[f"{name}_mean"] = summary.mean
        out[f"{name}_clients"] = float(summary.clients)
    return out


def round_metrics(record: RoundRecord | None) -> dict[str, float]:
    """The strategy's aggregate evaluation metrics of a round (finite numbers only)."""
    if record is None:
        return {}
    return {
        name: float(value)
        for name, value in record.eval_metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    }


class Publisher:
    """Publishes versions of one model for one run (see the module docstring)."""

    def __init__(self, section: PublishSection, run_id: str, spec: ServingSpec, root: Path) -> None:
        self.section = section
        self.run_id = run_id
        self.spec = spec
        self.name = section.model or run_id
        self.gate = make_gate(section)
        self.root = root
        self.published: list[Published] = []
        self.drift_spec: SummarySpec | None = None
        """The bins of the run's data summaries (drift monitoring on), else None."""
        self.warning = unservable_reason(spec.factory)
        """Why the endpoint would refuse these versions' factory (said once, at start)."""
        if self.warning is not None:
            log.warning("%s", self.warning)

    def publish(
        self,
        arrays: Arrays,
        round: RoundRecord | None,
        clients: Sequence[ClientRecord],
        number: int,
        privacy: Mapping[str, float] | None = None,
        data_stats: Mapping[int, DataSummary] | None = None,
    ) -> Published:
        """Publish ``arrays`` as of round ``number`` and run the gate; returns both.

        ``privacy`` (``dp.epsilon``, ``dp.delta``: the guarantee of the model as of that
        round) joins the version's metrics, where the gate's ``max_epsilon`` reads it.
        ``data_stats`` (the round's data summaries, with :attr:`drift_spec` set) become the
        version's training reference distribution (:mod:`fedlearn.drift.reference`),
        written before the gate decides, so a promoted version always has it (an endpoint
        that loads the version by number in between looks for it again after 5 s)."""
        with ModelRegistry(self.root) as registry:
            previous = [v for v in registry.versions(self.name) if v.run == self.run_id]
            version = registry.publish(
                self.name,
                arrays,
                run=self.run_id,
                round=number,
                metrics={**round_metrics(round), **(privacy or {})},
                client_summary=client_summary(clients, number) or None,
                factory=self.spec.factory,
                factory_params=dict(self.spec.params),
                signature=self.spec.signature,
                parent=previous[-1].version if previous else None,
            )
            total = None if data_stats is None else combined(data_stats)
            if self.drift_spec is not None and total is not None:
                save_reference(version.path, Reference(self.drift_spec, total))
            registry.set_alias(self.name, CANDIDATE, version.version)
            decision = registry.promote(self.name, version.version, self.gate)
        log.info("published %s v%d: %s", self.name, version.version, decision.reason)
        result = Published(version, decision)
        self.published.append(result)
        return result
