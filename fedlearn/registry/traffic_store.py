"""The traffic-policy half of :class:`~fedlearn.registry.model_registry.ModelRegistry`.

:class:`TrafficPolicies` is mixed into the registry: a model's policy
(:mod:`fedlearn.registry.traffic`) is a row of the ``traffic`` table, and every change of
it (set, cleared, a canary's step, promotion or rollback) is a row of the registry's
decision log, written in the same transaction. A policy's ``revision`` is the id of that
decision, so it is never reused: a change computed from one revision (an endpoint's canary
decision) applies only if the policy is still at that revision. ``CREATE TABLE IF NOT
EXISTS`` adds the table to a registry of an older fedlearn when it is opened.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fedlearn.errors import ConfigError
from fedlearn.registry.traffic import Canary, Policy, Shadow, policy_from_json, policy_to_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS traffic (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    revision INTEGER NOT NULL,
    updated REAL NOT NULL
);
"""
#: Decision-log actions of traffic policies (besides ``promote`` and ``rollback``).
ROUTE_SET = "route-set"
ROUTE_CLEAR = "route-clear"
CANARY_STEP = "canary-step"
CANARY_PROMOTE = "canary-promote"
CANARY_ROLLBACK = "canary-rollback"
_COLUMNS = "name, policy, revision, updated"


@dataclass(frozen=True)
class StoredPolicy:
    """A model's traffic policy as stored; ``revision`` changes with every change of it
    (it is the id of the decision that recorded the change, so it is never reused)."""

    name: str
    policy: Policy
    revision: int
    updated: float


class TrafficPolicies:
    """The registry's traffic-policy methods (module docstring)."""

    _db: sqlite3.Connection

    if TYPE_CHECKING:  # provided by ModelRegistry

        def _transaction(self) -> AbstractContextManager[None]: ...

        def _note(
            self, name: str, version: int, promoted: bool, reason: str, action: str
        ) -> int: ...

        def _production(self, name: str) -> int | None: ...

        def _promote_ungated(self, name: str, version: int) -> None: ...

        def versions(self, name: str) -> list[Any]: ...

    def traffic(self, name: str) -> StoredPolicy | None:
        """The traffic policy of ``name`` (None: none set)."""
        row = self._db.execute(f"SELECT {_COLUMNS} FROM traffic WHERE name = ?", (name,))
        found = row.fetchone()
        return None if found is None else _stored(found)

    def traffic_all(self) -> dict[str, StoredPolicy]:
        """Every model's traffic policy, by model name."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM traffic")
        return {r[0]: _stored(r) for r in rows}

    def set_traffic(self, name: str, policy: Policy, reason: str | None = None) -> StoredPolicy:
        """Set (or replace) the traffic policy of ``name``; recorded as ``route-set``.

        Every version the policy names must exist; a canary's baseline must be the
        current production and its candidate another version. A canary starts at its
        first step, now."""
        known = {v.version for v in self.versions(name)}
        if not known:
            raise ConfigError(f"model {name!r} has no versions")
        missing = [v for v in policy.versions if v not in known]
        if missing:
            raise ConfigError(
                f"model {name!r} has no version {', '.join(map(str, missing))} "
                f"(versions: {', '.join(map(str, sorted(known)))})"
            )
        with self._transaction():
            if isinstance(policy, Canary):
                production = self._production(name)
                if production != policy.baseline:
                    raise ConfigError(
                        f"canary: the baseline must be the current production of {name!r} "
                        f"({'none' if production is None else f'v{production}'}), "
                        f"not v{policy.baseline}"
                    )
                policy = replace(policy, step=0, step_started=time.time())
            text = f"policy set: {policy.describe()}" + (f" ({reason})" if reason else "")
            revision = self._note(name, policy_version(policy), False, text, ROUTE_SET)
            self._db.execute(
                "INSERT OR REPLACE INTO traffic VALUES (?, ?, ?, ?)",
                (name, policy_to_json(policy), revision, time.time()),
            )
        stored = self.traffic(name)
        assert stored is not None
        return stored

    def clear_traffic(self, name: str, reason: str | None = None) -> bool:
        """End the traffic policy of ``name`` (recorded as ``route-clear``); False when
        there was none."""
        with self._transaction():
            current = self.traffic(name)
            if current is None:
                return False
            text = f"policy cleared: {current.policy.describe()}" + (
                f" ({reason})" if reason else ""
            )
            self._note(name, policy_version(current.policy), False, text, ROUTE_CLEAR)
            self._db.execute("DELETE FROM traffic WHERE name = ?", (name,))
        return True

    def advance_traffic(
        self, name: str, revision: int, policy: Policy, action: str, reason: str
    ) -> StoredPolicy | None:
        """Replace the policy of ``name`` if it is still at ``revision`` (None otherwise:
        somebody changed it meanwhile); the change is recorded as ``action``."""
        with self._transaction():
            current = self.traffic(name)
            if current is None or current.revision != revision:
                return None
            new = self._note(name, policy_version(policy), False, reason, action)
            self._db.execute(
                "UPDATE traffic SET policy = ?, revision = ?, updated = ? WHERE name = ?",
                (policy_to_json(policy), new, time.time(), name),
            )
        return self.traffic(name)

    def end_traffic(
        self, name: str, revision: int, action: str, reason: str, *, promote: int | None = None
    ) -> bool:
        """End the policy of ``name`` if it is still at ``revision`` (False otherwise),
        recording ``action`` with ``reason``; with ``promote``, that version becomes
        production in the same transaction (no gate: ``reason`` says why; also recorded
        as a ``promote`` decision)."""
        with self._transaction():
            current = self.traffic(name)
            if current is None or current.revision != revision:
                return False
            version = promote if promote is not None else policy_version(current.policy)
            self._note(name, version, promote is not None, reason, action)
            self._db.execute("DELETE FROM traffic WHERE name = ?", (name,))
            if promote is not None:
                self._promote_ungated(name, promote)
        return True


def _stored(row: tuple[Any, ...]) -> StoredPolicy:
    return StoredPolicy(row[0], policy_from_json(row[1]), int(row[2]), float(row[3]))


def policy_version(policy: Policy) -> int:
    """The version a decision about ``policy`` is filed under: the candidate (shadow,
    canary) or the split's highest-weighted version."""
    if isinstance(policy, Canary | Shadow):
        return policy.candidate
    weights = policy.weights
    return max(weights, key=lambda v: (weights[v], -v))
