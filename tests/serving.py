"""Shared serving fixtures: a registry holding seeded MNIST CNN versions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from clients.mnist import build_model
from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.registry.model_registry import Gate, ModelRegistry

MNIST_FACTORY = "clients.mnist:build_model"
MNIST_SIGNATURE = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}


def seeded_model(seed: int) -> nn.Module:
    """The MNIST CNN with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return build_model().eval()


def publish_mnist(
    root: Path, seeds: tuple[int, ...] = (0,), accuracy: tuple[float, ...] | None = None
) -> list[nn.Module]:
    """Publish one seeded version per seed as ``mnist`` and promote each in turn.

    Returns the modules, version ``i + 1`` being ``modules[i]``; with increasing
    ``accuracy`` (the default) every version passes the gate, so the last is production.
    """
    accuracy = accuracy or tuple(0.5 + 0.01 * i for i in range(len(seeds)))
    modules = []
    with ModelRegistry(root) as registry:
        for seed, acc in zip(seeds, accuracy, strict=True):
            module = seeded_model(seed)
            version = registry.publish(
                "mnist",
                model_to_arrays(module),
                run="test",
                round=len(modules) + 1,
                metrics={"accuracy": acc},
                client_summary={"accuracy_worst": acc - 0.1},
                factory=MNIST_FACTORY,
                signature=MNIST_SIGNATURE,
            )
            registry.promote("mnist", version.version, Gate("accuracy"))
            modules.append(module)
    return modules


def predict(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """The module's logits for ``x``, computed in-process."""
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def digits(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random 1x28x28 float32 images."""
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def undecorated_build(in_features: int, num_classes: int, hidden: int = 0) -> nn.Module:
    """A builder nobody registered: publishing names it, serving refuses it."""
    return nn.Linear(in_features, num_classes)
