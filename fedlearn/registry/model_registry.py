"""A versioned model registry: one directory of safetensors files plus a SQLite index.

::

    root/
    ├── registry.db            versions, aliases, history, decisions, traffic (WAL)
    └── <name>/v<N>.safetensors

Versions count from 1 per model name. Each file is written to a temporary name, synced
and renamed before its index row commits, and its sha256 is checked on every load.

Aliases name versions: ``latest`` is always the highest version, ``production`` moves
only through :meth:`ModelRegistry.promote` (which applies a :class:`Gate`) and
:meth:`ModelRegistry.rollback`; any other alias (``candidate``, ...) is set freely.
Every promotion attempt and rollback is recorded in the ``decisions`` table.

A model's traffic policy (A/B, shadow, canary) is in :mod:`fedlearn.registry.traffic_store`.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fedlearn.engine.records import Arrays
from fedlearn.engine.weights import load_verified, save_weights_atomically
from fedlearn.errors import ConfigError
from fedlearn.registry import site_results
from fedlearn.registry.site_results import SiteResult
from fedlearn.registry.traffic_store import SCHEMA as TRAFFIC_SCHEMA
from fedlearn.registry.traffic_store import TrafficPolicies

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    run TEXT NOT NULL,
    round INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    client_summary TEXT,
    factory TEXT NOT NULL,
    factory_params TEXT NOT NULL,
    signature TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    parent INTEGER,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS production_history (
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, seq)
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    time REAL NOT NULL,
    promoted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    action TEXT NOT NULL
);
"""

PRODUCTION = "production"
#: The metric holding a version's differential-privacy epsilon (at ``dp.delta``).
EPSILON_METRIC = "dp.epsilon"
LATEST = "latest"
#: Module prefixes a served version's factory may come from unless the operator adds more
#: (``fedlearn serve --allow-factory``). Not ``fedlearn.``: no model builder lives there.
DEFAULT_FACTORY_PREFIXES: tuple[str, ...] = ("clients.",)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_COLUMNS = (
    "name, version, created, run, round, metrics, client_summary, factory, factory_params,"
    " signature, sha256, parent"
)


@dataclass(frozen=True)
class ModelVersion:
    """One published version of a model and what is known about it."""

    name: str
    version: int
    created: float
    run: str
    round: int
    metrics: dict[str, float]
    client_summary: dict[str, float] | None
    factory: str
    factory_params: dict[str, Any]
    signature: dict[str, Any]
    sha256: str
    parent: int | None
    path: Path


@dataclass(frozen=True)
class Gate:
    """What a candidate must meet to become ``production``.

    ``metric`` (from the version's ``metrics``) must be no worse than the current
    production's, allowing ``tolerance`` (in the metric's units) of regression. When
    ``min_worst_client`` is set, the candidate's ``client_summary["<metric>_worst"]``
    must be at least that value (at most, when lower is better) -- also for the first
    version, which otherwise always passes. When ``max_epsilon`` is set, the candidate's
    differential-privacy guarantee (``metrics["dp.epsilon"]``) must be at most that: a
    version without one is refused. When ``max_site_regression`` is set and a cross-site
    evaluation (:mod:`fedlearn.crosssite`) evaluated both the candidate and the current
    production on the same sites, no site's ``metric`` may be worse than production's at
    that site by more than it (in the metric's units); without such an evaluation the
    rule does not apply, and the decision's reason says so.
    """

    metric: str
    higher_is_better: bool = True
    tolerance: float = 0.0
    min_worst_client: float | None = None
    max_epsilon: float | None = None
    max_site_regression: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ConfigError("gate: metric must be a non-empty string")
        if not _finite(self.tolerance) or self.tolerance < 0:
            raise ConfigError(f"gate: tolerance must be finite and >= 0, got {self.tolerance!r}")
        if self.min_worst_client is not None and not _finite(self.min_worst_client):
            raise ConfigError(
                f"gate: min_worst_client must be a finite number, got {self.min_worst_client!r}"
            )
        if self.max_site_regression is not None and not (
            _finite(self.max_site_regression) and self.max_site_regression >= 0
        ):
            raise ConfigError(
                "gate: max_site_regression must be finite and >= 0, got "
                f"{self.max_site_regression!r}"
            )

    @property
    def worst_key(self) -> str:
        """The ``client_summary`` key holding the worst client's value of ``metric``."""
        return f"{self.metric}_worst"


@dataclass(frozen=True)
class Decision:
    """The outcome of one promotion attempt."""

    promoted: bool
    reason: str


@dataclass(frozen=True)
class DecisionRecord:
    """One row of the decision log: ``action`` is ``promote``, ``rollback`` or a traffic
    policy's (:mod:`fedlearn.registry.traffic_store`)."""

    name: str
    version: int
    time: float
    promoted: bool
    reason: str
    action: str


def check_factory(
    ref: str, allowed_prefixes: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES
) -> tuple[str, str]:
    """Check that ``ref`` is ``module:function`` with a module under ``allowed_prefixes``.

    A prefix ending in ``"."`` allows that package and everything below it
    (``"clients."`` allows ``clients`` and ``clients.mnist``, not ``clientsx``); any other
    prefix allows exactly that module and its submodules. Returns ``(module, function)``;
    raises :class:`ConfigError` otherwise. Nothing is imported.
    """
    module, function = _parse_factory(ref)
    for prefix in allowed_prefixes:
        package = prefix[:-1] if prefix.endswith(".") else prefix
        if package and (module == package or module.startswith(package + ".")):
            return module, function
    raise ConfigError(
        f"factory {ref!r}: module {module!r} is not under an allowed prefix "
        f"{list(allowed_prefixes)}"
    )


class ModelRegistry(TrafficPolicies):
    """Models, their versions and aliases under ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            self.root / "registry.db", isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA + site_results.SCHEMA + TRAFFIC_SCHEMA)

    # -- publishing and reading -------------------------------------------------------

    def publish(
        self,
        name: str,
        arrays: Arrays,
        *,
        run: str,
        round: int,
        metrics: Mapping[str, float],
        client_summary: Mapping[str, float] | None,
        factory: str,
        signature: Mapping[str, Any],
        parent: int | None = None,
        factory_params: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Store ``arrays`` as the next version of ``name`` and index it; returns it.

        ``factory`` (``module:function``) called with ``factory_params`` (keyword
        arguments: booleans, numbers, strings) rebuilds the module the arrays belong to.
        """
        _check_name(name, "model name")
        if not isinstance(run, str):
            raise ConfigError(f"run must be a string, got {run!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ConfigError(f"round must be an integer >= 0, got {round!r}")
        metrics_json = json.dumps(_numbers(metrics, "metrics"))
        summary_json = (
            None
            if client_summary is None
            else json.dumps(_numbers(client_summary, "client_summary"))
        )
        _parse_factory(factory)
        params_json = json.dumps(_factory_params(factory_params or {}))
        signature_json = json.dumps(_check_signature(signature))
        if not arrays:
            raise ConfigError("cannot publish a model with no arrays")
        with self._transaction():
            row = self._db.execute(
                "SELECT COALESCE(MAX(version), 0) FROM versions WHERE name = ?", (name,)
            ).fetchone()
            version = int(row[0]) + 1
            if parent is not None and self._row(name, parent) is None:
                raise ConfigError(f"parent: model {name!r} has no version {parent}")
            path = self._path(name, version)
            digest = self._write_file(
                path, arrays, {"fedlearn.model": name, "version": str(version)}
            )
            try:
                self._db.execute(
                    f"INSERT INTO versions ({_VERSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        name,
                        version,
                        time.time(),
                        run,
                        round,
                        metrics_json,
                        summary_json,
                        factory,
                        params_json,
                        signature_json,
                        digest,
                        parent,
                    ),
                )
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        return self.get(name, version)

    def names(self) -> list[str]:
        """Every model name with at least one version, sorted."""
        return [r[0] for r in self._db.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first (empty if the name is unknown)."""
        rows = self._db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? ORDER BY version", (name,)
        )
        return [self._version(r) for r in rows]

    def get(self, name: str, version: int) -> ModelVersion:
        """One version of ``name``; :class:`ConfigError` if there is no such version."""
        row = self._row(name, version)
        if row is None:
            raise ConfigError(f"model {name!r} has no version {version}")
        return self._version(row)

    def load(self, name: str, version: int | str) -> Arrays:
        """The arrays of a version (or alias), after checking the file's sha256."""
        info = self.resolve(name, version)
        return load_verified(info.path, info.sha256, f"model file of {name!r} v{info.version}")

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the index
        (SQLite's ``PRAGMA data_version``): a cheap way for a reader to notice a change."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    # -- aliases ------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` of ``name`` at ``version`` (not ``latest`` or ``production``)."""
        _check_name(alias, "alias")
        if alias.isdigit():
            raise ConfigError(f"alias {alias!r} would read as a version number")
        if alias in (LATEST, PRODUCTION):
            raise ConfigError(
                f"alias {alias!r} cannot be set directly"
                + (" (use promote)" if alias == PRODUCTION else "")
            )
        self.get(name, version)
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (name, alias, version)
            )

    def aliases(self, name: str) -> dict[str, int]:
        """Every alias of ``name`` (``latest`` included when there is a version)."""
        out = {
            r[0]: int(r[1])
            for r in self._db.execute(
                "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (name,)
            )
        }
        latest = self._latest(name)
        if latest is not None:
            out[LATEST] = latest
        return out

    def resolve(self, name: str, alias_or_version: str | int) -> ModelVersion:
        """A version given its number (int or digits) or an alias such as ``production``."""
        ref = alias_or_version
        if isinstance(ref, bool):
            raise ConfigError(f"not a version or alias: {ref!r}")
        if isinstance(ref, int):
            return self.get(name, ref)
        if not isinstance(ref, str):
            raise ConfigError(f"not a version or alias: {ref!r}")
        if ref.isdigit():
            return self.get(name, int(ref))
        if ref == LATEST:
            latest = self._latest(name)
            if latest is None:
                raise ConfigError(f"model {name!r} has no versions")
            return self.get(name, latest)
        row = self._db.execute(
            "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, ref)
        ).fetchone()
        if row is None:
            raise ConfigError(f"model {name!r} has no alias {ref!r}")
        return self.get(name, int(row[0]))

    # -- promotion ----------------------------------------------------------------------

    def promote(self, name: str, version: int, gate: Gate | None) -> Decision:
        """Make ``version`` production if it passes ``gate`` (``None``: always); the
        decision is recorded either way and ``production`` moves only when promoted."""
        candidate = self.get(name, version)
        with self._transaction():
            return self._promote(candidate, gate)

    def _promote(self, candidate: ModelVersion, gate: Gate | None) -> Decision:
        """:meth:`promote` inside a write transaction."""
        name, version = candidate.name, candidate.version
        current = self._production(name)
        if current is not None and current == version:
            decision = Decision(False, f"v{version} is already production")
        else:
            previous = None if current is None else self.get(name, current)
            decision = _judge(candidate, previous, gate)
            if decision.promoted and previous is not None and gate is not None:
                decision = self._judge_sites(candidate, previous, gate, decision)
        if decision.promoted:
            self._db.execute(
                "INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (name, PRODUCTION, version)
            )
            self._db.execute(
                "INSERT INTO production_history VALUES (?,"
                " (SELECT COALESCE(MAX(seq), 0) + 1 FROM production_history WHERE name = ?),"
                " ?)",
                (name, name, version),
            )
        self._record(name, version, decision, "promote")
        return decision

    def rollback(self, name: str) -> ModelVersion:
        """Restore the production before the current one; recorded as a decision."""
        with self._transaction():
            rows = self._db.execute(
                "SELECT seq, version FROM production_history WHERE name = ?"
                " ORDER BY seq DESC LIMIT 2",
                (name,),
            ).fetchall()
            if len(rows) < 2:
                raise ConfigError(f"model {name!r} has no previous production to roll back to")
            (seq, current), (_, restored) = rows
            self._db.execute(
                "DELETE FROM production_history WHERE name = ? AND seq = ?", (name, seq)
            )
            self._db.execute(
                "INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)", (name, PRODUCTION, restored)
            )
            reason = f"rolled back from v{current} to v{restored}"
            self._record(name, int(restored), Decision(True, reason), "rollback")
        return self.get(name, int(restored))

    def decisions(self, name: str) -> list[DecisionRecord]:
        """Every promotion decision and rollback of ``name``, oldest first."""
        rows = self._db.execute(
            "SELECT name, version, time, promoted, reason, action FROM decisions"
            " WHERE name = ? ORDER BY id",
            (name,),
        )
        return [DecisionRecord(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    # -- cross-site results and metadata (fedlearn.registry.site_results) ---------------

    def record_site_results(self, evaluation: str, results: Sequence[SiteResult]) -> None:
        """Attach one cross-site evaluation's results to the versions it evaluated (one
        transaction; ``evaluation`` names it and must be new for each version)."""
        for r in results:
            self.get(r.name, r.version)
        with self._transaction():
            site_results.record(self._db, evaluation, results)

    def site_results(self, name: str, version: int) -> dict[str, list[SiteResult]]:
        """Every cross-site evaluation of a version: evaluation name -> its site results
        (client order), oldest evaluation first."""
        return site_results.read(self._db, name, version)

    def set_metadata(self, name: str, version: int, key: str, value: str) -> None:
        """Set a text ``key`` of a version's metadata (an MLflow run id, ...); set again,
        it is replaced."""
        self.get(name, version)
        with self._transaction():
            site_results.set_metadata(self._db, name, version, key, value)

    def metadata(self, name: str, version: int) -> dict[str, str]:
        """A version's metadata (empty when none was set)."""
        return site_results.metadata(self._db, name, version)

    def _judge_sites(
        self, candidate: ModelVersion, production: ModelVersion, gate: Gate, passed: Decision
    ) -> Decision:
        if gate.max_site_regression is None:
            return passed
        promoted, reason = site_results.judge(
            candidate.version,
            production.version,
            gate.metric,
            gate.higher_is_better,
            gate.max_site_regression,
            self.site_results(candidate.name, candidate.version),
            self.site_results(production.name, production.version),
            passed.reason,
        )
        return Decision(promoted, reason)

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the index."""
        self._db.close()

    def __enter__(self) -> ModelRegistry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, taken up front so version numbers cannot race."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _path(self, name: str, version: int) -> Path:
        return self.root / name / f"v{version}.safetensors"

    def _write_file(self, path: Path, arrays: Arrays, metadata: dict[str, str]) -> str:
        """Write atomically (temporary name, sync, rename); returns the file's sha256."""
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_weights_atomically(arrays, path, metadata)

    def _row(self, name: str, version: int) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._db.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions WHERE name = ? AND version = ?",
            (name, version),
        ).fetchone()
        return row

    def _version(self, r: tuple[Any, ...]) -> ModelVersion:
        return ModelVersion(
            name=r[0],
            version=int(r[1]),
            created=float(r[2]),
            run=r[3],
            round=int(r[4]),
            metrics=json.loads(r[5]),
            client_summary=None if r[6] is None else json.loads(r[6]),
            factory=r[7],
            factory_params=json.loads(r[8]),
            signature=json.loads(r[9]),
            sha256=r[10],
            parent=None if r[11] is None else int(r[11]),
            path=self._path(r[0], int(r[1])),
        )

    def _latest(self, name: str) -> int | None:
        row = self._db.execute(
            "SELECT MAX(version) FROM versions WHERE name = ?", (name,)
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def _production(self, name: str) -> int | None:
        row = self._db.execute(
            "SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, PRODUCTION)
        ).fetchone()
        return None if row is None else int(row[0])

    def _note(self, name: str, version: int, promoted: bool, reason: str, action: str) -> int:
        return self._record(name, version, Decision(promoted, reason), action)

    def _promote_ungated(self, name: str, version: int) -> None:
        self._promote(self.get(name, version), None)

    def _record(self, name: str, version: int, decision: Decision, action: str) -> int:
        """Add a decision; returns its id."""
        cursor = self._db.execute(
            "INSERT INTO decisions (name, version, time, promoted, reason, action)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, version, time.time(), int(decision.promoted), decision.reason, action),
        )
        return int(cursor.lastrowid or 0)


def _judge(candidate: ModelVersion, production: ModelVersion | None, gate: Gate | None) -> Decision:
    """Apply ``gate`` to ``candidate`` against the current ``production`` (if any)."""
    v = f"v{candidate.version}"
    if gate is None:
        return Decision(True, f"{v} promoted without a gate")
    better = "higher" if gate.higher_is_better else "lower"
    if gate.max_epsilon is not None:
        eps = candidate.metrics.get(EPSILON_METRIC)
        if eps is None:
            return Decision(
                False,
                f"{v} has no privacy guarantee ({EPSILON_METRIC}); the gate needs "
                f"epsilon <= {gate.max_epsilon:g}",
            )
        if not eps <= gate.max_epsilon:
            return Decision(
                False, f"{v} epsilon={eps:.4g} exceeds the gate's max_epsilon {gate.max_epsilon:g}"
            )
    value = candidate.metrics.get(gate.metric)
    if value is None:
        return Decision(False, f"{v} has no metric {gate.metric!r}")
    if gate.min_worst_client is not None:
        worst = (candidate.client_summary or {}).get(gate.worst_key)
        if worst is None:
            return Decision(False, f"{v} has no client summary {gate.worst_key!r}")
        ok = (
            worst >= gate.min_worst_client
            if gate.higher_is_better
            else worst <= gate.min_worst_client
        )
        if not ok:
            bound = ">=" if gate.higher_is_better else "<="
            return Decision(
                False,
                f"{v} worst client {gate.metric}={worst:g} fails {bound} {gate.min_worst_client:g}",
            )
    if production is None:
        return Decision(True, f"{v} is the first production ({gate.metric}={value:g})")
    base = production.metrics.get(gate.metric)
    if base is None:
        return Decision(
            True, f"{v} promoted: production v{production.version} has no {gate.metric!r}"
        )
    if gate.higher_is_better:
        passed = value >= base - gate.tolerance
    else:
        passed = value <= base + gate.tolerance
    comparison = (
        f"{gate.metric}={value:g} vs production v{production.version} {base:g} "
        f"({better} is better, tolerance {gate.tolerance:g})"
    )
    if passed:
        return Decision(True, f"{v} promoted: {comparison}")
    return Decision(False, f"{v} not promoted: {comparison}")


def _parse_factory(ref: str) -> tuple[str, str]:
    if not isinstance(ref, str):
        raise ConfigError(f"factory must be a 'module:function' string, got {ref!r}")
    module, sep, function = ref.partition(":")
    if (
        not sep
        or not module
        or not all(part.isidentifier() for part in module.split("."))
        or not function.isidentifier()
    ):
        raise ConfigError(f"factory: expected 'module:function', got {ref!r}")
    return module, function


def _check_name(value: str, field: str) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise ConfigError(
            f"{field} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def _finite(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _numbers(values: Mapping[str, float], field: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in values.items():
        if not isinstance(key, str) or not _finite(value):
            raise ConfigError(f"{field}: {key!r} must map a name to a finite number, got {value!r}")
        out[key] = float(value)
    return out


def _factory_params(params: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise ConfigError(f"factory_params must be a mapping, got {params!r}")
    for key, value in params.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"factory_params: {key!r} is not a keyword argument name")
        if not (isinstance(value, bool | str) or _finite(value)):
            raise ConfigError(
                f"factory_params: {key} must be a boolean, finite number or string, got {value!r}"
            )
    return dict(params)


def _check_signature(signature: Mapping[str, Any]) -> dict[str, Any]:
    """``{"inputs": [...], "outputs": [...]}``, each entry ``{name, datatype, shape}``."""
    if not isinstance(signature, Mapping):
        raise ConfigError("signature must be a mapping with 'inputs' and 'outputs'")
    out: dict[str, Any] = {}
    for side in ("inputs", "outputs"):
        entries = signature.get(side)
        if not isinstance(entries, list | tuple) or not entries:
            raise ConfigError(f"signature: {side!r} must be a non-empty list")
        checked = []
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise ConfigError(f"signature: each of {side!r} must be a mapping, got {entry!r}")
            name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
            if not isinstance(name, str) or not name:
                raise ConfigError(f"signature: {side!r} entry has no name: {entry!r}")
            if not isinstance(datatype, str) or not datatype:
                raise ConfigError(f"signature: {side} {name!r} has no datatype")
            if not isinstance(shape, list | tuple) or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
            ):
                raise ConfigError(
                    f"signature: {side} {name!r} shape must be a list of ints (-1: any)"
                )
            checked.append({"name": name, "datatype": datatype, "shape": list(shape)})
        out[side] = checked
    return out
