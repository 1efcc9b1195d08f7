"""Reading configs: TOML files, ``--set`` overrides, validation whose errors name the field."""

from __future__ import annotations

import copy
import difflib
import tomllib
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeGuard, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from fedlearn.errors import ConfigError

_M = TypeVar("_M", bound=BaseModel)
_Loc = tuple[int | str, ...]


def validate(model: type[_M], raw: dict[str, Any], source: str = "config") -> _M:
    """Validate a mapping as ``model``; ConfigError lists each bad field by dotted path.

    An unknown field names the nearest valid field of its section, if one is close.
    """
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = [_problem(model, err) for err in exc.errors()]
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems)) from exc


def _problem(model: type[BaseModel], err: ErrorDetails) -> str:
    where = _dotted(err["loc"]) or "(top level)"
    if err["type"] != "extra_forbidden" or not err["loc"]:
        return f"{where}: {err['msg']}"
    return _unknown_field(model, err["loc"])


def _dotted(loc: _Loc) -> str:
    return ".".join(str(p) for p in loc)


def _unknown_field(model: type[BaseModel], loc: _Loc) -> str:
    """``run.rouds: unknown field; did you mean run.rounds?`` (or the valid names)."""
    what = "section" if len(loc) == 1 else "field"
    owner = _owner(model, loc)
    if owner is None:
        return f"{_dotted(loc)}: unknown {what}"
    names = list(owner.model_fields)
    hint = getattr(owner, "field_hints", {}).get(str(loc[-1]))
    if hint:  # a field that moved or never did what its name suggests
        return f"{_dotted(loc)}: unknown {what}; {hint}"
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if close:
        return f"{_dotted(loc)}: unknown {what}; did you mean {_dotted((*loc[:-1], close[0]))}?"
    return f"{_dotted(loc)}: unknown {what}; valid {what}s: {', '.join(names)}"


def _owner(tp: Any, loc: _Loc) -> type[BaseModel] | None:
    """The model whose field ``loc[-1]`` would be, following ``loc`` down from ``tp``.

    Steps through nested models, ``X | None`` and other unions (pydantic may put the
    member's class name in ``loc``), ``Annotated``, lists (an index) and dicts (a key).
    """
    if not loc:
        return None
    head, rest = loc[0], loc[1:]
    if _is_model(tp):
        if not rest:
            return tp
        field = tp.model_fields.get(str(head))
        return None if field is None else _owner(field.annotation, rest)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        return _owner(args[0], loc)
    if origin in (Union, types.UnionType):
        return _owner_in_union([a for a in args if a is not type(None)], loc)
    if isinstance(origin, type) and issubclass(origin, Mapping) and len(args) == 2:
        return _owner(args[1], rest)
    if isinstance(origin, type) and issubclass(origin, Sequence) and args:
        return _owner(args[0], rest) if isinstance(head, int) else None
    return None


def _owner_in_union(members: list[Any], loc: _Loc) -> type[BaseModel] | None:
    for member in members:
        if getattr(member, "__name__", None) == loc[0]:
            return _owner(member, loc[1:])
    for member in members:
        found = _owner(member, loc)
        if found is not None:
            return found
    return None


def _is_model(tp: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def load_toml(
    model: type[_M], path: str | Path | None, overrides: dict[str, Any] | None = None
) -> _M:
    """Read a TOML file (nothing when ``path`` is None), apply overrides, validate.

    ``overrides`` maps dotted field paths (``"run.rounds"``) to values; one inside a
    table (``"client.params.epochs"``) merges into it (see :func:`set_dotted`).
    """
    raw: dict[str, Any] = {} if path is None else _read_toml(Path(path))
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value, model)
    return validate(model, raw, "config" if path is None else str(path))


def _read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at ``path``; every way it can fail is a one-line ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (IsADirectoryError, PermissionError) as exc:
        if path.is_dir():
            raise ConfigError(f"config {path} is a directory, not a TOML file") from exc
        raise ConfigError(
            f"config {path} cannot be read: permission denied (check the file's permissions)"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"config {path} cannot be read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text, so not a TOML file") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


def set_dotted(
    raw: dict[str, Any], dotted: str, value: Any, model: type[BaseModel] | None = None
) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = "a.b.c"``.

    With ``model`` (what ``raw`` will be validated as), a table that ``raw`` lacks and
    whose field is a dict with a default starts as that default, so ``client.params.epochs``
    changes one entry of the default ``client.params`` instead of replacing the table.
    """
    *parents, leaf = dotted.split(".")
    node: dict[str, Any] = raw
    owner: Any = model
    for key in parents:
        field = owner.model_fields.get(key) if _is_model(owner) else None
        if key not in node:
            node[key] = _default_table(field)
        child = node[key]
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a table")
        node, owner = child, _section_model(field)
    node[leaf] = value


def _default_table(field: FieldInfo | None) -> dict[str, Any]:
    """A copy of ``field``'s default when it is a dict-typed field; else an empty table."""
    if field is None or field.is_required() or not _is_dict(field.annotation):
        return {}
    default = field.get_default(call_default_factory=True)
    return copy.deepcopy(dict(default)) if isinstance(default, Mapping) else {}


def _is_dict(tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType, Annotated):
        return any(_is_dict(a) for a in get_args(tp))
    target = origin or tp
    return isinstance(target, type) and issubclass(target, Mapping)


def _section_model(field: FieldInfo | None) -> type[BaseModel] | None:
    """The model a field holds (``M`` or ``M | None``); None for anything else."""
    if field is None:
        return None
    tp = field.annotation
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        tp = members[0] if len(members) == 1 else None
    return tp if _is_model(tp) else None


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value`` where value is a TOML value (bare words become strings)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed
