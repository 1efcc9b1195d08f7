"""A small CNN for 1x28x28 MNIST digits, wrapped as a ClientApp.

Usage::

    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", 20, seed=0)
    run_simulation(lambda: make_app(data, lr=0.05), Strategy(), num_clients=20, rounds=10)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedlearn import model_builder
from fedlearn.apps.torch_app import ClientDataSource, TorchClientApp


@model_builder  # the registry names it; `fedlearn serve` may call it
def build_model() -> nn.Module:
    """Conv(1->16, 5x5) + pool, conv(16->32, 5x5) + pool, linear -> 10 logits."""
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=5),  # 28 -> 24
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 12
        nn.Conv2d(16, 32, kernel_size=5),  # -> 8
        nn.ReLU(),
        nn.MaxPool2d(2),  # -> 4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def make_app(data: ClientDataSource, **params: Any) -> TorchClientApp:
    """A ClientApp training :func:`build_model` on ``data`` (params: epochs, lr, ...)."""
    return TorchClientApp(build_model, data, **params)
