"""Flower app projects written into a directory the way ``flwr new`` lays them out:
``pyproject.toml`` naming the components, config and federation, and a package with
``client_app.py``, ``server_app.py`` and ``task.py``.

``numpy``: softmax regression on scikit-learn's digits, partitioned by ``partition-id``.
``torch``: a small MLP on the same data (torch state_dict in the ArrayRecord).
``custom_loop``: a ServerApp whose main sends messages itself.
Each call takes a package name, so tests in one process never share a cached module.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "A Flower app"
license = "Apache-2.0"
dependencies = ["flwr[simulation]>=1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlearn-tests"

[tool.flwr.app.components]
serverapp = "{package}.server_app:app"
clientapp = "{package}.client_app:app"

[tool.flwr.app.config]
{config}

[tool.flwr.federations]
default = "local-simulation"

[tool.flwr.federations.local-simulation]
options.num-supernodes = {nodes}
"""

TASK = '''\
"""{package}: data and model."""

import numpy as np
from sklearn.datasets import load_digits


def load_data(partition_id: int, num_partitions: int):
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(42).permutation(len(y))
    part = np.array_split(order, num_partitions)[partition_id]
    x, y = x[part] / 16.0, y[part]
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]
'''

NUMPY_TASK_EXTRA = """

def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_acc(w, b, x, y):
    p = softmax(x @ w + b)
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
    return loss, float(np.mean(p.argmax(axis=1) == y))


def fit(w, b, x, y, lr, epochs):
    w, b = w.copy(), b.copy()
    onehot = np.eye(10)[y]
    for _ in range(epochs * 10):
        g = softmax(x @ w + b) - onehot
        w -= lr * x.T @ g / len(y)
        b -= lr * g.mean(axis=0)
    return w, b
"""

NUMPY_CLIENT = '''\
"""{package}: a Flower ClientApp."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from {package}.task import fit, load_data, loss_acc

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    pid = context.node_config["partition-id"]
    x, y, _, _ = load_data(pid, context.node_config["num-partitions"])
    w, b = msg.content["arrays"].to_numpy_ndarrays()
    lr = msg.content["config"]["lr"]
    w, b = fit(w, b, x, y, lr, context.run_config["local-epochs"])
    loss, _ = loss_acc(w, b, x, y)
    metrics = MetricRecord({{"train_loss": loss, "num-examples": len(y)}})
    return Message(RecordDict({{"arrays": ArrayRecord([w, b]), "metrics": metrics}}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    node = context.node_config
    _, _, xt, yt = load_data(node["partition-id"], node["num-partitions"])
    w, b = msg.content["arrays"].to_numpy_ndarrays()
    loss, acc = loss_acc(w, b, xt, yt)
    metrics = MetricRecord({{"eval_loss": loss, "eval_acc": acc, "num-examples": len(yt)}})
    return Message(RecordDict({{"metrics": metrics}}), reply_to=msg)
'''

NUMPY_SERVER = '''\
"""{package}: a Flower ServerApp."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import {strategy}

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = context.run_config["num-server-rounds"]
    fraction_train = context.run_config["fraction-train"]
    lr = context.run_config["lr"]
    arrays = ArrayRecord([np.zeros((64, 10)), np.zeros(10)])
    strategy = {strategy}(fraction_train=fraction_train, min_available_nodes=2{extra})
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({{"lr": lr}}),
        num_rounds=num_rounds,
    )
    np.savez("final_model.npz", *result.arrays.to_numpy_ndarrays())
'''

TORCH_TASK_EXTRA = """

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def train(net, x, y, epochs, lr):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    net.train()
    for _ in range(epochs):
        for i in range(0, len(y), 32):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[i : i + 32]), y[i : i + 32])
            loss.backward()
            opt.step()
    return float(loss)


def test(net, x, y):
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    net.eval()
    with torch.no_grad():
        out = net(x)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())
"""

TORCH_CLIENT = '''\
"""{package}: a Flower ClientApp (PyTorch)."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from {package}.task import Net, load_data, test, train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    node = context.node_config
    x, y, _, _ = load_data(node["partition-id"], node["num-partitions"])
    loss = train_fn(model, x, y, context.run_config["local-epochs"], msg.content["config"]["lr"])
    model_record = ArrayRecord(model.state_dict())
    metrics = MetricRecord({{"train_loss": loss, "num-examples": len(y)}})
    return Message(RecordDict({{"arrays": model_record, "metrics": metrics}}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    node = context.node_config
    _, _, xt, yt = load_data(node["partition-id"], node["num-partitions"])
    loss, acc = test(model, xt, yt)
    metrics = MetricRecord({{"eval_loss": loss, "eval_acc": acc, "num-examples": len(yt)}})
    return Message(RecordDict({{"metrics": metrics}}), reply_to=msg)
'''

TORCH_SERVER = '''\
"""{package}: a Flower ServerApp (PyTorch)."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from {package}.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())
    strategy = FedAvg(fraction_train=context.run_config["fraction-train"])
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({{"lr": context.run_config["lr"]}}),
        num_rounds=context.run_config["num-server-rounds"],
    )
    torch.save(result.arrays.to_torch_state_dict(), "final_model.pt")
'''

CUSTOM_LOOP_SERVER = '''\
"""{package}: a ServerApp with its own loop."""

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    for node in grid.get_node_ids():
        content = RecordDict({{"config": ConfigRecord({{"hello": 1}})}})
        grid.send_and_receive([Message(content, node, MessageType.TRAIN)])
'''

NUMPY_CONFIG = {"num-server-rounds": 3, "fraction-train": 0.5, "local-epochs": 1, "lr": 0.5}


def _write(directory: Path, package: str, files: dict[str, str], config: dict, nodes: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = "\n".join(f"{k} = {_toml(v)}" for k, v in config.items())
    (directory / "pyproject.toml").write_text(
        PYPROJECT.format(name=package.replace("_", "-"), package=package, config=lines, nodes=nodes)
    )
    (directory / package).mkdir(exist_ok=True)
    (directory / package / "__init__.py").write_text(f'"""{package}: a Flower app."""\n')
    for name, text in files.items():
        (directory / package / name).write_text(textwrap.dedent(text.format(package=package)))
    return directory


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def numpy_project(
    directory: Path, package: str, nodes: int = 10, strategy: str = "FedAvg", extra: str = ""
) -> Path:
    """The numpy template (``strategy(..., extra)`` in the ServerApp)."""
    server = NUMPY_SERVER.replace("{strategy}", strategy).replace("{extra}", extra)
    files = {
        "task.py": TASK + NUMPY_TASK_EXTRA,
        "client_app.py": NUMPY_CLIENT,
        "server_app.py": server,
    }
    return _write(directory, package, files, NUMPY_CONFIG, nodes)


def torch_project(directory: Path, package: str, nodes: int = 4) -> Path:
    """The PyTorch template."""
    files = {
        "task.py": TASK + TORCH_TASK_EXTRA,
        "client_app.py": TORCH_CLIENT,
        "server_app.py": TORCH_SERVER,
    }
    config = {"num-server-rounds": 2, "fraction-train": 1.0, "local-epochs": 1, "lr": 0.1}
    return _write(directory, package, files, config, nodes)


def custom_loop_project(directory: Path, package: str) -> Path:
    """A project whose ServerApp sends messages itself."""
    files = {"client_app.py": NUMPY_CLIENT, "task.py": TASK, "server_app.py": CUSTOM_LOOP_SERVER}
    return _write(directory, package, files, {"num-server-rounds": 1}, 2)
