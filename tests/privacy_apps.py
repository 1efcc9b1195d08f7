"""A numpy ClientApp that answers client-side DP tasks the way a DP client runtime reports
them (``dp.noise_multiplier``, ``dp.clip`` in its train metrics), without applying any:
enough to test the coordinator's per-client accounting."""

from __future__ import annotations

from typing import Any

from fault_apps import FaultyLogReg
from fedlearn.engine.client_app import ClientContext, TrainResult
from fedlearn.engine.records import Arrays, Config


class ReportsLocalDP(FaultyLogReg):
    """FaultyLogReg whose train metrics echo the ``dp.*`` settings its task asked for."""

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        result = super().train(arrays, config, ctx)
        if config.get("dp.mode") != "local":
            return result
        metrics = {
            "dp.noise_multiplier": config["dp.noise_multiplier"],
            "dp.clip": config["dp.clip"],
            "asked": f"{config['dp.noise']} {config['dp.delta']}",
        }
        return TrainResult(result.arrays, result.num_examples, metrics)


def make_app(data: Any, **params: Any) -> ReportsLocalDP:
    """The ``[client] app`` factory."""
    return ReportsLocalDP(data, **params)
