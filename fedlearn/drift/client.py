"""The client's half of drift monitoring: a ClientApp that can summarize its own training
data, and the runtime's hook that asks it to when a task's config carries drift settings."""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol, runtime_checkable

import numpy as np

from fedlearn.drift.codec import to_reply_arrays
from fedlearn.drift.stats import DataSummary, SummarySpec
from fedlearn.engine.client_app import ClientContext
from fedlearn.engine.messages import Reply
from fedlearn.engine.records import Config
from fedlearn.errors import ConfigError


@runtime_checkable
class ProvidesDataSummary(Protocol):
    """A ClientApp that can summarize the data it trains on (e.g. TorchClientApp)."""

    def data_summary(self, spec: SummarySpec, ctx: ClientContext) -> DataSummary:
        """The summary (:func:`fedlearn.drift.stats.summarize`) of this client's training
        data as the task's round sees it."""
        ...


def task_summary(
    app: object, config: Config, ctx: ClientContext, *, required: bool
) -> tuple[SummarySpec, DataSummary] | None:
    """The summary a task asks for, or None when it asks for none (or, unless
    ``required``, when the app cannot summarize its data)."""
    spec = SummarySpec.from_config(config)
    if spec is None:
        return None
    if not isinstance(app, ProvidesDataSummary):
        if required:
            raise ConfigError(
                "drift monitoring under secure aggregation needs every client app to "
                "summarize its data (a data_summary(spec, ctx) method)"
            )
        return None
    summary = app.data_summary(spec, ctx)
    if not isinstance(summary, DataSummary):
        raise TypeError(f"data_summary() must return DataSummary, not {type(summary).__name__}")
    return spec, summary


def attach_summary(reply: Reply, app: object, config: Config, ctx: ClientContext) -> Reply:
    """``reply`` (a plain training reply) with the client's summary beside its arrays."""
    found = task_summary(app, config, ctx, required=False)
    if found is None or reply.arrays is None:
        return reply
    extra = to_reply_arrays(found[1])
    clash = [name for name in extra if name in reply.arrays]
    if clash:
        raise ConfigError(f"the model has arrays named like a data summary: {clash}")
    arrays: dict[str, np.ndarray] = {**reply.arrays, **extra}
    return replace(reply, arrays=arrays)
