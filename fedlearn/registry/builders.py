"""Model builders: the only callables a registry row can make ``fedlearn serve`` call.

A registry version stores the reference of the function (or class) that rebuilds its
module, ``"module:name"``. Whoever can write ``registry.db`` controls that text, so the
serving endpoint does not call whatever the reference names: it calls only a function
registered here with the :func:`model_builder` decorator, in a module under an allowed
prefix::

    from fedlearn import model_builder

    @model_builder
    def build_model(hidden: int = 32) -> nn.Module:
        ...

Registration happens when the module is imported. :func:`find_builder` checks the
module's prefix before importing anything, imports the module with ``sys.path`` as it is
(the working directory is not added: ``fedlearn serve --path DIR`` adds a directory
explicitly), and answers only a registered builder; any other callable in that module
is refused without being called.

A decorator rather than ``fedlearn.model_builders`` entry points: the example apps in
``clients/`` and most users' models live in a directory next to a config, not in an
installed distribution, and entry points exist only for installed ones (and go stale until
it is reinstalled). The decorator keeps the mark next to the function it marks.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import DEFAULT_FACTORY_PREFIXES, check_factory

F = TypeVar("F", bound=Callable[..., Any])

_BUILDERS: dict[str, Callable[..., Any]] = {}
_LOCK = threading.Lock()


def builder_reference(build: Callable[..., Any]) -> str:
    """``"module:name"`` of a module-level function or class; ConfigError otherwise."""
    module = getattr(build, "__module__", None)
    qualname = getattr(build, "__qualname__", "")
    if not isinstance(module, str) or not module or not qualname.isidentifier():
        raise ConfigError(
            f"{build!r} cannot be a model builder: use a module-level function or class"
        )
    return f"{module}:{qualname}"


def model_builder(build: F) -> F:
    """Register ``build`` (a module-level function or class returning a torch Module) as a
    model builder the serving endpoint may call; returns it unchanged."""
    reference = builder_reference(build)
    with _LOCK:
        # a reloaded module registers new objects under the same reference: the newest wins
        _BUILDERS[reference] = build
    return build


def registered_builder(reference: str) -> Callable[..., Any] | None:
    """The builder registered as ``reference``, or None (nothing is imported)."""
    with _LOCK:
        return _BUILDERS.get(reference)


def registered_builders() -> dict[str, Callable[..., Any]]:
    """Every registered builder by reference (a copy)."""
    with _LOCK:
        return dict(_BUILDERS)


def is_registered(build: Callable[..., Any]) -> bool:
    """Whether ``build`` itself is registered under its reference."""
    try:
        reference = builder_reference(build)
    except ConfigError:
        return False
    return registered_builder(reference) is build


def find_builder(
    reference: str, allowed_prefixes: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES
) -> Callable[..., Any]:
    """The registered builder ``reference`` names, importing its module if needed.

    Raises :class:`ConfigError` when the module is outside ``allowed_prefixes`` (then
    nothing is imported), cannot be imported, or registers no builder by that name.
    """
    module, name = check_factory(reference, allowed_prefixes)  # before anything is imported
    build = registered_builder(reference)
    if build is not None:
        return build
    try:
        importlib.import_module(module)
    except Exception as exc:  # whatever a module raises on import: it stays unusable
        raise ConfigError(
            f"factory {reference!r}: cannot import module {module!r} "
            f"({type(exc).__name__}: {exc}); install it, or serve with --path DIR where DIR "
            "holds it"
        ) from exc
    build = registered_builder(reference)
    if build is None:
        raise ConfigError(
            f"factory {reference!r} is not a registered model builder: decorate {name} in "
            f"{module} with @fedlearn.model_builder"
        )
    return build


def add_import_paths(paths: Sequence[str | Path]) -> list[str]:
    """Put ``paths`` (in order) at the front of ``sys.path``, once each; returns the
    absolute paths added. What ``fedlearn serve --path DIR`` does: the only way a
    directory (the working directory included) becomes a place builders are imported from.
    """
    added = []
    for path in paths:
        folder = Path(path).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"--path {path}: no such directory")
        added.append(str(folder))
    for entry in reversed(added):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    return added
