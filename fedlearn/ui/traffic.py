"""What ``fedlearn serve`` does with the run's registry, for the live page's traffic panel.

:func:`traffic_view` reads a registry (:mod:`fedlearn.registry.model_registry`): each
model's production version and aliases, the traffic policy in force (a split's shares, a
shadow's candidate, a canary's step and share; :mod:`fedlearn.registry.traffic`) and the
latest decisions of its log (promote, rollback, route-set, canary-step, canary-promote,
canary-rollback, ...). :class:`RegistryWatcher` keeps that view current from a thread of
the page's process: it asks SQLite's ``data_version`` (which moves when any other
connection commits) every ``poll_s`` and reads the registry again only then. Nothing
here talks to the endpoint: an endpoint that serves the same registry follows the same
rows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlearn.registry.traffic import Canary, Policy, Shadow, Split

if TYPE_CHECKING:
    from fedlearn.registry.model_registry import ModelRegistry

log = logging.getLogger("fedlearn.ui")

DECISIONS = 12
"""Decisions shown per model, newest first."""
POLL_S = 1.0


def policy_json(policy: Policy) -> dict[str, Any]:
    """A policy as the page draws it: its kind, a sentence, and its numbers."""
    out: dict[str, Any] = {"kind": policy.kind, "describe": policy.describe()}
    if isinstance(policy, Split):
        out["shares"] = {str(v): s for v, s in policy.shares().items()}
    elif isinstance(policy, Shadow):
        out.update(candidate=policy.candidate, sample=policy.sample)
    elif isinstance(policy, Canary):
        out.update(
            candidate=policy.candidate,
            baseline=policy.baseline,
            share=policy.share,
            step=policy.step + 1,
            steps=list(policy.steps),
        )
    return out


def traffic_view(registry: ModelRegistry, decisions: int = DECISIONS) -> list[dict[str, Any]]:
    """Every model of ``registry``: production, aliases, policy in force, latest decisions."""
    out = []
    for name in registry.names():
        aliases = registry.aliases(name)
        stored = registry.traffic(name)
        log_rows = registry.decisions(name)[-decisions:]
        out.append(
            {
                "model": name,
                "production": aliases.get("production"),
                "aliases": aliases,
                "policy": None
                if stored is None
                else {**policy_json(stored.policy), "revision": stored.revision},
                "decisions": [
                    {
                        "version": d.version,
                        "time": d.time,
                        "action": d.action,
                        "promoted": d.promoted,
                        "reason": d.reason,
                    }
                    for d in reversed(log_rows)
                ],
            }
        )
    return out


class RegistryWatcher:
    """The registry under ``root`` as :func:`traffic_view` sees it, read again whenever
    it changes (checked every ``poll_s`` in a daemon thread); ``on_change`` gets each new
    view. A registry that does not exist yet is looked for again at every poll."""

    def __init__(
        self,
        root: Path,
        on_change: Callable[[list[dict[str, Any]]], None] | None = None,
        poll_s: float = POLL_S,
    ) -> None:
        self.root = Path(root)
        self.on_change = on_change
        self.poll_s = poll_s
        self.view: list[dict[str, Any]] = []
        self._registry: ModelRegistry | None = None
        self._data_version: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="fedlearn-ui-registry", daemon=True)
        self._thread.start()

    def refresh(self) -> bool:
        """Read the registry again if it changed since the last read; True if it did."""
        with self._lock:
            if self._registry is None:
                if not (self.root / "registry.db").is_file():
                    return False
                from fedlearn.registry.model_registry import ModelRegistry

                self._registry = ModelRegistry(self.root)
            version = self._registry.data_version()
            if version == self._data_version:
                return False
            self._data_version = version
            self.view = traffic_view(self._registry)
            view = self.view
        if self.on_change is not None:
            self.on_change(view)
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
            except Exception:  # a registry being rewritten: try again at the next poll
                log.exception("reading the registry %s for the live page failed", self.root)

    def close(self) -> None:
        """Stop watching and close the registry."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        with self._lock:
            if self._registry is not None:
                self._registry.close()
                self._registry = None
