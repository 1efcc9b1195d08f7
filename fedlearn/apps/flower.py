"""Run an existing Flower ``NumPyClient`` unchanged as a fedlearn ClientApp.

:class:`FlowerClientApp` wraps a Flower-style client (anything with
``get_parameters(config)``, ``fit(parameters, config)`` and
``evaluate(parameters, config)``), or a factory ``client_fn(client_id) -> client``,
and presents it as a fedlearn :class:`~fedlearn.engine.client_app.ClientApp`::

    app = FlowerClientApp(lambda cid: MyNumPyClient(data.client(cid)))
    run_simulation(lambda: app, FedAvg(), num_clients=10, rounds=5)

How the two APIs meet:

* **arrays**: fedlearn's named :data:`~fedlearn.engine.records.Arrays` become Flower's
  ``list[np.ndarray]`` in the mapping's order, and the list a client returns is named
  back by position with the names of the arrays it was given. :meth:`initial_arrays`
  names the client's ``get_parameters({})`` ``p0, p1, ...`` (or ``names``). Every array
  is copied on the way in and out, as Flower's serialization would, so a client may
  modify what it receives and keep references to what it returns.
* **config**: the task's config (bool, int, float and str values) is passed as a fresh
  dict, with ``server_round`` set to the task's round unless the strategy's config
  already names that key (Flower's ``on_fit_config_fn(server_round)`` idiom).
* **results**: ``fit``'s ``(parameters, num_examples, metrics)`` becomes a
  :class:`~fedlearn.engine.client_app.TrainResult` and ``evaluate``'s
  ``(loss, num_examples, metrics)`` an :class:`~fedlearn.engine.client_app.EvaluateResult`.
  What the client returns is checked; a wrong shape of reply raises a ``TypeError``
  (a wrong number of arrays a ``ValueError``) naming the client class and method, and
  the runtime records it as that client's failure. Metrics must be bool, int, float or
  str (Flower also allows bytes; fedlearn metrics do not).

Flower itself is not imported: the adapter works on any object with those three
methods, so ``flwr`` need only be installed where the client's own code imports it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeAlias, cast

import numpy as np

from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import ALLOWED_DTYPES, Arrays, Config, Metrics, Scalar

__all__ = [
    "FlowerClientApp",
    "FlowerConfig",
    "FlowerScalar",
    "NumPyClientLike",
    "arrays_to_ndarrays",
    "ndarrays_to_arrays",
]

FlowerScalar: TypeAlias = bool | bytes | float | int | str
"""A value in a Flower config or metrics dict."""

FlowerConfig: TypeAlias = dict[str, FlowerScalar]
"""The config dict a Flower client's ``fit``/``evaluate``/``get_parameters`` receives."""

_METHODS = ("get_parameters", "fit", "evaluate")


class NumPyClientLike(Protocol):
    """What the adapter needs of a client: the three methods of ``flwr.client.NumPyClient``.

    Return values are typed ``object`` because the adapter checks them at run time.
    """

    def get_parameters(self, config: FlowerConfig) -> object:
        """The local model parameters as a list of numpy arrays."""
        ...

    def fit(self, parameters: list[np.ndarray], config: FlowerConfig) -> object:
        """Train from ``parameters``; return ``(parameters, num_examples, metrics)``."""
        ...

    def evaluate(self, parameters: list[np.ndarray], config: FlowerConfig) -> object:
        """Evaluate ``parameters``; return ``(loss, num_examples, metrics)``."""
        ...


ClientFn: TypeAlias = Callable[[int], NumPyClientLike]


def _is_client(obj: object) -> bool:
    return all(callable(getattr(obj, method, None)) for method in _METHODS)


def arrays_to_ndarrays(arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Writable copies of ``arrays``' values, in the mapping's order (Flower's ``NDArrays``)."""
    return [np.array(a, copy=True) for a in arrays.values()]


def ndarrays_to_arrays(ndarrays: Sequence[np.ndarray], names: Sequence[str]) -> Arrays:
    """Copies of ``ndarrays`` named by position; the two sequences must have one length."""
    if len(ndarrays) != len(names):
        raise ValueError(f"{len(ndarrays)} arrays for {len(names)} names {list(names)}")
    return {name: np.array(a, copy=True) for name, a in zip(names, ndarrays, strict=True)}


class FlowerClientApp:
    """A fedlearn ClientApp that delegates to a Flower ``NumPyClient``.

    Parameters
    ----------
    client
        Either one client object, which then serves every client id (a site daemon
        is one client), or a factory ``client_fn(client_id) -> client``; the factory
        is called once per client id on first use and its client is kept for later
        tasks (so a client may cache its data and model between rounds).
    names
        Names of the model's arrays, in ``get_parameters`` order. When given, the
        global model must carry exactly these names; by default the initial arrays are
        named ``p0, p1, ...`` and a task's arrays are matched by position whatever
        their names.
    round_key
        Config key that carries the round number to the client (default
        ``"server_round"``); ``None`` leaves the config as the strategy sent it.
    """

    def __init__(
        self,
        client: NumPyClientLike | ClientFn,
        *,
        names: Sequence[str] | None = None,
        round_key: str | None = "server_round",
    ) -> None:
        self._single: NumPyClientLike | None = None
        self._client_fn: ClientFn | None = None
        if _is_client(client):
            self._single = cast(NumPyClientLike, client)
        elif callable(client):
            self._client_fn = client
        else:
            raise TypeError(
                "FlowerClientApp needs a Flower NumPyClient (with get_parameters, fit and "
                f"evaluate) or a function client_id -> NumPyClient, got {type(client).__name__}"
            )
        self.names: tuple[str, ...] | None = None if names is None else _check_names(names)
        if round_key is not None and not isinstance(round_key, str):
            raise TypeError(f"round_key must be a str or None, got {type(round_key).__name__}")
        self.round_key = round_key
        self._clients: dict[int, NumPyClientLike] = {}

    def client(self, client_id: int) -> NumPyClientLike:
        """The Flower client that serves ``client_id`` (built by the factory on first use)."""
        if self._single is not None:
            return self._single
        client = self._clients.get(client_id)
        if client is None:
            assert self._client_fn is not None
            client = self._client_fn(client_id)
            if not _is_client(client):
                raise TypeError(
                    f"client_fn({client_id}) returned {type(client).__name__}, which lacks "
                    "get_parameters, fit or evaluate; it must return a Flower NumPyClient"
                )
            self._clients[client_id] = client
        return client

    def initial_arrays(self, seed: int) -> Arrays:
        """The model of ``get_parameters({})`` (client 0's, for a factory), named.

        ``seed`` is not passed on: a Flower client builds its initial weights itself.
        """
        client = self.client(0)
        where = f"{type(client).__name__}.get_parameters()"
        ndarrays = _check_ndarrays(client.get_parameters({}), where)
        names = (
            self.names if self.names is not None else tuple(f"p{i}" for i in range(len(ndarrays)))
        )
        if len(names) != len(ndarrays):
            raise ValueError(f"{where} returned {len(ndarrays)} arrays for the names {names}")
        return ndarrays_to_arrays(ndarrays, names)

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        """Call the client's ``fit`` and return its parameters under the task's names."""
        names = self._names(arrays)
        client = self.client(ctx.client_id)
        where = f"{type(client).__name__}.fit()"
        result = client.fit(arrays_to_ndarrays(arrays), self.flower_config(config, ctx))
        parameters, num_examples, metrics = _triple(
            result, where, "(parameters, num_examples, metrics)", "[w, b], 120, {'loss': 0.3}"
        )
        ndarrays = _check_ndarrays(parameters, where)
        if len(ndarrays) != len(names):
            raise ValueError(
                f"{where} returned {len(ndarrays)} arrays, but the global model has "
                f"{len(names)} ({', '.join(names)})"
            )
        return TrainResult(
            ndarrays_to_arrays(ndarrays, names),
            _check_count(num_examples, where),
            _check_metrics(metrics, where),
        )

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        """Call the client's ``evaluate`` and return its loss, count and metrics."""
        self._names(arrays)
        client = self.client(ctx.client_id)
        where = f"{type(client).__name__}.evaluate()"
        result = client.evaluate(arrays_to_ndarrays(arrays), self.flower_config(config, ctx))
        loss, num_examples, metrics = _triple(
            result, where, "(loss, num_examples, metrics)", "0.5, 30, {'accuracy': 0.9}"
        )
        if isinstance(loss, bool | np.bool_) or not isinstance(loss, numbers.Real):
            raise TypeError(
                f"{where} returned a loss of type {type(loss).__name__}; expected float"
            )
        return EvaluateResult(
            _check_count(num_examples, where), float(loss), _check_metrics(metrics, where)
        )

    def flower_config(self, config: Config, ctx: ClientContext) -> FlowerConfig:
        """The config dict handed to the client: ``round_key`` first, then the task's config."""
        out: FlowerConfig = {}
        if self.round_key is not None:
            out[self.round_key] = ctx.round
        out.update(config)
        return out

    def _names(self, arrays: Arrays) -> tuple[str, ...]:
        names = tuple(arrays)
        if self.names is not None and names != self.names:
            raise ValueError(
                f"the global model's arrays {list(names)} are not the names this "
                f"FlowerClientApp was given {list(self.names)}"
            )
        return names


def _check_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError("names must be a sequence of str, not one str")
    out = tuple(names)
    for name in out:
        if not isinstance(name, str) or not name:
            raise TypeError(f"names must be non-empty strings, got {name!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"names must be unique, got {list(out)}")
    return out


def _triple(result: object, where: str, signature: str, example: str) -> tuple[object, ...]:
    if not isinstance(result, tuple | list) or len(result) != 3:
        got = (
            f"a {type(result).__name__} of {len(result)} values"
            if isinstance(result, tuple | list)
            else f"{type(result).__name__}"
        )
        raise TypeError(f"{where} must return {signature}, e.g. {example}; got {got}")
    return tuple(result)


def _check_ndarrays(parameters: object, where: str) -> list[np.ndarray]:
    if not isinstance(parameters, list | tuple):
        raise TypeError(
            f"{where} returned parameters of type {type(parameters).__name__}; "
            "expected a list of numpy arrays"
        )
    for i, a in enumerate(parameters):
        if not isinstance(a, np.ndarray):
            raise TypeError(
                f"{where} returned parameters[{i}] of type {type(a).__name__}; "
                "expected numpy.ndarray"
            )
        if a.dtype.newbyteorder("<").str not in ALLOWED_DTYPES:
            raise TypeError(
                f"{where} returned parameters[{i}] with dtype {a.dtype}; expected a bool, "
                "integer or float dtype"
            )
    return list(parameters)


def _check_count(value: object, where: str) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"{where} returned num_examples of type {type(value).__name__}; expected int"
        )
    return int(value)


def _check_metrics(metrics: object, where: str) -> Metrics:
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"{where} returned metrics of type {type(metrics).__name__}; expected a dict"
        )
    out: dict[str, Scalar] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"{where} returned a metrics key {key!r}; keys must be str")
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, bool | int | float | str):
            raise TypeError(
                f"{where} returned metrics[{key!r}] of type {type(value).__name__}; "
                "fedlearn metrics are bool, int, float or str"
            )
        out[key] = value
    return out
