"""What a registry keeps beside a version's own row: its cross-site results and metadata.

* ``site_results``: how a version did at each site in each cross-site evaluation
  (``fedlearn evaluate-sites``, :mod:`fedlearn.crosssite`), every numeric metric;
* ``version_metadata``: text keys of a version (the MLflow run that published it, ...).

The :class:`~fedlearn.registry.model_registry.ModelRegistry` owns the connection and the
transactions; this module holds the tables, their reads and writes, and the gate's
``max_site_regression`` rule (:func:`judge`).
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fedlearn.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS site_results (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    evaluation TEXT NOT NULL,
    client_id INTEGER NOT NULL,
    site TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (name, version, evaluation, client_id)
);
CREATE TABLE IF NOT EXISTS version_metadata (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (name, version, key)
);
"""


@dataclass(frozen=True)
class SiteResult:
    """How one version did at one site in one cross-site evaluation: ``metrics`` holds
    every numeric metric the site reported, ``loss`` included."""

    name: str
    version: int
    evaluation: str
    client_id: int
    site: str
    num_examples: int
    metrics: dict[str, float]


def record(db: sqlite3.Connection, evaluation: str, results: Sequence[SiteResult]) -> None:
    """Insert ``results`` (inside the caller's transaction); ConfigError when one is
    already there or not a finite number."""
    if not isinstance(evaluation, str) or not evaluation:
        raise ConfigError("a cross-site evaluation needs a non-empty name")
    rows = []
    for r in results:
        for key, value in r.metrics.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ConfigError(f"site {r.site}: {key} must be a finite number, got {value!r}")
        metrics = json.dumps({k: float(v) for k, v in r.metrics.items()})
        rows.append(
            (
                r.name,
                r.version,
                evaluation,
                r.client_id,
                r.site,
                r.num_examples,
                metrics,
                time.time(),
            )
        )
    try:
        db.executemany("INSERT INTO site_results VALUES (?,?,?,?,?,?,?,?)", rows)
    except sqlite3.IntegrityError as exc:
        raise ConfigError(
            f"cross-site evaluation {evaluation!r} is already attached to these versions"
        ) from exc


def read(db: sqlite3.Connection, name: str, version: int) -> dict[str, list[SiteResult]]:
    """Evaluation name -> the version's results there (client order), oldest first."""
    rows = db.execute(
        "SELECT name, version, evaluation, client_id, site, num_examples, metrics"
        " FROM site_results WHERE name = ? AND version = ? ORDER BY rowid",
        (name, version),
    )
    out: dict[str, list[SiteResult]] = {}
    for r in rows:
        result = SiteResult(r[0], int(r[1]), r[2], int(r[3]), r[4], int(r[5]), json.loads(r[6]))
        out.setdefault(result.evaluation, []).append(result)
    for results in out.values():
        results.sort(key=lambda x: x.client_id)
    return out


def set_metadata(db: sqlite3.Connection, name: str, version: int, key: str, value: str) -> None:
    """Set (or replace) one metadata key of a version (inside the caller's transaction)."""
    if not isinstance(key, str) or not key or not isinstance(value, str):
        raise ConfigError(f"metadata: {key!r} must map a name to text, got {value!r}")
    db.execute(
        "INSERT OR REPLACE INTO version_metadata VALUES (?,?,?,?,?)",
        (name, version, key, value, time.time()),
    )


def metadata(db: sqlite3.Connection, name: str, version: int) -> dict[str, str]:
    """A version's metadata, by key."""
    rows = db.execute(
        "SELECT key, value FROM version_metadata WHERE name = ? AND version = ? ORDER BY key",
        (name, version),
    )
    return {r[0]: r[1] for r in rows}


def judge(
    candidate: int,
    production: int,
    metric: str,
    higher_is_better: bool,
    limit: float,
    mine: dict[str, list[SiteResult]],
    theirs: dict[str, list[SiteResult]],
    passed: str,
) -> tuple[bool, str]:
    """The gate's ``max_site_regression``: in the newest evaluation holding both versions,
    refuse the candidate when its ``metric`` at some site is worse than production's there
    by more than ``limit`` (the worst such site is named). Returns (promoted, reason);
    ``passed``, the reason the other rules gave, stands with a note when the rule cannot
    apply."""
    v, p = f"v{candidate}", f"production v{production}"
    shared = [e for e in mine if e in theirs]
    if not shared:
        return (
            True,
            f"{passed}; max_site_regression not applied: no cross-site evaluation "
            f"holds both {v} and {p}",
        )
    evaluation = shared[-1]
    at = {r.client_id: r for r in mine[evaluation]}
    regressions: list[tuple[float, SiteResult, float, float]] = []
    compared = 0
    for base in theirs[evaluation]:
        before = base.metrics.get(metric)
        if before is None:
            continue
        result = at.get(base.client_id)
        now = None if result is None else result.metrics.get(metric)
        if result is None or now is None:
            return (
                False,
                f"{v} not promoted: site {base.site} has no {metric} for {v} in "
                f"cross-site evaluation {evaluation} ({p} has {before:g})",
            )
        compared += 1
        drop = before - now if higher_is_better else now - before
        if drop > limit:
            regressions.append((drop, result, now, before))
    if not compared:
        return (
            True,
            f"{passed}; max_site_regression not applied: cross-site evaluation "
            f"{evaluation} has no {metric} for {p}",
        )
    if regressions:
        regressions.sort(key=lambda x: (-x[0], x[1].client_id))
        drop, site, now, before = regressions[0]
        more = len(regressions) - 1
        others = f" (and {more} more site{'s' * (more > 1)})" if more else ""
        return (
            False,
            f"{v} not promoted: at site {site.site} {metric}={now:g} vs {p} {before:g}, a "
            f"regression of {drop:g} beyond max_site_regression {limit:g}{others} "
            f"(cross-site evaluation {evaluation})",
        )
    return (
        True,
        f"{passed}; every one of {compared} sites within max_site_regression "
        f"{limit:g} of {p} (cross-site evaluation {evaluation})",
    )
