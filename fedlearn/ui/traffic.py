"""What ``fedlearn serve`` does with the run's registry, for the live page's traffic panel.

:func:`traffic_view` reads a registry (:mod:`fedlearn.registry.model_registry`): each
model's production version and aliases, the traffic policy in force (a split's shares, a
shadow's candidate, a canary's step and share; :mod:`fedlearn.registry.traffic`) and the
latest decisions of its log (promote, rollback, route-set, canary-step, canary-promote,
canary-rollback, ...). :class:`RegistryWatcher` keeps that view current from a thread of
the page's process: it asks SQLite's ``data_version`` (which moves when any other
connection commits) every ``poll_s`` and reads the registry again only then. An endpoint
that serves the same registry follows the same rows; given that endpoint's address (on
loopback, plain HTTP), the watcher also reads its ``/metrics`` at each poll
(:func:`endpoint_counts`: requests per answering version, answered and failed), so the
browser never talks to the endpoint itself.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from fedlearn.config.deployment import is_loopback
from fedlearn.errors import ConfigError
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


def check_endpoint(url: str) -> str:
    """``url`` without a trailing slash, if it is a plain-HTTP address on loopback
    (ConfigError otherwise: the page's process reads it, and only there)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not is_loopback(parts.hostname):
        raise ConfigError(
            f"the live page's endpoint {url!r}: give http://127.0.0.1:PORT (loopback only)"
        )
    return url.rstrip("/")


def endpoint_counts(text: str) -> dict[str, dict[str, Any]]:
    """From an endpoint's ``/metrics`` text, per model: requests by answering version
    under a traffic policy (``versions``) and answered requests by outcome (``ok``,
    ``error``, over both protocols)."""
    out: dict[str, dict[str, Any]] = {}

    def model(name: str) -> dict[str, Any]:
        return out.setdefault(name, {"versions": {}, "ok": 0, "error": 0})

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "fedlearn_serving_traffic_requests_total":
                versions = model(labels["model"])["versions"]
                key = labels["version"]
                versions[key] = versions.get(key, 0) + int(sample.value)
            elif sample.name == "fedlearn_serving_requests_total":
                counts = model(labels["model"])
                outcome = "ok" if labels.get("outcome") == "ok" else "error"
                counts[outcome] += int(sample.value)
    return out


class RegistryWatcher:
    """The registry under ``root`` as :func:`traffic_view` sees it, read again whenever
    it changes (checked every ``poll_s`` in a daemon thread); ``on_change`` gets each new
    view. A registry that does not exist yet is looked for again at every poll. With
    ``endpoint`` (``http://127.0.0.1:PORT``) each model also carries ``served``: that
    endpoint's counts (:func:`endpoint_counts`; None while it does not answer)."""

    def __init__(
        self,
        root: Path,
        on_change: Callable[[list[dict[str, Any]]], None] | None = None,
        poll_s: float = POLL_S,
        endpoint: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.on_change = on_change
        self.poll_s = poll_s
        self.endpoint = None if endpoint is None else check_endpoint(endpoint)
        self.view: list[dict[str, Any]] = []
        self._models: list[dict[str, Any]] = []
        self._counts: dict[str, dict[str, Any]] | None = None
        self._registry: ModelRegistry | None = None
        self._data_version: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="fedlearn-ui-registry", daemon=True)
        self._thread.start()

    def refresh(self) -> bool:
        """Read the registry again if it changed since the last read (and the endpoint's
        counts); True if the view changed."""
        counts = self._read_endpoint()
        with self._lock:
            changed = counts != self._counts
            self._counts = counts
            if self._registry is None and (self.root / "registry.db").is_file():
                from fedlearn.registry.model_registry import ModelRegistry

                self._registry = ModelRegistry(self.root)
            if self._registry is not None:
                version = self._registry.data_version()
                if version != self._data_version:
                    self._data_version = version
                    self._models = traffic_view(self._registry)
                    changed = True
            if not changed:
                return False
            if self.endpoint is not None:
                self.view = [
                    {**m, "served": None if counts is None else counts.get(m["model"])}
                    for m in self._models
                ]
            else:
                self.view = self._models
            view = self.view
        if self.on_change is not None:
            self.on_change(view)
        return True

    def _read_endpoint(self) -> dict[str, dict[str, Any]] | None:
        if self.endpoint is None:
            return None
        try:
            with urllib.request.urlopen(self.endpoint + "/metrics", timeout=1.0) as answer:
                return endpoint_counts(answer.read().decode())
        except (OSError, ValueError) as exc:
            log.debug("the endpoint's /metrics at %s: %s", self.endpoint, exc)
            return None

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
