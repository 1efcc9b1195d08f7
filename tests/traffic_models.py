"""Model fixtures of the traffic-policy tests: tiny tabular MLPs in a registry.

Versions of ``mlp`` (4 features, 3 classes) with weights drawn from different seeds, so
that two versions really disagree on some inputs; and a builder of the same MLP that
refuses batches over ``max_batch`` (as a model exported with a fixed batch limit does),
registered here and served with ``allowed_factories=("clients.", "traffic_models")``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.tabular import build_model
from fedlearn import model_builder
from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.registry.model_registry import ModelRegistry

NAME = "mlp"
FEATURES, CLASSES, HIDDEN = 4, 3, 8
FACTORY = "clients.tabular:build_model"
LIMITED_FACTORY = "traffic_models:limited_batch_mlp"
ALLOWED = ("clients.", "traffic_models")
PARAMS = {"in_features": FEATURES, "num_classes": CLASSES, "hidden": HIDDEN}
SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, FEATURES]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}],
}


class LimitedBatchMLP(nn.Sequential):
    """The tabular MLP, failing on batches larger than ``max_batch``."""

    def __init__(self, max_batch: int) -> None:
        super().__init__(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
        self.max_batch = max_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_batch:
            raise RuntimeError(f"this model was exported for batches of at most {self.max_batch}")
        return super().forward(x)  # type: ignore[no-any-return]


@model_builder
def limited_batch_mlp(max_batch: int) -> nn.Module:
    """A :class:`LimitedBatchMLP` (keys as ``clients.tabular.build_model``'s)."""
    return LimitedBatchMLP(max_batch)


def seeded(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(FEATURES, CLASSES, HIDDEN).eval()


def publish(
    root: Path, seeds: tuple[int, ...], production: int, limited: int = 0
) -> list[nn.Module]:
    """Publish one ``mlp`` version per seed (v1 = seeds[0], ...), make ``production``
    production; the version numbered ``limited`` (if any) uses the batch-limited builder
    (``max_batch=4``). Returns the modules, ``modules[i]`` being version ``i + 1``."""
    modules = []
    with ModelRegistry(root) as registry:
        for i, seed in enumerate(seeds):
            module = seeded(seed)
            limit = i + 1 == limited
            registry.publish(
                NAME,
                model_to_arrays(module),
                run="traffic",
                round=i + 1,
                metrics={"accuracy": 0.5},
                client_summary=None,
                factory=LIMITED_FACTORY if limit else FACTORY,
                factory_params={"max_batch": 4} if limit else PARAMS,
                signature=SIGNATURE,
            )
            modules.append(module)
        registry.promote(NAME, production, None)
    return modules


def predict(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def rows(n: int, seed: int) -> np.ndarray:
    """``n`` random feature rows (float32, standard normal)."""
    return np.random.default_rng(seed).standard_normal((n, FEATURES), dtype=np.float32)


def body(x: np.ndarray) -> dict[str, object]:
    """An OIP JSON infer body for ``x``."""
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}
        ]
    }
