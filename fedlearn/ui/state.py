"""The live page's view of a run in progress: what the run store cannot say yet (which
sites are connected, the round and stage under way, results of a round not committed
yet) and the recent events, replayed to a page that connects after them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord
from fedlearn.ui.events import Event, EventBus
from fedlearn.ui.views import failure_json, round_view, store_view

BACKLOG = 4096
"""Events kept for pages that connect (or reconnect) after them."""


class Listener:
    """One page's event stream: events wait in a deque, and the page's event loop is
    woken once for however many arrive before it looks (not once per event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[Event | None] = deque()
        """Events not sent yet; None ends the stream."""
        self.ready = asyncio.Event()  # set in the loop's thread only
        self._woken = False

    def put(self, event: Event | None) -> None:
        """Queue ``event`` (any thread; the caller holds the state's lock)."""
        self.pending.append(event)
        if not self._woken and not self.loop.is_closed():
            self._woken = True
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._woken = False
        self.ready.set()

    def take(self) -> list[Event | None]:
        """Everything queued so far (in the loop's thread)."""
        self.ready.clear()
        out: list[Event | None] = []
        while self.pending:
            out.append(self.pending.popleft())
        return out


class LiveState:
    """Follows ``bus`` (None: a finished run, shown from its store alone) and feeds the
    pages listening for events; :meth:`snapshot` is the state so far."""

    def __init__(
        self,
        db: Path,
        run_id: str | None,
        bus: EventBus | None = None,
        clients: Sequence[int] = (),
    ) -> None:
        self.db = db
        self.run_id = run_id
        self.live = bus is not None
        self._lock = threading.Lock()
        self._backlog: deque[Event] = deque(maxlen=BACKLOG)
        self._seq = 0
        self._listeners: list[Listener] = []
        self._closed = False
        self.run: dict[str, Any] = {"started_at": time.time()}
        self.stages: list[dict[str, Any]] = []
        self.round = 0
        self.sites: dict[int, dict[str, Any]] = {c: {"client": c} for c in clients}
        self.pending: dict[tuple[int, str, int], ClientRecord] = {}
        self.epsilon: dict[int, tuple[float, float]] = {}
        self.traffic: Callable[[], list[dict[str, Any]]] = list
        """The registry's models and their traffic (set by the page's server)."""
        self._unsubscribe = None if bus is None else bus.subscribe(self.deliver)

    # ------------------------------------------------------------------ events in

    def deliver(self, event: Event) -> None:
        """Take one event from the bus (in the run's thread): update, keep, pass on."""
        with self._lock:
            event = self._apply(event)
            self._seq = event.seq
            self._backlog.append(event)
            for listener in self._listeners:
                listener.put(event)

    def _apply(self, event: Event) -> Event:
        data, kind = event.data, event.kind
        if kind == "run":
            self.run.update(data, status="running", started_at=event.at)
        elif kind == "status":
            self.run["status"] = data["status"]
        elif kind == "round_started":
            self.round, self.stages = data["round"], []
        elif kind == "stage":
            self.stages.append(
                {"stage": data["stage"], "tasks": data["tasks"], "ok": 0, "failed": 0}
            )
        elif kind == "client":
            record = _record(data)
            self.pending[(record.round, record.stage.value, record.client_id)] = record
            site = self.sites.setdefault(record.client_id, {"client": record.client_id})
            site.update(stage=data["stage"], round=data["round"], ok=data["ok"])
            if data["ok"]:  # a failure may be the coordinator's verdict, not a reply
                site["last_seen"] = event.at
            stage = _stage_of(self.stages, data["stage"])
            if stage is not None:
                stage["ok" if data["ok"] else "failed"] += 1
        elif kind == "site":
            site = self.sites.setdefault(data["client"], {"client": data["client"]})
            site.update(site=data["site"], connected=data["connected"], since=event.at)
            if data["connected"]:
                site["last_seen"] = event.at
            site["reason"] = data.get("reason")
        elif kind == "privacy":
            self.epsilon[data["round"]] = (data["epsilon"], data["delta"])
        elif kind == "round_ended":
            rnd = data["round"]
            evaluations = [r for r in self.pending.values() if r.round == rnd]
            eps = self.epsilon.get(rnd)
            view = round_view(data, evaluations, None if eps is None else eps[0])
            # the store holds this round's rows now
            self.pending = {k: r for k, r in self.pending.items() if r.round > rnd}
            return Event(event.seq, event.at, kind, view)
        return event

    # ------------------------------------------------------------------ pages

    def listen(self, loop: asyncio.AbstractEventLoop, after: int) -> tuple[Listener, list[Event]]:
        """A new listener (its events reach it through ``loop``), and the kept events
        after ``after`` (those the page missed). A closed state's listener ends at once."""
        listener = Listener(loop)
        with self._lock:
            missed = [e for e in self._backlog if e.seq > after]
            if self._closed:
                listener.put(None)
            else:
                self._listeners.append(listener)
        return listener, missed

    def unlisten(self, listener: Listener) -> None:
        """Stop sending to ``listener``."""
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not listener]

    @property
    def listeners(self) -> int:
        """How many pages listen now."""
        return len(self._listeners)

    def close(self) -> None:
        """Stop following the bus and end every page's event stream."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        with self._lock:
            self._closed = True
            for listener in self._listeners:
                listener.put(None)
            self._listeners = []

    # ------------------------------------------------------------------ the state so far

    def snapshot(self) -> dict[str, Any]:
        """The run so far: its store's rounds, failures, ε and versions, with what only
        this process knows (sites, the round under way); ``seq`` is the last event it
        includes (a page then asks for the events after it)."""
        with self._lock:
            seq = self._seq
            run = dict(self.run)
            stages = [dict(s) for s in self.stages]
            sites = {c: dict(s) for c, s in self.sites.items()}
            pending = list(self.pending.values())
            epsilon = dict(self.epsilon)
            current = self.round
        view = store_view(self.db, self.run_id)
        stored = view["run"]
        if not self.live:
            run = {"started_at": stored.get("created")}
        run = {**stored, **{k: v for k, v in run.items() if v is not None}}
        if not self.live:
            run["status"] = stored.get("status")
        run.setdefault("status", "starting" if self.live else "unknown")
        clients = {c["client"]: c for c in view["clients"]}
        for cid, site in sites.items():
            clients[cid] = {**clients.get(cid, {}), **site}
        keys = {(f["round"], f["stage"], f["client"]) for f in view["failures"]}
        failures = view["failures"] + [
            failure_json(r)
            for r in pending
            if not r.ok and (r.round, r.stage.value, r.client_id) not in keys
        ]
        last_eps = max(epsilon) if epsilon else None
        eps_rows = [r["epsilon"] for r in view["rounds"] if r["epsilon"] is not None]
        return {
            "seq": seq,
            "live": self.live,
            "now": time.time(),
            "run": run,
            "round": current,
            "stages": stages,
            "rounds": view["rounds"],
            "failures": failures,
            "publications": view["publications"],
            "clients": [clients[c] for c in sorted(clients)],
            "epsilon": epsilon[last_eps][0] if last_eps else (eps_rows[-1] if eps_rows else None),
            "delta": epsilon[last_eps][1] if last_eps else view["delta"],
            "traffic": self.traffic(),
        }


def _stage_of(stages: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The stage of the round a client row counts for: its own, or for a training row
    while the round is secure, the secure setup stage (where training happens; the later
    secure stages record only their dropouts)."""
    own = [s for s in stages if s["stage"] == name]
    if own:
        return own[-1]
    setup = [s for s in stages if s["stage"] == Stage.SECAGG_SETUP.value]
    return setup[0] if setup and name == Stage.TRAIN.value else None


def _record(data: dict[str, Any]) -> ClientRecord:
    return ClientRecord(
        data["round"],
        Stage(data["stage"]),
        data["client"],
        data["ok"],
        data["num_examples"],
        data["loss"],
        data["metrics"],
        data["error"],
    )
