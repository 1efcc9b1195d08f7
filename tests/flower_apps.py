"""Flower ClientApps (Message API and legacy) the Flower adapter tests run unchanged.

``counting``: each client counts its own train and evaluate calls in ``context.state``
and keeps the last arrays it was sent there; its update is ``x + (partition-id + 1)``
with ``num-examples = 10 * (partition-id + 1)``, so the FedAvg result is known by hand.
The ``bad_*`` apps return replies fedlearn cannot map.
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

counting = ClientApp()


def _count(context: Context, key: str) -> int:
    if "calls" not in context.state:
        context.state["calls"] = MetricRecord({"train": 0, "evaluate": 0})
    calls = context.state["calls"]
    calls[key] = int(calls[key]) + 1
    return int(calls[key])


@counting.train()
def counting_train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    calls = _count(context, "train")
    arrays = msg.content["arrays"]
    context.state["last"] = ArrayRecord(arrays.to_numpy_ndarrays())
    step = float(context.run_config.get("step", 1.0))
    update = {k: a.numpy() + step * (pid + 1) for k, a in arrays.items()}
    metrics = {
        "num-examples": 10 * (pid + 1),
        "train_calls": calls,
        "partition-id": pid,
        "num-partitions": int(context.node_config["num-partitions"]),
        "server-round": int(msg.content["config"]["server-round"]),
        "lr": float(msg.content["config"].get("lr", -1.0)),
        "worker": os.getpid(),
    }
    # a list, as Flower's templates return it: keys "0", "1", ... (named back by position)
    content = RecordDict(
        {"arrays": ArrayRecord(list(update.values())), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


@counting.evaluate()
def counting_evaluate(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    calls = _count(context, "evaluate")
    w = msg.content["arrays"].to_numpy_ndarrays()[0]
    metrics = {
        "num-examples": 5,
        "eval_loss": float(np.sum(w)) + pid,
        "eval_calls": calls,
        "train_calls_seen": int(context.state["calls"]["train"]),
        "worker": os.getpid(),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _reply(msg: Message, records: dict[str, object]) -> Message:
    return Message(RecordDict(records), reply_to=msg)  # type: ignore[arg-type]


bad_config = ClientApp()


@bad_config.train()
def bad_config_train(msg: Message, context: Context) -> Message:
    return _reply(
        msg,
        {
            "arrays": msg.content["arrays"],
            "metrics": MetricRecord({"num-examples": 3}),
            "extra": ConfigRecord({"note": "hi", "blob": b"x"}),
        },
    )


bad_list = ClientApp()


@bad_list.train()
def bad_list_train(msg: Message, context: Context) -> Message:
    return _reply(
        msg,
        {
            "arrays": msg.content["arrays"],
            "metrics": MetricRecord({"num-examples": 3, "losses": [0.5, 0.25]}),
        },
    )


bad_weight = ClientApp()


@bad_weight.train()
def bad_weight_train(msg: Message, context: Context) -> Message:
    return _reply(msg, {"arrays": msg.content["arrays"], "metrics": MetricRecord({"loss": 1.0})})


class TwiceClient(NumPyClient):  # type: ignore[misc]
    """A legacy NumPyClient: returns 2 * parameters + partition-id."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def get_parameters(self, config: dict[str, object]) -> list[np.ndarray]:
        return [np.ones(3), np.zeros(2)]

    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        return [2 * p + self.pid for p in parameters], 4, {"round": int(config["server_round"])}

    def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
        return float(parameters[0].sum()), 2, {"pid": self.pid}


def legacy_client_fn(context: Context):  # type: ignore[no-untyped-def]
    return TwiceClient(int(context.node_config["partition-id"])).to_client()


legacy = ClientApp(client_fn=legacy_client_fn)
