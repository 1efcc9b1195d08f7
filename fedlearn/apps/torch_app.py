"""A generic ClientApp for a torch classifier, and the matching centralized baseline.

:class:`TorchClientApp` serves every client id from one model instance: each task loads
the global arrays into it, trains (or evaluates) on that client's split and hands back
numpy copies of its ``state_dict``. Training is plain minibatch SGD on cross entropy,
shuffled by a ``torch.Generator`` seeded from the task seed, so a seeded run gives the
same arrays bit for bit. :func:`train_centralized` runs the very same loop on pooled
data, for federated-vs-centralized comparisons.

Config keys a strategy may send with a training task (each overrides the constructor
value for that task): ``epochs``, ``batch_size``, ``lr``, ``momentum``,
``weight_decay`` and ``proximal_mu`` (FedProx: adds ``mu/2 * ||w - w_global||^2`` to
the loss when positive). With ``fednova = True`` (FedNova) a reply also reports the
number of local steps (``fednova.steps``) and the optimizer's ``fednova.a``. A training
broadcast that carries SCAFFOLD control variates (``scaffold.c/<name>``) makes every
local step use the gradient corrected by ``c - c_i``, with ``c_i`` kept in the client's
own state (:mod:`fedlearn.strategy.scaffold`). With ``dp.mode = "example"`` (and ``dp.clip``,
``dp.noise_multiplier``, ``dp.noise``, ``dp.delta``) training is example-level DP-SGD
through Opacus instead (:mod:`fedlearn.privacy.dpsgd`, the ``privacy`` extra).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedlearn.drift.stats import DataSummary, SummarySpec, summarize
from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config, Scalar
from fedlearn.errors import ConfigError
from fedlearn.privacy.keys import task_dp
from fedlearn.registry.spec import ServingSpec, derive_spec
from fedlearn.strategy import fednova, scaffold

__all__ = [
    "ClientDataSource",
    "ClientTensors",
    "SplitData",
    "TorchClientApp",
    "TrainSettings",
    "arrays_to_model",
    "evaluate_arrays",
    "evaluate_model",
    "fit",
    "model_inputs",
    "model_to_arrays",
    "train_centralized",
]

EVAL_BATCH_SIZE = 1024


class SplitData(Protocol):
    """One client's train and test arrays (e.g. :class:`fedlearn.data.ClientData`)."""

    @property
    def x_train(self) -> np.ndarray: ...

    @property
    def y_train(self) -> np.ndarray: ...

    @property
    def x_test(self) -> np.ndarray: ...

    @property
    def y_test(self) -> np.ndarray: ...


class ClientDataSource(Protocol):
    """Where the app finds a client's data (e.g. :class:`fedlearn.data.FederatedDataset`)."""

    def client(self, cid: int) -> SplitData: ...


@dataclass(frozen=True)
class TrainSettings:
    """Hyperparameters of the local SGD loop."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        """Reject values the loop cannot run with."""
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        for name in ("lr", "momentum", "weight_decay", "proximal_mu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")

    def override(self, config: Mapping[str, Scalar]) -> TrainSettings:
        """These settings with any of their fields that ``config`` names replaced."""
        changes = {name: config[name] for name in _SETTING_KEYS if name in config}
        if not changes:
            return self
        for name in ("epochs", "batch_size"):
            value = changes.get(name)
            if isinstance(value, float) and value.is_integer():
                changes[name] = int(value)
        try:
            return replace(self, **changes)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(f"bad training config: {exc}") from None


_SETTING_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "proximal_mu")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ClientTensors:
    """A client's data as tensors, converted once."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def model_inputs(x: np.ndarray) -> torch.Tensor:
    """A copy of ``x`` as the model takes it: float32 (or int64 for token ids)."""
    dtype = np.float32 if np.issubdtype(x.dtype, np.floating) else np.int64
    return torch.from_numpy(np.array(x, dtype=dtype))


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))


def _tensors(data: SplitData) -> ClientTensors:
    return ClientTensors(
        model_inputs(data.x_train),
        _labels(data.y_train),
        model_inputs(data.x_test),
        _labels(data.y_test),
    )


def model_to_arrays(model: nn.Module) -> Arrays:
    """The model's ``state_dict`` as numpy copies, in ``state_dict`` order."""
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def arrays_to_model(model: nn.Module, arrays: Arrays) -> None:
    """Copy ``arrays`` into ``model`` (names and shapes must match its ``state_dict``).

    ``arrays`` may be read-only views (the transports hand out such views of the global
    model): ``load_state_dict`` copies out of them and never writes to them.
    """
    expected = model.state_dict().keys()
    if arrays.keys() != expected:
        missing = sorted(expected - arrays.keys())
        unexpected = sorted(arrays.keys() - expected)
        raise ValueError(
            f"arrays do not match the model: missing {missing}, unexpected {unexpected}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {name: torch.from_numpy(np.ascontiguousarray(arrays[name])) for name in expected}
    model.load_state_dict(state, strict=True)


class _SGD:
    """Minibatch SGD with momentum and L2 weight decay: ``torch.optim.SGD``'s update rule.

    Written out because the first ``torch.optim`` optimizer in a process imports
    ``torch._dynamo``, which takes seconds in every fresh worker.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        settings: TrainSettings,
        correction: list[torch.Tensor | None] | None = None,
    ) -> None:
        self.params = params
        self.lr = float(settings.lr)
        self.momentum = float(settings.momentum)
        self.weight_decay = float(settings.weight_decay)
        self.correction = correction or [None] * len(params)
        self._velocity: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self) -> None:
        """Drop every gradient."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """``g = grad + wd * w (+ correction)``; ``v = momentum * v + g`` (``v = g`` at
        first); ``w -= lr * v``. The correction is SCAFFOLD's ``c - c_i``."""
        with torch.no_grad():
            for i, p in enumerate(self.params):
                grad = p.grad
                if grad is None:
                    continue
                if self.weight_decay:
                    grad = grad.add(p, alpha=self.weight_decay)
                correction = self.correction[i]
                if correction is not None:
                    grad = grad.add(correction)
                if self.momentum:
                    velocity = self._velocity[i]
                    if velocity is None:
                        velocity = self._velocity[i] = grad.clone()
                    else:
                        velocity.mul_(self.momentum).add_(grad)
                    grad = velocity
                p.add_(grad, alpha=-self.lr)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
    correction: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Train ``model`` in place with minibatch SGD on cross entropy.

    Every epoch visits the samples in a fresh order drawn from ``generator``. When
    ``settings.proximal_mu > 0`` the loss gets ``mu/2 * ||w - w_0||^2``, with ``w_0``
    the parameters ``model`` held on entry (FedProx). ``correction`` (by parameter name)
    is added to each parameter's gradient at every step (SCAFFOLD's ``c - c_i``).

    Returns the mean cross entropy and the accuracy over the last epoch (measured on
    each minibatch as it was trained, without the proximal term).
    """
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("cannot train on an empty training split")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    mu = float(settings.proximal_mu)
    anchor = [p.detach().clone() for p in params] if mu > 0 else []
    shifts = None if correction is None else [correction.get(name) for name, _ in named]
    optimizer = _SGD(params, settings, shifts)
    model.train()
    loss_sum = 0.0
    correct = 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        loss_sum, correct = 0.0, 0
        for start in range(0, n, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            xb, yb = x[batch], y[batch]
            optimizer.zero_grad()
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            objective = loss
            if mu > 0:
                proximal = sum(((p - g) ** 2).sum() for p, g in zip(params, anchor, strict=True))
                objective = loss + (mu / 2) * proximal
            torch.autograd.backward(objective)
            optimizer.step()
            loss_sum += float(loss.detach()) * int(yb.shape[0])
            correct += int((logits.detach().argmax(dim=1) == yb).sum())
    return loss_sum / n, correct / n


def evaluate_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float]:
    """Mean cross entropy and accuracy of ``model`` on ``(x, y)`` (in eval mode)."""
    n = int(y.shape[0])
    if n == 0:
        raise ValueError("cannot evaluate on an empty test split")
    model.eval()
    loss_sum = 0.0
    correct = 0
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(xb)
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(dim=1) == yb).sum())
    return loss_sum / n, correct / n


class TorchClientApp:
    """A ClientApp that trains and evaluates a torch classifier on each client's split.

    Parameters
    ----------
    model_fn
        Builds the model (outputs are class logits). It is called once per app; that
        one instance serves every client id.
    data
        Gives each client's ``x_train, y_train, x_test, y_test`` via ``data.client(cid)``.
    epochs, batch_size, lr, momentum, weight_decay
        Local SGD settings; a training config may override any of them (and set
        ``proximal_mu`` for FedProx).
    device
        Where training and evaluation run (``"cpu"``, ``"cuda"``, ``"cuda:1"``). The
        model moves there on the first task, so a parent process that only builds the
        app (a pool backend forks workers from it) never initializes CUDA. Results on a
        GPU are close to, not bit-identical with, the CPU's.
    shift_client, shift_round, shift_offset
        A simulation hook for drift monitoring: from round ``shift_round`` on, client
        ``shift_client``'s float inputs (train and test) are moved by ``shift_offset``
        (``-1``: no client moves). Its data summaries move with them.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        data: ClientDataSource,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        device: str = "cpu",
        shift_client: int = -1,
        shift_round: int = 1,
        shift_offset: float = 0.0,
    ) -> None:
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device: {device!r} is not a torch device ({exc})") from None
        self.model_fn = model_fn
        self.data = data
        self.settings = TrainSettings(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
        )
        self.model = model_fn()
        self._placed = self.device.type == "cpu"
        self._cache: dict[int, ClientTensors] = {}
        self.shift = (int(shift_client), int(shift_round), float(shift_offset))
        self._summaries: dict[tuple[int, float, SummarySpec], DataSummary] = {}

    def _offset(self, ctx: ClientContext) -> float:
        """How far this task's client inputs are moved (the drift hook; 0: not)."""
        client, start, offset = self.shift
        return offset if ctx.client_id == client and ctx.round >= start else 0.0

    def _moved(self, x: torch.Tensor, ctx: ClientContext) -> torch.Tensor:
        offset = self._offset(ctx)
        return x + offset if offset and x.dtype.is_floating_point else x

    def data_summary(self, spec: SummarySpec, ctx: ClientContext) -> DataSummary:
        """The summary of the client's training split as this round sees it (cached:
        the data does not change between rounds unless the drift hook moves it)."""
        offset = self._offset(ctx)
        key = (ctx.client_id, offset, spec)
        found = self._summaries.get(key)
        if found is None:
            data = self.data.client(ctx.client_id)
            x = np.asarray(data.x_train)
            if offset and np.issubdtype(x.dtype, np.floating):
                x = x + offset
            found = self._summaries[key] = summarize(x, np.asarray(data.y_train), spec)
        return found

    def _placed_model(self) -> nn.Module:
        """The model, moved to ``device`` on first use."""
        if not self._placed:
            if self.device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError(f"device {self.device} asked for, but CUDA is not available")
            self.model.to(self.device)
            self._placed = True
        return self.model

    def initial_arrays(self, seed: int) -> Arrays:
        """Weights of a fresh model built under ``torch.manual_seed(seed)``.

        The global torch RNG is restored afterwards.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return model_to_arrays(self.model_fn())

    def serving_spec(self) -> ServingSpec:
        """How a registry rebuilds and serves this app's model (factory, arguments,
        signature), derived from ``model_fn`` and client 0's test inputs."""
        data = self.data.client(0)
        x = data.x_test if len(data.x_test) else data.x_train
        return derive_spec(self.model_fn, model_inputs(np.asarray(x[:1])))

    def client_tensors(self, cid: int) -> ClientTensors:
        """Client ``cid``'s data as tensors (converted on first use, then cached)."""
        tensors = self._cache.get(cid)
        if tensors is None:
            tensors = _tensors(self.data.client(cid))
            if self.device.type != "cpu":
                self._placed_model()  # checks the device is there
                tensors = ClientTensors(
                    *(getattr(tensors, f.name).to(self.device) for f in dataclasses.fields(tensors))
                )
            self._cache[cid] = tensors
        return tensors

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        """Load ``arrays``, run local SGD (or DP-SGD, with ``dp.mode = "example"``) on the
        client's train split, return new arrays."""
        settings = self.settings.override(config)
        data = self.client_tensors(ctx.client_id)
        if data.y_train.shape[0] == 0:
            raise ValueError(f"client {ctx.client_id} has no training samples")
        model = self._placed_model()
        start, c = scaffold.split_controls(arrays)
        arrays_to_model(model, start)
        n = int(data.y_train.shape[0])
        dp = task_dp(config)
        if dp is not None and dp.mode == "example":
            if c:
                raise ValueError("SCAFFOLD with example-level DP-SGD is not supported")
            from fedlearn.privacy.dpsgd import fit_private

            x = self._moved(data.x_train, ctx)
            private = fit_private(model, x, data.y_train, settings, dp, ctx.seed)
            return TrainResult(model_to_arrays(model), n, private)
        c_i = scaffold.client_controls(ctx.state, c) if c else {}
        correction = {
            name: torch.from_numpy(np.asarray(c[name] - c_i[name])).to(self.device) for name in c
        }
        generator = torch.Generator().manual_seed(ctx.seed)
        loss, accuracy = fit(
            model,
            self._moved(data.x_train, ctx),
            data.y_train,
            settings,
            generator,
            correction or None,
        )
        steps = settings.epochs * math.ceil(n / settings.batch_size)
        trained = model_to_arrays(model)
        if c:
            trained = scaffold.client_reply(
                ctx.state, c, c_i, start, trained, steps, float(settings.lr)
            )
        metrics: dict[str, Scalar] = {"train_loss": loss, "train_accuracy": accuracy}
        if config.get(fednova.REPORT_KEY) is True:
            metrics[fednova.STEPS_KEY] = steps
            metrics[fednova.NORM_KEY] = fednova.momentum_norm(steps, settings.momentum)
        return TrainResult(trained, n, metrics)

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        """Mean cross entropy and accuracy of ``arrays`` on the client's test split."""
        data = self.client_tensors(ctx.client_id)
        n = int(data.y_test.shape[0])
        if n == 0:
            raise ValueError(f"client {ctx.client_id} has an empty test split")
        model = self._placed_model()
        arrays_to_model(model, arrays)
        loss, accuracy = evaluate_model(model, self._moved(data.x_test, ctx), data.y_test)
        return EvaluateResult(n, loss, {"accuracy": accuracy})


def train_centralized(
    model_fn: Callable[[], nn.Module],
    data: SplitData,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> tuple[float, float]:
    """Train a fresh model on ``data``'s train split; return its test loss and accuracy.

    The model is built under ``torch.manual_seed(seed)`` (so it starts from the same
    weights as ``TorchClientApp.initial_arrays(seed)``) and trained by the same loop as
    the clients. The global torch RNG is restored afterwards.
    """
    settings = TrainSettings(
        epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    tensors = _tensors(data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
        fit(model, tensors.x_train, tensors.y_train, settings, torch.Generator().manual_seed(seed))
    return evaluate_model(model, tensors.x_test, tensors.y_test)


def evaluate_arrays(
    model_fn: Callable[[], nn.Module], arrays: Arrays, data: SplitData
) -> tuple[float, float]:
    """Test loss and accuracy of ``arrays`` (e.g. a final global model) on ``data``."""
    with torch.random.fork_rng(devices=[]):
        model = model_fn()
    arrays_to_model(model, arrays)
    return evaluate_model(model, model_inputs(data.x_test), _labels(data.y_test))
