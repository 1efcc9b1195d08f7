"""Reading configs: TOML files, ``--set`` overrides, validation whose errors name the field."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fedlearn.errors import ConfigError

_M = TypeVar("_M", bound=BaseModel)


def validate(model: type[_M], raw: dict[str, Any], source: str = "config") -> _M:
    """Validate a mapping as ``model``; ConfigError lists each bad field by dotted path."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{where}: {err['msg']}")
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(problems)) from exc


def load_toml(
    model: type[_M], path: str | Path | None, overrides: dict[str, Any] | None = None
) -> _M:
    """Read a TOML file (nothing when ``path`` is None), apply overrides, validate.

    ``overrides`` maps dotted field paths (``"run.rounds"``) to values.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return validate(model, raw, "config" if path is None else str(path))


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = "a.b.c"``."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a table")
        node = child
    node[leaf] = value


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
