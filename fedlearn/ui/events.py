"""The run's event bus: what a live page (or any other watcher) sees of a run, in process.

The run emits through the typed methods below (the coordinator's :class:`Observer`
events, site joins and leaves, ε after each round, published versions, the run's
status). With no subscriber every method returns at once: no payload is built, nothing
is serialized. A subscriber is called in the emitting thread with an :class:`Event`
whose ``data`` holds plain JSON values; it must return quickly (the live page hands the
event to its own event loop) and what it raises is logged, never passed to the run.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord

log = logging.getLogger("fedlearn.ui")


@dataclass(frozen=True)
class Event:
    """One thing that happened in the run: ``seq`` numbers a bus's events from 1."""

    seq: int
    at: float
    """Wall-clock time (``time.time()``)."""
    kind: str
    data: dict[str, Any]


Subscriber = Callable[[Event], None]


class EventBus:
    """Fans the run's events out to subscribers; free when there are none."""

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._round = 0

    @property
    def active(self) -> bool:
        """Whether anyone listens."""
        return bool(self._subscribers)

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every event from now on; returns what unsubscribes it."""
        with self._lock:
            self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def relay(self, kind: str, data: dict[str, Any], at: float) -> None:
        """Emit an event that happened at ``at`` on another bus (the run's, seen from
        the page's process: :mod:`fedlearn.ui.child`)."""
        if self._subscribers:
            self._emit(kind, data, at)

    def _emit(self, kind: str, data: dict[str, Any], at: float | None = None) -> None:
        with self._lock:  # one order of sequence numbers for every subscriber
            event = Event(next(self._seq), time.time() if at is None else at, kind, data)
            subscribers = self._subscribers
            for subscriber in subscribers:
                try:
                    subscriber(event)
                except Exception:  # a watcher's bug must not stop the run
                    log.exception("an event subscriber failed on %s", kind)

    # ------------------------------------------------------------------ the run

    def run_started(self, run_id: str, rounds: int, start_round: int) -> None:
        """The run (or this process's part of it) begins at ``start_round``."""
        if self._subscribers:
            self._emit("run", {"run_id": run_id, "rounds": rounds, "start_round": start_round})

    def status(self, status: str, round: int, detail: str | None = None) -> None:
        """The run ended (finished, failed, interrupted) after committed round ``round``."""
        if self._subscribers:
            self._emit("status", {"status": status, "round": round, "detail": detail})

    # ------------------------------------------------------------------ Observer

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        """A stage of ``num_tasks`` tasks begins (the first of a round starts the round)."""
        if not self._subscribers:
            self._round = round
            return
        if round != self._round:
            self._round = round
            self._emit("round_started", {"round": round})
        self._emit("stage", {"round": round, "stage": stage.value, "tasks": num_tasks})

    def reply_received(self, record: ClientRecord) -> None:
        """One client's result, or its failure and why."""
        if self._subscribers:
            self._emit("client", client_json(record))

    def round_finished(self, record: RoundRecord) -> None:
        """A round ended (committed before this is emitted)."""
        if self._subscribers:
            self._emit("round_ended", round_json(record))

    # ------------------------------------------------------------------ sites

    def site_connected(self, client_id: int, site: str) -> None:
        """A site's stream was admitted."""
        if self._subscribers:
            self._emit("site", {"client": client_id, "site": site, "connected": True})

    def site_disconnected(self, client_id: int, site: str, reason: str | None = None) -> None:
        """A site's stream ended."""
        if self._subscribers:
            data = {"client": client_id, "site": site, "connected": False, "reason": reason}
            self._emit("site", data)

    # ------------------------------------------------------------------ after a round

    def privacy(self, round: int, epsilon: float, delta: float) -> None:
        """The run's ε at ``delta`` after ``round``."""
        if self._subscribers:
            self._emit("privacy", {"round": round, "epsilon": epsilon, "delta": delta})

    def published(self, round: int, model: str, version: int, promoted: bool, reason: str) -> None:
        """A version was published, and what the gate decided."""
        if self._subscribers:
            data = {
                "round": round,
                "model": model,
                "version": version,
                "promoted": promoted,
                "reason": reason,
            }
            self._emit("published", data)

    def traffic(self, models: list[dict[str, Any]]) -> None:
        """The registry changed: what ``fedlearn serve`` routes now (:mod:`fedlearn.ui.traffic`)."""
        if self._subscribers:
            self._emit("traffic", {"models": models})


def client_json(record: ClientRecord) -> dict[str, Any]:
    """One client row as plain JSON values."""
    return {
        "round": record.round,
        "stage": record.stage.value,
        "client": record.client_id,
        "ok": record.ok,
        "num_examples": record.num_examples,
        "loss": finite(record.loss),
        "metrics": plain(record.metrics),
        "error": record.error,
    }


def round_json(record: RoundRecord) -> dict[str, Any]:
    """One round row as plain JSON values."""
    return {
        "round": record.round,
        "ok": record.ok,
        "error": record.error,
        "duration_s": record.duration_s,
        "train_selected": record.train_selected,
        "train_ok": record.train_ok,
        "eval_selected": record.eval_selected,
        "eval_ok": record.eval_ok,
        "train_metrics": plain(record.train_metrics),
        "eval_metrics": plain(record.eval_metrics),
    }


def finite(value: object) -> Any:
    """``value``, with NaN and infinities as None (JSON has no word for them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def plain(values: Mapping[str, object]) -> dict[str, Any]:
    """A metrics mapping with non-finite floats as None."""
    return {k: finite(v) for k, v in values.items()}
