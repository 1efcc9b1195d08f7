"""A custom strategy in a few lines: FedAvg over norm-clipped client deltas.

Each client's change to the global model is scaled down to at most ``max_norm`` (L2 over
all arrays) before the weighted mean, which bounds how far one client can pull the
model. The fold still streams: no list of client models is ever kept. With
``max_epochs`` set, each client also trains its own seeded number of epochs per round
(stragglers), through the per-client config hook.

Run it:  fedlearn simulate simulations/custom_strategy.toml
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlearn import Arrays, ClientUpdate, Config, RoundContext, Strategy, WeightedMeanFold


class ClippedDeltaFold(WeightedMeanFold):
    def __init__(self, global_arrays: Arrays, max_norm: float) -> None:
        super().__init__()
        self.global_arrays, self.max_norm = global_arrays, max_norm

    def add(self, update: ClientUpdate) -> None:
        deltas = {k: v - self.global_arrays[k] for k, v in update.arrays.items()}
        norm = float(np.sqrt(sum(np.sum(np.square(d, dtype=np.float64)) for d in deltas.values())))
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        clipped = {
            k: (self.global_arrays[k] + scale * d).astype(d.dtype) for k, d in deltas.items()
        }
        super().add(ClientUpdate(update.client_id, clipped, update.num_examples, update.metrics))


@dataclass(frozen=True, kw_only=True)
class ClippedFedAvg(Strategy):
    max_norm: float = 1.0
    max_epochs: int = 0

    def start_fold(self, ctx: RoundContext, global_arrays: Arrays) -> ClippedDeltaFold:
        return ClippedDeltaFold(global_arrays, self.max_norm)

    def client_train_config(self, ctx: RoundContext, client_id: int, config: Config) -> Config:
        if not self.max_epochs:
            return config
        rng = np.random.default_rng([ctx.seed, ctx.round, client_id])
        return {**config, "epochs": int(rng.integers(1, self.max_epochs + 1))}
