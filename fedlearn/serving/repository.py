"""What the endpoint serves: the registry's models, hot-swapped as their alias moves.

A :class:`ModelRepository` watches a registry directory. For each model it keeps the
version its serving alias (``production`` by default) points at, loaded and ready; when a
promotion or rollback moves the alias, the new version is loaded off the request path and
swapped in with one reference assignment, so a request that already holds the old model
finishes on it and nothing fails. Explicit versions (``/versions/3``) load on first use
and stay in a small cache.

A version that fails to load (a factory that is no registered model builder, a corrupt
file, weights that do not fit) is logged once with the reason and remembered: requests for
it are answered "model X version N could not be loaded; see the server log" (503 /
UNAVAILABLE, no server path or exception text) without trying again, and the previous
version keeps serving. It is tried again, once, after the registry changes (any commit to
its index: a publish, a promotion, an alias), which the watcher notices on its next poll.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlearn.errors import ConfigError, FedlearnError, ModelNotFound, ModelNotReady
from fedlearn.registry.model_registry import DEFAULT_FACTORY_PREFIXES, PRODUCTION, ModelRegistry
from fedlearn.serving.models import ServedModel

log = logging.getLogger(__name__)

SwapListener = Callable[[str, "int | None", int], None]


@dataclass(frozen=True)
class RepositorySettings:
    """How a :class:`ModelRepository` picks and loads models."""

    alias: str = PRODUCTION
    models: tuple[str, ...] | None = None
    allowed_factories: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES
    poll_interval_s: float = 0.5
    cached_versions: int = 4

    def __post_init__(self) -> None:
        if not self.poll_interval_s > 0:
            raise ConfigError(f"poll interval must be > 0, got {self.poll_interval_s}")
        if self.cached_versions < 1:
            raise ConfigError(f"cached versions must be >= 1, got {self.cached_versions}")


class ModelRepository:
    """The models of the registry at ``root`` that an endpoint serves (module docstring)."""

    def __init__(self, root: str | Path, settings: RepositorySettings | None = None) -> None:
        self.settings = settings or RepositorySettings()
        if not (Path(root) / "registry.db").exists():
            raise ConfigError(f"no model registry at {root} (registry.db is missing)")
        self._registry = ModelRegistry(root)
        self._db_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._current: dict[str, ServedModel] = {}
        self._cache: OrderedDict[tuple[str, int], ServedModel] = OrderedDict()
        # (name, version) -> the registry generation in which its load failed; a failure
        # of an older generation no longer counts (the registry changed since)
        self._failed: dict[tuple[str, int], int] = {}
        self._generation = 0
        self._data_version: int | None = None
        self._targets: dict[str, int] = {}  # name -> the version its serving alias names
        self._known: frozenset[str] = frozenset()
        self._versions: dict[str, frozenset[int]] = {}
        self._listeners: list[SwapListener] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load what the alias points at now, then watch the registry in a thread."""
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name="fedlearn-registry", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop watching and close the registry index."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._db_lock:
            self._registry.close()

    def on_swap(self, listener: SwapListener) -> None:
        """Call ``listener(name, old_version, new_version)`` after each swap."""
        self._listeners.append(listener)

    # -- what is served -----------------------------------------------------------------

    def names(self) -> list[str]:
        """The model names this endpoint serves (registered ones, filtered by settings)."""
        with self._db_lock:
            names = self._registry.names()
        wanted = self.settings.models
        names = names if wanted is None else [n for n in names if n in wanted]
        self._known = frozenset(names)
        return names

    def versions(self, name: str) -> list[int]:
        """Every version number of ``name``; ModelNotFound for an unknown model."""
        self._check_name(name)
        with self._db_lock:
            return [v.version for v in self._registry.versions(name)]

    def served(self) -> dict[str, int]:
        """``{name: version}`` currently answering unversioned requests."""
        return {name: model.version for name, model in self._current.items()}

    def all_ready(self) -> bool:
        """Whether every model whose serving alias is set has a version loaded (a model
        never promoted does not hold the whole endpoint back)."""
        served = self.served()
        for name in self.names():
            if name in served:
                continue
            with self._db_lock:
                if self.settings.alias in self._registry.aliases(name):
                    return False
        return True

    def get(self, name: str, version: str | int | None = None) -> ServedModel:
        """The model answering ``name`` (its alias's version) or an explicit version."""
        if version is None or version == "":
            self._check_name(name)
            model = self._current.get(name)
            if model is None:
                target = self._targets.get(name)
                if target is not None and self._remembered_failure(name, target):
                    raise _not_loaded(name, target)
                raise ModelNotReady(f"model {name!r} has no {self.settings.alias!r} version loaded")
            return model
        number = self._version_number(name, version)
        current = self._current.get(name)
        if current is not None and current.version == number:
            return current
        return self._load_cached(name, number)

    def ready(self, name: str, version: str | int | None = None) -> bool:
        """Whether ``get(name, version)`` would answer (loading an explicit version)."""
        try:
            self.get(name, version)
        except ModelNotReady:
            return False
        return True

    # -- watching -----------------------------------------------------------------------

    def refresh(self) -> list[tuple[str, int | None, int]]:
        """Swap in every model whose alias moved; returns ``(name, old, new)`` swaps.

        A registry changed since the last look starts a new generation: versions that
        failed to load before are tried again (once)."""
        with self._db_lock:
            data_version = self._registry.data_version()
        if data_version != self._data_version:
            with self._cache_lock:
                self._data_version = data_version
                self._generation += 1
        swaps = []
        for name in self.names():
            with self._db_lock:
                target = self._registry.aliases(name).get(self.settings.alias)
            if target is None:
                self._targets.pop(name, None)
            else:
                self._targets[name] = target
            current = self._current.get(name)
            if target is None or (current is not None and current.version == target):
                continue
            if self._remembered_failure(name, target):
                continue
            try:
                model = self._load_cached(name, target)
            except ModelNotReady:
                log.warning(
                    "%s: %r names v%d, which could not be loaded; %s",
                    name,
                    self.settings.alias,
                    target,
                    "nothing served" if current is None else f"v{current.version} keeps serving",
                )
                continue
            self._current[name] = model
            old = None if current is None else current.version
            log.info("serving %s v%d (was %s)", name, target, old)
            swaps.append((name, old, target))
            for listener in self._listeners:
                listener(name, old, target)
        return swaps

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # the watcher must outlive a bad registry state
                log.exception("registry refresh failed")

    # -- internals ----------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        # names known at the last look (refreshed by the watcher) answer without a query;
        # an unknown one is looked up, so a model published since is found at once
        if name not in self._known and name not in self.names():
            raise ModelNotFound(f"unknown model {name!r}")

    def _version_number(self, name: str, version: str | int) -> int:
        self._check_name(name)
        if isinstance(version, int) and not isinstance(version, bool):
            number = version
        elif (
            isinstance(version, str)
            and version.isascii()
            and version.isdigit()
            and len(version) < 10
        ):
            number = int(version)
        else:
            raise ModelNotFound(
                f"model {name!r}: version must be a positive integer, got {version!r}"
            )
        known = self._versions.get(name, frozenset())
        if number not in known:  # versions are never removed: only a miss is looked up
            known = self._versions[name] = frozenset(self.versions(name))
        if number not in known:
            raise ModelNotFound(f"model {name!r} has no version {number}")
        return number

    def _remembered_failure(self, name: str, version: int) -> bool:
        return self._failed.get((name, version)) == self._generation

    def _load_cached(self, name: str, version: int) -> ServedModel:
        key = (name, version)
        with self._cache_lock:
            model = self._cache.get(key)
            if model is not None:
                self._cache.move_to_end(key)
                return model
            if self._remembered_failure(name, version):
                raise _not_loaded(name, version)
            try:
                with self._db_lock:
                    info = self._registry.get(name, version)
                    arrays = self._registry.load(name, version)
                model = ServedModel.load(info, arrays, self.settings.allowed_factories)
            except Exception as exc:  # whatever the row, the file or the builder did
                self._failed[key] = self._generation
                detail = f"{exc}" if isinstance(exc, FedlearnError) else f"{exc!r}"
                log.error(
                    "cannot load %s v%d (not tried again until the registry changes): %s",
                    name,
                    version,
                    detail,
                    exc_info=not isinstance(exc, FedlearnError),
                )
                raise _not_loaded(name, version) from None
            self._cache[key] = model
            while len(self._cache) > self.settings.cached_versions:
                self._cache.popitem(last=False)
            return model


def _not_loaded(name: str, version: int) -> ModelNotReady:
    """The answer for a version that failed to load: stable, with nothing of the server."""
    return ModelNotReady(
        f"model {name!r} version {version} could not be loaded; see the server log"
    )


def open_repository(
    root: str | Path,
    *,
    alias: str = PRODUCTION,
    models: Sequence[str] | None = None,
    allowed_factories: Sequence[str] = DEFAULT_FACTORY_PREFIXES,
    poll_interval_s: float = 0.5,
) -> ModelRepository:
    """A started repository over the registry at ``root``."""
    repo = ModelRepository(
        root,
        RepositorySettings(
            alias=alias,
            models=None if models is None else tuple(models),
            allowed_factories=tuple(allowed_factories),
            poll_interval_s=poll_interval_s,
        ),
    )
    repo.start()
    return repo
