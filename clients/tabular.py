"""An MLP (or, with ``hidden=0``, multinomial logistic regression) for tabular data.

Usage::

    data = partition_dataset(load_dataset("breast_cancer"), "iid", 10, seed=0)
    run_simulation(lambda: make_app(data, lr=0.1), Strategy(), num_clients=10, rounds=5)
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

import torch
from torch import nn

from fedlearn import model_builder
from fedlearn.apps.torch_app import ClientDataSource, TorchClientApp, model_to_arrays
from fedlearn.engine.records import Arrays


class LabelledData(ClientDataSource, Protocol):
    """Client data that also knows its number of classes."""

    @property
    def num_classes(self) -> int: ...


@model_builder  # the registry names it; `fedlearn serve` may call it
def build_model(in_features: int, num_classes: int, hidden: int = 32) -> nn.Module:
    """One hidden ReLU layer of ``hidden`` units, or a linear model if ``hidden == 0``."""
    if hidden == 0:
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def make_app(data: LabelledData, *, hidden: int = 32, **params: Any) -> TorchClientApp:
    """A ClientApp for ``data``'s feature count and classes (params: epochs, lr, ...).

    ``data`` is a simulation's FederatedDataset or a site's own files; the feature count
    comes from its first client's training inputs.
    """
    in_features = data.client(0).x_train.shape[1]
    model_fn = partial(build_model, in_features, data.num_classes, hidden)
    return TorchClientApp(model_fn, data, **params)


def initial_breast_cancer(seed: int) -> Arrays:
    """Initial weights of the breast_cancer MLP (30 features, 2 classes), for a coordinator."""
    torch.manual_seed(seed)
    return model_to_arrays(build_model(30, 2))
