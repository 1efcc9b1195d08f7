"""The Flower peer workload as a fedlearn *site* app, for deployment benchmarks.

A site daemon builds its ClientApp as ``factory(data, **params)`` from ``site.toml``; this
module provides that factory for the peer workload of ``shared/peers/flower/sim_bench.py``
(see :mod:`benchmarks.peer_workload`), plus the coordinator's model factory and a helper
that writes one client's peer data as the site's ``.npz``::

    # site-3.toml                                  # coordinator.toml
    [data]                                         [model]
    path = "site-3.npz"                            factory = "benchmarks.peer_site:initial_arrays"
    [client]
    app = "benchmarks.peer_site:make_app"

``write_site_npz("site-3.npz", 3)`` writes exactly the arrays ``make_data(3)`` returns, so a
site enrolled as client 3 trains on what Flower's ClientApp generates for partition-id 3,
with the same numpy operations in the same order: the update is bit-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peer_workload import D, local_train, loss_acc, make_data
from fedlearn.data import ClientData
from fedlearn.deploy.launch import LocalData
from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config


def write_site_npz(path: str | Path, partition_id: int) -> Path:
    """Write the peer's data of client ``partition_id`` as a site ``.npz`` (no pickle)."""
    x_train, y_train, x_test, y_test = make_data(partition_id)
    path = Path(path)
    with path.open("wb") as f:
        np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def initial_arrays(seed: int) -> Arrays:
    """The peer's initial global model (all zeros), for ``[model] factory``."""
    return {"w": np.zeros(D), "b": np.zeros(1)}


class PeerSiteApp:
    """The peer ClientApp on one site's own data (``x_train, y_train, x_test, y_test``)."""

    def __init__(self, data: Any) -> None:
        self.x_train = np.asarray(data.x_train, dtype=np.float64)
        self.y_train = np.asarray(data.y_train, dtype=np.float64)
        self.x_test = np.asarray(data.x_test, dtype=np.float64)
        self.y_test = np.asarray(data.y_test, dtype=np.float64)

    def initial_arrays(self, seed: int) -> Arrays:
        """The peer's initial model."""
        return initial_arrays(seed)

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        """5 epochs of full-batch GD (lr 0.1) from the global model; reports the train loss."""
        w, b = local_train(arrays["w"], arrays["b"], self.x_train, self.y_train)
        loss, _ = loss_acc(w, b, self.x_train, self.y_train)
        return TrainResult({"w": w, "b": b}, len(self.y_train), {"train_loss": loss})

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        """Log-loss and accuracy of the global model on the site's held-out data."""
        loss, acc = loss_acc(arrays["w"], arrays["b"], self.x_test, self.y_test)
        return EvaluateResult(len(self.y_test), loss, {"accuracy": acc})


def make_app(data: Any, **params: Any) -> PeerSiteApp:
    """``[client] app`` factory: ``data`` is what ``[data]`` loaded (``path = site.npz``).

    A site's own data (:class:`fedlearn.deploy.launch.LocalData`) is the same whatever
    client id the coordinator gives it; ``params`` may name ``partition_id`` to generate
    the peer's data of that client instead, as Flower's ``--node-config partition-id``.
    """
    partition_id = params.pop("partition_id", None)
    if params:
        raise TypeError(f"unexpected params: {sorted(params)}")
    if partition_id is not None:
        return PeerSiteApp(ClientData(*make_data(int(partition_id))))
    if not isinstance(data, LocalData):
        raise TypeError(
            "the peer site app needs [data] path = a .npz from write_site_npz (or "
            f"params.partition_id), not {type(data).__name__}"
        )
    return PeerSiteApp(data.data)
