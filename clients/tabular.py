"""An MLP (or, with ``hidden=0``, multinomial logistic regression) for tabular data.

Usage::

    data = partition_dataset(load_dataset("breast_cancer"), "iid", 10, seed=0)
    run_simulation(lambda: make_app(data, lr=0.1), Strategy(), num_clients=10, rounds=5)
"""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn

from fedlearn.data import FederatedDataset
from fedlearn.torch_app import TorchClientApp


def build_model(in_features: int, num_classes: int, hidden: int = 32) -> nn.Module:
    """One hidden ReLU layer of ``hidden`` units, or a linear model if ``hidden == 0``."""
    if hidden == 0:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def make_app(data: FederatedDataset, *, hidden: int = 32, **params: Any) -> TorchClientApp:
    """A ClientApp for ``data``'s feature count and classes (params: epochs, lr, ...)."""
    model_fn = partial(build_model, data.dataset.x.shape[1], data.num_classes, hidden)
    return TorchClientApp(model_fn, data, **params)
