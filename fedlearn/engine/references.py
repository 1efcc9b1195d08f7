"""Resolve ``module:attribute`` references named in configs."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from fedlearn.errors import ConfigError


def resolve(reference: str, field: str) -> Any:
    """Import ``module:attribute``; the working directory is importable, as for uvicorn.

    For references a user's own config names (``client.app``, ``strategy.name``,
    ``model.factory``). Never for text from a registry row: the serving endpoint looks
    factories up among registered model builders (:mod:`fedlearn.registry.builders`) and
    does not add the working directory to ``sys.path``.
    """
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{field}: expected 'module:attribute', got {reference!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{field}: cannot import module {module_name!r} ({exc}); run from the directory "
            "that contains it or install it"
        ) from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ConfigError(f"{field}: module {module_name!r} has no {attribute!r}") from exc
