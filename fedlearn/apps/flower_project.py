"""Flower app projects: read ``pyproject.toml``, import the apps, take the ServerApp's plan.

A Flower app project (what ``flwr new`` lays out) names its parts in ``pyproject.toml``::

    [tool.flwr.app.components]
    serverapp = "my_app.server_app:app"
    clientapp = "my_app.client_app:app"

    [tool.flwr.app.config]
    num-server-rounds = 3
    local-epochs = 1

    [tool.flwr.federations.local-simulation]
    options.num-supernodes = 10

:func:`read_project` reads that (nested config tables are flattened with dots, as Flower
does); :func:`parse_run_config` reads overrides as Flower's ``--run-config`` spells them
(``'num-server-rounds=5 lr=0.1 name="x y"'``: space-separated ``key=value`` pairs whose
values are TOML), and :func:`fuse_run_config` applies them, refusing a key the project
does not declare (as Flower does).

:func:`plan_server` runs the ServerApp's ``@app.main()`` with a ``Grid`` that delivers
nothing, up to its ``strategy.start(...)`` call, which is intercepted: the strategy
object, ``initial_arrays``, ``num_rounds``, ``train_config`` and ``evaluate_config`` are
recorded and ``main`` ends there (code after ``start``, such as saving the final model,
does not run). The strategy maps to fedlearn's equal one (:data:`STRATEGY_MAP`, with its
settings); a subclass maps to its nearest built-in base, with a note naming the methods
it overrides, which fedlearn does not run. A ``main`` that sends messages itself (a
custom loop), never calls ``strategy.start``, uses a strategy fedlearn has no equal for
(differential-privacy wrappers, XGBoost bagging, ...) or is a legacy
``ServerApp(server_fn=...)`` raises :class:`~fedlearn.errors.ConfigError` saying what
cannot be taken and how to write it as a fedlearn ``Strategy``.

Importing puts the project directory first on ``sys.path`` (Flower does the same with
an app's directory).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fedlearn.apps.flower_message import MessageClientApp, load_flower
from fedlearn.apps.flower_records import from_array_record
from fedlearn.engine.records import Arrays, Scalar
from fedlearn.errors import ConfigError

__all__ = [
    "STRATEGY_MAP",
    "FlowerProject",
    "ServerPlan",
    "fuse_run_config",
    "load_component",
    "make_client_app",
    "parse_run_config",
    "plan_server",
    "read_project",
]

STRATEGY_MAP: dict[str, tuple[str, dict[str, str]]] = {
    "FedAvg": ("fedavg", {}),
    "FedProx": ("fedprox", {"proximal_mu": "proximal_mu"}),
    "FedAvgM": (
        "fedavgm",
        {"server_learning_rate": "server_learning_rate", "server_momentum": "server_momentum"},
    ),
    "FedAdam": (
        "fedadam",
        {k: k for k in ("eta", "eta_l", "tau", "beta_1", "beta_2")},
    ),
    "FedYogi": (
        "fedyogi",
        {k: k for k in ("eta", "eta_l", "tau", "beta_1", "beta_2")},
    ),
    "FedAdagrad": ("fedadagrad", {k: k for k in ("eta", "eta_l", "tau")}),
    "QFedAvg": (
        "qfedavg",
        {k: k for k in ("q", "client_learning_rate", "train_loss_key")},
    ),
    "Krum": ("krum", {"num_malicious_nodes": "num_malicious"}),
    "MultiKrum": (
        "multikrum",
        {"num_malicious_nodes": "num_malicious", "num_nodes_to_select": "num_to_keep"},
    ),
    "FedMedian": ("fedmedian", {}),
    "FedTrimmedAvg": ("fedtrimmedavg", {"beta": "beta"}),
}
"""Flower ``flwr.serverapp.strategy`` class -> (fedlearn strategy name, {Flower attribute:
fedlearn setting}); every one also maps FedAvg's sampling settings."""

_SAMPLING = {
    "fraction_train": "fraction_train",
    "fraction_evaluate": "fraction_evaluate",
    "min_train_nodes": "min_train_clients",
    "min_evaluate_nodes": "min_evaluate_clients",
}
_STRATEGY_HOOKS = (
    "configure_train",
    "aggregate_train",
    "configure_evaluate",
    "aggregate_evaluate",
    "start",
)
_HOW_TO = (
    "write the server side as a fedlearn Strategy subclass (fedlearn.Strategy: "
    "select_train / train_config / server_update / summarize_evaluate hooks; see "
    "simulations/custom_strategy.toml) and run the ClientApp with it: "
    "fedlearn simulate --flower-app DIR --set strategy.name=module:Class"
)


@dataclass(frozen=True)
class FlowerProject:
    """What a Flower app project's ``pyproject.toml`` says."""

    directory: Path
    name: str
    serverapp: str
    clientapp: str
    config: dict[str, Scalar]
    num_supernodes: int | None = None


def read_project(directory: str | Path) -> FlowerProject:
    """Read ``directory/pyproject.toml``; ConfigError if it does not describe a Flower app."""
    root = Path(directory).resolve()
    path = root / "pyproject.toml"
    if not path.is_file():
        raise ConfigError(f"{directory}: no pyproject.toml there, so no Flower app project")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    flwr_app = data.get("tool", {}).get("flwr", {}).get("app")
    components = flwr_app.get("components") if isinstance(flwr_app, dict) else None
    if not isinstance(components, dict):
        raise ConfigError(
            f"{path}: not a Flower app project: no [tool.flwr.app.components] table "
            '(serverapp = "pkg.server_app:app", clientapp = "pkg.client_app:app")'
        )
    refs = {}
    for part in ("serverapp", "clientapp"):
        ref = components.get(part)
        if not isinstance(ref, str) or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", ref):
            raise ConfigError(
                f'{path}: [tool.flwr.app.components] {part} must be "module:attribute", got {ref!r}'
            )
        refs[part] = ref
    config = _flatten(flwr_app.get("config", {}), str(path))
    name = str(data.get("project", {}).get("name", root.name))
    return FlowerProject(
        root, name, refs["serverapp"], refs["clientapp"], config, _num_supernodes(data)
    )


def _flatten(table: Any, where: str, prefix: str = "") -> dict[str, Scalar]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [tool.flwr.app.config] must be a table")
    out: dict[str, Scalar] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, where, dotted + "."))
        elif isinstance(value, bool | int | float | str):
            out[dotted] = value
        else:
            raise ConfigError(
                f"{where}: [tool.flwr.app.config] {dotted} is {type(value).__name__}; "
                "values are bool, int, float or str"
            )
    return out


def _num_supernodes(data: Mapping[str, Any]) -> int | None:
    """``options.num-supernodes`` of the project's default federation, if it names one."""
    federations = data.get("tool", {}).get("flwr", {}).get("federations", {})
    if not isinstance(federations, dict):
        return None
    default = federations.get("default")
    federation = federations.get(default) if isinstance(default, str) else None
    if not isinstance(federation, dict):
        return None
    value = federation.get("options", {}).get("num-supernodes")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_run_config(text: str | list[str] | None) -> dict[str, Scalar]:
    """``'key=value key2="a b"'`` overrides (Flower's ``--run-config``); values are TOML."""
    items = [text] if isinstance(text, str) else list(text or [])
    out: dict[str, Scalar] = {}
    for item in items:
        tokens = _tokens(item)
        for token in tokens:
            key, sep, raw = token.partition("=")
            if not sep or not key:
                raise ConfigError(
                    f"--run-config: {token!r} is not key=value (e.g. 'lr=0.1 name=\"x\"')"
                )
            try:
                value = tomllib.loads(f"value = {raw}")["value"]
            except tomllib.TOMLDecodeError:
                raise ConfigError(
                    f'--run-config: {key}={raw} is not a TOML value (quote strings: {key}="{raw}")'
                ) from None
            if not isinstance(value, bool | int | float | str):
                raise ConfigError(f"--run-config: {key} must be bool, int, float or str")
            out[key] = value
    return out


def _tokens(text: str) -> list[str]:
    """Split at whitespace outside quotes; the quotes stay (they are TOML syntax)."""
    tokens: list[str] = []
    current: list[str] = []
    quote: str | None = None
    for char in text:
        if quote is not None:
            current.append(char)
            if char == quote:
                quote = None
        elif char.isspace():
            if current:
                tokens.append("".join(current))
                current = []
        else:
            current.append(char)
            if char in "\"'":
                quote = char
    if quote is not None:
        raise ConfigError(f"--run-config {text!r}: a {quote} quote is not closed")
    if current:
        tokens.append("".join(current))
    return tokens


def fuse_run_config(
    defaults: Mapping[str, Scalar], overrides: Mapping[str, Scalar]
) -> dict[str, Scalar]:
    """``defaults`` with ``overrides`` applied; a key the project lacks is a ConfigError."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ConfigError(
            f"run config: {', '.join(map(repr, unknown))} not in the app's "
            f"[tool.flwr.app.config] (keys: {', '.join(sorted(defaults)) or 'none'})"
        )
    return {**defaults, **overrides}


def load_component(project: FlowerProject, ref: str) -> Any:
    """Import ``module:attribute`` from the project (its directory first on sys.path)."""
    load_flower()
    directory = str(project.directory)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_name, _, attribute = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{project.directory}: cannot import {module_name}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"{project.directory}: {module_name} has no {attribute!r}") from None


@dataclass(frozen=True)
class ServerPlan:
    """What a ServerApp's ``main`` hands its strategy, and fedlearn's equal strategy."""

    strategy_name: str
    strategy_params: dict[str, Scalar]
    rounds: int
    initial_arrays: Arrays
    train_config: dict[str, Any]
    evaluate_config: dict[str, Any]
    weighted_by_key: str = "num-examples"
    arrayrecord_key: str = "arrays"
    configrecord_key: str = "config"
    notes: list[str] = field(default_factory=list)


class _Started(Exception):
    """Raised out of the intercepted ``strategy.start`` to end ``main`` there."""

    def __init__(self, strategy: Any, arguments: dict[str, Any]) -> None:
        super().__init__("strategy.start")
        self.strategy = strategy
        self.arguments = arguments


class _Unsupported(Exception):
    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def plan_server(
    project: FlowerProject,
    run_config: Mapping[str, Scalar],
    num_nodes: int | None,
    seed: int = 0,
) -> ServerPlan:
    """Run the ServerApp's ``main`` up to ``strategy.start`` and map what it set up.

    ``num_nodes`` is the number of clients the run will have (None: unknown, at a site;
    then ``min_available_nodes`` is not checked).

    torch's global generator is seeded with ``seed`` first, so a ServerApp that builds its
    initial model unseeded (``Net()``, as Flower's templates do) gives the same one each
    time fedlearn runs it with the same seed.
    """
    load_flower()
    import torch

    torch.manual_seed(seed)
    from flwr.app import Context, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import Strategy

    server_app = load_component(project, project.serverapp)
    where = f"{project.directory}: ServerApp {project.serverapp}"
    if not isinstance(server_app, ServerApp):
        raise ConfigError(f"{where} is {type(server_app).__name__}, not a flwr ServerApp")
    if getattr(server_app, "_main", None) is None:
        raise ConfigError(
            f"{where} is a legacy ServerApp (server_fn / config + strategy from "
            f"flwr.server): fedlearn takes Message-API ServerApps (@app.main()); {_HOW_TO}"
        )
    context = Context(
        run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )

    original = Strategy.start
    signature = inspect.signature(original)

    def start(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        raise _Started(self, dict(bound.arguments))

    setattr(Strategy, "start", start)  # noqa: B010 (restored below)
    try:
        with _server_identity():
            server_app(_grid(num_nodes), context)
    except _Started as started:
        return _plan(started, where, num_nodes)
    except _Unsupported as exc:
        raise ConfigError(
            f"{where} runs a custom loop (its main calls grid.{exc.what} itself instead of "
            f"strategy.start): fedlearn cannot take it; {_HOW_TO}"
        ) from None
    finally:
        setattr(Strategy, "start", original)  # noqa: B010
    raise ConfigError(
        f"{where}: its main returned without calling strategy.start(...), so there is no "
        f"strategy to take; {_HOW_TO}"
    )


@contextlib.contextmanager
def _server_identity() -> Iterator[None]:
    """The identity Flower's ServerApp process has (a main that builds its own messages
    needs one), restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {name: getattr(TaskIdentity, f"_{name}") for name in ("run_id", "node_id", "task_id")}
    for name in saved:
        setattr(TaskIdentity, name, 0)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, f"_{name}", value)


def _grid(num_nodes: int | None) -> Any:
    """A Grid that knows ``num_nodes`` node ids and refuses to move any message."""
    from flwr.serverapp import Grid

    class RecordingGrid(Grid):
        def set_run(self, run_id: Any) -> None:
            pass

        @property
        def run(self) -> Any:
            raise _Unsupported("run")

        def create_message(self, *args: Any, **kwargs: Any) -> Any:
            raise _Unsupported("create_message")

        def get_node_ids(self) -> list[int]:
            return list(range(num_nodes or 0))

        def push_messages(self, messages: Any) -> Any:
            raise _Unsupported("push_messages")

        def pull_messages(self, message_ids: Any) -> Any:
            raise _Unsupported("pull_messages")

        def send_and_receive(self, messages: Any, **kwargs: Any) -> Any:
            raise _Unsupported("send_and_receive")

    return RecordingGrid()


def _plan(started: _Started, where: str, num_nodes: int | None) -> ServerPlan:
    strategy, arguments = started.strategy, started.arguments
    cls = type(strategy)
    base = next(
        (
            c
            for c in cls.__mro__
            if c.__module__.startswith("flwr.serverapp.strategy") and c.__name__ in STRATEGY_MAP
        ),
        None,
    )
    if base is None or cls.__name__.startswith("DifferentialPrivacy"):
        raise ConfigError(
            f"{where} uses the strategy {cls.__name__}, which fedlearn has no equal for "
            f"(it maps {', '.join(STRATEGY_MAP)}; differential privacy is fedlearn's "
            f"[privacy] table); {_HOW_TO}"
        )
    name, extra = STRATEGY_MAP[base.__name__]
    params: dict[str, Scalar] = {}
    for attribute, setting in {**_SAMPLING, **extra}.items():
        value = getattr(strategy, attribute)
        if isinstance(value, bool | int | float | str):
            params[setting] = value
    for key in ("fraction_train", "fraction_evaluate"):
        if params.get(key) == 0.0:
            raise ConfigError(
                f"{where}: {key} = 0 (Flower skips that stage); fedlearn runs both stages "
                "(evaluation can be thinned with run.evaluate_every)"
            )
    min_available = int(getattr(strategy, "min_available_nodes", 0))
    if num_nodes is not None and min_available > num_nodes:
        raise ConfigError(
            f"{where}: min_available_nodes = {min_available} but the run has {num_nodes} "
            "clients (Flower would wait for more nodes forever); run more clients"
        )
    notes = []
    if cls is not base:
        overridden = [h for h in _STRATEGY_HOOKS if _overrides(cls, base, h)]
        notes.append(
            f"strategy {cls.__name__} runs as fedlearn's {name} (its base {base.__name__})"
            + (f"; its own {', '.join(overridden)} do not run" if overridden else "")
        )
    from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

    for attribute in ("train_metrics_aggr_fn", "evaluate_metrics_aggr_fn"):
        if getattr(strategy, attribute, aggregate_metricrecords) is not aggregate_metricrecords:
            notes.append(
                f"{attribute} is not used: fedlearn keeps every client's metrics and "
                "summarizes them with weighted means"
            )
    if arguments.get("evaluate_fn") is not None:
        notes.append("evaluate_fn (centralized evaluation on the ServerApp) is not run")
    initial = arguments.get("initial_arrays")
    if initial is None:
        raise ConfigError(f"{where}: strategy.start(...) got no initial_arrays")
    return ServerPlan(
        strategy_name=name,
        strategy_params=params,
        rounds=int(arguments.get("num_rounds", 3)),
        initial_arrays=from_array_record(initial),
        train_config=dict(arguments.get("train_config") or {}),
        evaluate_config=dict(arguments.get("evaluate_config") or {}),
        weighted_by_key=str(getattr(strategy, "weighted_by_key", "num-examples")),
        arrayrecord_key=str(getattr(strategy, "arrayrecord_key", "arrays")),
        configrecord_key=str(getattr(strategy, "configrecord_key", "config")),
        notes=notes,
    )


def _overrides(cls: type, base: type, hook: str) -> bool:
    return getattr(cls, hook, None) is not getattr(base, hook, None)


def make_client_app(
    project: FlowerProject,
    run_config: Mapping[str, Scalar],
    plan: ServerPlan | None,
    *,
    num_partitions: int | None = None,
    node_config: Mapping[str, Scalar] | None = None,
) -> MessageClientApp:
    """The project's ClientApp as a fedlearn ClientApp, set up as ``plan`` says."""
    app = load_component(project, project.clientapp)
    keys: dict[str, Any] = {}
    if plan is not None:
        keys = {
            "train_config": plan.train_config,
            "evaluate_config": plan.evaluate_config,
            "initial_arrays": plan.initial_arrays,
            "weighted_by_key": plan.weighted_by_key,
            "arrayrecord_key": plan.arrayrecord_key,
            "configrecord_key": plan.configrecord_key,
        }
    return MessageClientApp(
        app,
        run_config=run_config,
        num_partitions=num_partitions,
        node_config=node_config,
        **keys,
    )
