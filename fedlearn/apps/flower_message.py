"""Run a Flower 1.x ``ClientApp`` (Message API, or a legacy ``client_fn``) as a fedlearn ClientApp.

:class:`MessageClientApp` drives a ``flwr.clientapp.ClientApp`` object unchanged: for each
fedlearn task it builds the ``Message`` and ``Context`` Flower's own runtime would hand the
app's ``@app.train()`` / ``@app.evaluate()`` function, calls the app, and maps the reply
back::

    from my_app.client_app import app as flower_app

    app = MessageClientApp(flower_app, run_config={"local-epochs": 1}, num_partitions=10,
                           initial_arrays={"0": w0, "1": b0})
    run_simulation(lambda: app, FedAvg(), num_clients=10, rounds=3, backend="pool")

What the app receives (the facts are those of Flower 1.42's ``FedAvg`` family):

* **content**: an ``ArrayRecord`` under ``"arrays"`` holding the global model (fedlearn's
  array names are its keys, in order) and a ``ConfigRecord`` under ``"config"``: the
  ServerApp's fixed ``train_config`` / ``evaluate_config`` (given here), then the task's
  config from the fedlearn strategy, then ``"server-round"`` (the round). A FedProx task's
  ``proximal_mu`` is also sent as Flower's ``"proximal-mu"``.
* **metadata**: message type ``"train"`` or ``"evaluate"``, ``dst_node_id`` = node id =
  the fedlearn client id, ``group_id`` = the round, ``message_id``
  ``"<round>.<type>.<client id>"``, Flower's default time-to-live.
* **context**: ``node_config`` ``{"partition-id": client id, "num-partitions": N}`` (as
  Flower's simulation numbers its nodes: 0..N-1), or a fixed ``node_config`` (a site);
  ``run_config`` (a fresh copy per call); ``state``: this client's ``RecordDict``, kept
  across rounds as the client's own fedlearn state (``ctx.state``,
  :mod:`fedlearn.engine.client_state`): wherever the runtime keeps it (the pool's shared
  directory, a ``fedlearn simulate`` run's directory, a site's ``client.state_dir``).

What fedlearn takes from the reply:

* **train**: exactly one ``ArrayRecord`` (the update; keys equal to the global model's, or
  as many arrays, then named by position as fedlearn's) and exactly one ``MetricRecord``
  holding ``"num-examples"`` (the weight; Flower's ``weighted_by_key``), whose other int
  and float values become the client's metrics.
* **evaluate**: exactly one ``MetricRecord`` with ``"num-examples"`` and a loss (the first
  of ``loss_key`` or ``"loss"``, ``"eval_loss"``, ``"eval-loss"``, ``"test_loss"``,
  ``"val_loss"``); all other values are kept as metrics. An ``ArrayRecord`` is ignored.

Anything else (a ``ConfigRecord``, two ``MetricRecords``, a list-valued metric, a weight
that is not a whole number, no loss) fails that client's task with
:class:`~fedlearn.errors.UpdateRejected` naming the reply's records, keys and types; an
error reply from the app fails it with the app's reason.

A legacy app (``ClientApp(client_fn=...)``, or a bare ``client_fn(context)`` returning a
``Client`` such as ``NumPyClient(...).to_client()``) gets Flower's legacy ``FitIns`` /
``EvaluateIns`` records built by Flower's own converters, with the same config plus
``"server_round"``, and its ``FitRes`` / ``EvaluateRes`` map back the same way; its
``get_parameters`` gives the initial model when no ``initial_arrays`` are passed.

flwr is imported only by the ``fedlearn.apps.flower_*`` modules, and only when they are
used: install it with ``pip install 'fedlearn[flower]'``.
"""

from __future__ import annotations

import copy
import numbers
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import numpy as np

from fedlearn.apps.flower_records import (
    from_array_record,
    recorddict_from_state,
    recorddict_to_state,
    to_array_record,
)
from fedlearn.config.extras import require_extra
from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.client_state import ClientState
from fedlearn.engine.records import Arrays, Config, Metrics, Scalar
from fedlearn.errors import ConfigError, UpdateRejected

__all__ = ["LOSS_KEYS", "MessageClientApp", "load_flower"]

LOSS_KEYS = ("loss", "eval_loss", "eval-loss", "test_loss", "val_loss")
"""Metric keys an evaluate reply's loss is taken from, in this order."""

_ROUND_KEY = "server-round"
_LEGACY_ROUND_KEY = "server_round"
_TTL = 43200.0  # Flower's default message time-to-live (seconds)


def load_flower() -> Any:
    """The ``flwr`` package, or ConfigError saying how to install it."""
    try:
        import flwr
    except ImportError as exc:
        require_extra("flower", "running a Flower app")
        raise ConfigError(f"cannot import flwr: {exc}") from exc
    return flwr


class MessageClientApp:
    """A fedlearn ClientApp that runs a Flower ``ClientApp`` or ``client_fn`` unchanged.

    Parameters
    ----------
    app
        A ``flwr.clientapp.ClientApp``, or a legacy ``client_fn(context) -> Client``.
    run_config
        The app's ``context.run_config`` (``[tool.flwr.app.config]`` plus overrides).
    num_partitions
        The number of simulated nodes: ``node_config["num-partitions"]``, with
        ``"partition-id"`` the client id. Give this or ``node_config``.
    node_config
        A fixed ``context.node_config`` for every client id (a site daemon: one node).
    train_config, evaluate_config
        The ServerApp's fixed ConfigRecords (``strategy.start(train_config=...)``).
    initial_arrays
        The initial global model (the ServerApp's ``initial_arrays``), by name.
    weighted_by_key, arrayrecord_key, configrecord_key
        Flower's ``FedAvg`` settings of the same names.
    loss_key
        The evaluate metric that is the loss (default: the first of :data:`LOSS_KEYS`).
    """

    def __init__(
        self,
        app: Any,
        *,
        run_config: Mapping[str, Scalar] | None = None,
        num_partitions: int | None = None,
        node_config: Mapping[str, Scalar] | None = None,
        train_config: Mapping[str, Any] | None = None,
        evaluate_config: Mapping[str, Any] | None = None,
        initial_arrays: Arrays | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        loss_key: str | None = None,
        run_id: int = 0,
    ) -> None:
        load_flower()
        from flwr.clientapp import ClientApp

        if isinstance(app, ClientApp):
            self.app = app
        elif callable(app):
            self.app = ClientApp(client_fn=app)
        else:
            raise ConfigError(
                "a Flower app must be a flwr.clientapp.ClientApp or a client_fn(context), "
                f"got {type(app).__name__}"
            )
        self.legacy = getattr(self.app, "_call", None) is not None
        if (num_partitions is None) == (node_config is None):
            raise ConfigError("give num_partitions (simulation) or node_config (a site)")
        if num_partitions is not None and num_partitions < 1:
            raise ConfigError(f"num_partitions must be >= 1, got {num_partitions}")
        self.num_partitions = num_partitions
        self.node_config = None if node_config is None else dict(node_config)
        self.run_config = dict(run_config or {})
        self.train_config = dict(train_config or {})
        self.evaluate_config = dict(evaluate_config or {})
        self._initial = initial_arrays
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.loss_key = loss_key
        self.run_id = run_id
        self._sent: tuple[Arrays, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ fedlearn ClientApp

    def initial_arrays(self, seed: int) -> Arrays:
        """The ``initial_arrays`` given, else a legacy client's ``get_parameters`` (client
        0's), named ``p0, p1, ...``. ``seed`` is not used: Flower apps seed themselves."""
        if self._initial is not None:
            return {k: np.array(v) for k, v in self._initial.items()}
        if not self.legacy:
            raise ConfigError(
                "a Message-API ClientApp cannot build the initial model: pass initial_arrays "
                "(what the ServerApp passes to strategy.start(initial_arrays=...))"
            )
        return self._legacy_initial()

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        """Send a ``train`` message to the Flower app; its reply becomes the update."""
        content = self._request(arrays, self.train_config, config, ctx, train=True)
        reply = self._call("train", content, ctx)
        if self.legacy:
            return self._legacy_train(reply, arrays, ctx)
        records = _Records(reply, ctx, "train")
        array_record = records.one("array_records", "ArrayRecord")
        metrics = records.one("metric_records", "MetricRecord")
        records.no_config()
        num_examples = records.weight(metrics, self.weighted_by_key)
        update = _named(from_array_record(array_record), arrays, records)
        return TrainResult(update, num_examples, records.scalars(metrics, self.weighted_by_key))

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        """Send an ``evaluate`` message to the Flower app; map its metrics back."""
        content = self._request(arrays, self.evaluate_config, config, ctx, train=False)
        reply = self._call("evaluate", content, ctx)
        if self.legacy:
            return self._legacy_evaluate(reply, ctx)
        records = _Records(reply, ctx, "evaluate")
        metrics = records.one("metric_records", "MetricRecord")
        records.no_config()
        num_examples = records.weight(metrics, self.weighted_by_key)
        values = records.scalars(metrics, self.weighted_by_key)
        keys = (self.loss_key,) if self.loss_key is not None else LOSS_KEYS
        loss_key = next((k for k in keys if k in values), None)
        if loss_key is None or isinstance(values[loss_key], str):
            records.fail(f"no loss: fedlearn reads it from one of {list(keys)}")
        return EvaluateResult(num_examples, float(values[loss_key]), values)

    # ------------------------------------------------------------------ Flower side

    def context(self, client_id: int, state: ClientState | None = None) -> Any:
        """The ``Context`` client ``client_id`` runs in now, with ``state`` (its fedlearn
        state; none: empty) as ``context.state``."""
        from flwr.app import Context

        node_config: dict[str, Scalar]
        if self.node_config is not None:
            node_config = dict(self.node_config)
        else:
            assert self.num_partitions is not None
            node_config = {"partition-id": client_id, "num-partitions": self.num_partitions}
        return Context(
            run_id=self.run_id,
            node_id=client_id,
            node_config=node_config,
            state=recorddict_from_state(ClientState() if state is None else state),
            run_config=dict(self.run_config),
        )

    def _request(
        self,
        arrays: Arrays,
        fixed: Mapping[str, Any],
        config: Config,
        ctx: ClientContext,
        *,
        train: bool,
    ) -> Any:
        values: dict[str, Any] = {**fixed, **config}
        if "proximal_mu" in config:
            values["proximal-mu"] = config["proximal_mu"]
        if self.legacy:
            return _legacy_request(arrays, {**values, _LEGACY_ROUND_KEY: ctx.round}, train)
        from flwr.app import ConfigRecord, RecordDict

        values[_ROUND_KEY] = ctx.round
        return RecordDict(
            {
                self.arrayrecord_key: self._array_record(arrays),
                self.configrecord_key: ConfigRecord(values),
            }
        )

    def _array_record(self, arrays: Arrays) -> Any:
        """A fresh ``ArrayRecord`` of ``arrays``. A stage's tasks share one broadcast
        dict, so its Flower ``Array`` objects are made once per stage; each message gets
        shallow copies (the bytes are immutable and shared), so an app that sets an
        attribute of one changes nothing another client receives."""
        from flwr.app import ArrayRecord

        if self._sent is None or self._sent[0] is not arrays:
            self._sent = (arrays, dict(to_array_record(arrays)))
        record = ArrayRecord()  # not ArrayRecord(dict): it would rebuild plain Arrays
        for key, array in self._sent[1].items():
            record[key] = copy.copy(array)
        return record

    def _call(self, message_type: str, content: Any, ctx: ClientContext) -> Any:
        """Run the app on one message in the client's context and keep its state."""
        from flwr.app import Message, Metadata

        metadata = Metadata(
            run_id=self.run_id,
            message_id=f"{ctx.round}.{message_type}.{ctx.client_id}",
            src_node_id=0,
            dst_node_id=ctx.client_id,
            reply_to_message_id="",
            group_id=str(ctx.round),
            created_at=time.time(),
            ttl=_TTL,
            message_type=message_type,
        )
        # A delivered message: content plus the metadata a SuperNode would receive with it.
        delivered: Any = Message
        message = delivered(content=content, metadata=metadata)
        context = self.context(ctx.client_id, ctx.state)
        reply = self.app(message, context)
        # kept as the client's state (a store writes nothing for a client that keeps none)
        kept = recorddict_to_state(context.state)
        ctx.state.arrays, ctx.state.values = kept.arrays, kept.values
        if not isinstance(reply, Message):
            raise UpdateRejected(
                f"the Flower app's {message_type} function returned "
                f"{type(reply).__name__}, not a flwr.app.Message",
                client_id=ctx.client_id,
                round=ctx.round,
            )
        if reply.has_error():
            raise UpdateRejected(
                f"the Flower app replied with an error: {reply.error.reason}",
                client_id=ctx.client_id,
                round=ctx.round,
            )
        return reply.content

    # ------------------------------------------------------------------ legacy client_fn

    def _legacy_initial(self) -> Arrays:
        from flwr.common import GetParametersIns, MessageTypeLegacy, parameters_to_ndarrays
        from flwr.compat.common.recorddict_compat import (
            getparametersins_to_recorddict,
            recorddict_to_getparametersres,
        )

        ctx = ClientContext(0, 0, 0)
        content = getparametersins_to_recorddict(GetParametersIns({}))
        reply = self._call(MessageTypeLegacy.GET_PARAMETERS, content, ctx)
        res = recorddict_to_getparametersres(reply, keep_input=False)
        ndarrays = parameters_to_ndarrays(res.parameters)
        return {f"p{i}": np.asarray(a) for i, a in enumerate(ndarrays)}

    def _legacy_train(self, reply: Any, arrays: Arrays, ctx: ClientContext) -> TrainResult:
        from flwr.common import parameters_to_ndarrays
        from flwr.compat.common.recorddict_compat import recorddict_to_fitres

        records = _Records(reply, ctx, "train")
        res = recorddict_to_fitres(reply, keep_input=False)
        ndarrays = parameters_to_ndarrays(res.parameters)
        update = _named({str(i): a for i, a in enumerate(ndarrays)}, arrays, records)
        return TrainResult(update, records.count(res.num_examples), records.scalars(res.metrics))

    def _legacy_evaluate(self, reply: Any, ctx: ClientContext) -> EvaluateResult:
        from flwr.compat.common.recorddict_compat import recorddict_to_evaluateres

        records = _Records(reply, ctx, "evaluate")
        res = recorddict_to_evaluateres(reply)
        return EvaluateResult(
            records.count(res.num_examples), float(res.loss), records.scalars(res.metrics)
        )


def _legacy_request(arrays: Arrays, config: dict[str, Any], train: bool) -> Any:
    from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import (
        evaluateins_to_recorddict,
        fitins_to_recorddict,
    )

    parameters = ndarrays_to_parameters([np.asarray(a) for a in arrays.values()])
    if train:
        return fitins_to_recorddict(FitIns(parameters, config), keep_input=True)
    return evaluateins_to_recorddict(EvaluateIns(parameters, config), keep_input=True)


class _Records:
    """Checks on one reply's RecordDict; every failure names what the reply holds."""

    def __init__(self, content: Any, ctx: ClientContext, kind: str) -> None:
        self.content = content
        self.ctx = ctx
        self.kind = kind

    def fail(self, problem: str) -> NoReturn:
        raise UpdateRejected(
            f"cannot map the Flower app's {self.kind} reply: {problem}; the reply holds "
            f"{describe_records(self.content)}",
            client_id=self.ctx.client_id,
            round=self.ctx.round,
        )

    def one(self, attribute: str, kind: str) -> Any:
        records = getattr(self.content, attribute)
        if len(records) != 1:
            self.fail(f"expected exactly one {kind}, found {len(records)}")
        return next(iter(records.values()))

    def no_config(self) -> None:
        if len(self.content.config_records):
            self.fail("a ConfigRecord in a reply has no fedlearn equivalent")

    def weight(self, metrics: Mapping[str, Any], key: str) -> int:
        if key not in metrics:
            self.fail(f"the MetricRecord lacks {key!r}, the number of examples")
        return self.count(metrics[key], key)

    def count(self, value: Any, key: str = "num_examples") -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self.fail(f"{key!r} is {type(value).__name__}, not a number")
        number = float(value)
        if not number.is_integer():
            self.fail(f"{key!r} = {value!r}: fedlearn weights by a whole number of examples")
        return int(number)

    def scalars(self, values: Mapping[str, Any], skip: str | None = None) -> Metrics:
        out: Metrics = {}
        for key, value in values.items():
            if key == skip:
                continue
            if isinstance(value, np.generic):
                value = value.item()
            if not isinstance(value, bool | int | float | str):
                self.fail(
                    f"metric {key!r} is {type(value).__name__}; fedlearn metrics are "
                    "bool, int, float or str"
                )
            out[str(key)] = value
        return out


def _named(update: Arrays, sent: Arrays, records: _Records) -> Arrays:
    """The update under the global model's names: by key, or by position."""
    if list(update) == list(sent):
        return update
    if len(update) == len(sent):
        return dict(zip(sent, update.values(), strict=True))
    records.fail(
        f"the ArrayRecord has {len(update)} arrays {list(update)}; the global model has "
        f"{len(sent)} {list(sent)}"
    )


def describe_records(content: Any) -> str:
    """``name: Kind{key: type, ...}`` for each record of a RecordDict."""
    parts = []
    for name, record in content.items():
        kind = type(record).__name__
        if kind == "ArrayRecord":
            items = ", ".join(f"{k}: {a.dtype}{list(a.shape)}" for k, a in record.items())
        else:
            items = ", ".join(f"{k}: {_type_name(v)}" for k, v in record.items())
        parts.append(f"{name!r}: {kind}{{{items}}}")
    return "; ".join(parts) or "no records"


def _type_name(value: Any) -> str:
    if isinstance(value, list):
        inner = {type(v).__name__ for v in value}
        return f"list[{'|'.join(sorted(inner)) or 'empty'}]"
    return type(value).__name__
