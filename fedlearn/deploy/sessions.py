"""Connected sites: one Session per live stream, and the registry that tracks them.

Plain threading objects with no gRPC in them: the servicer feeds them, the transport
reads them.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedlearn.engine.messages import Reply, Task
from fedlearn.wire.chunks import Digest

UNLIMITED = 1 << 62
"""``ClientRegistry.reply_limit`` when no transport sets a tighter bound."""


@dataclass(frozen=True)
class Outgoing:
    """A task to push to a client: its header fields and the shared payload."""

    task_id: str
    task: Task
    payload: tuple[bytes | memoryview, ...]
    """The encoded broadcast arrays as parts (views of the global model, not a copy)."""
    digest: Digest | None
    """The SHA-256 of ``payload``, computed in the background (shared by a stage's tasks);
    the task's protocol message, if any, follows the arrays and is hashed per task."""

    @property
    def size(self) -> int:
        """Payload bytes: the arrays, then the task's protocol message."""
        return sum(len(p) for p in self.payload) + len(self.task.payload)


@dataclass(frozen=True)
class Cancelled:
    """Tell a client to drop a task (``task_id == ""``: the run is over)."""

    task_id: str
    reason: str


class Upload(Protocol):
    """A reply being received (the servicer's); it gives back what it holds when dropped."""

    def release(self) -> None: ...


@dataclass
class Session:
    """One connected site.

    A session holds at most one upload in progress (the reply the site is sending now);
    whoever stops waiting for that reply may drop it with :meth:`abandon_upload`, which
    releases its buffer even if the site never sends another byte.
    """

    client_id: int
    site: str
    session_id: str = field(default_factory=lambda: secrets.token_hex(8))
    outbox: queue.Queue[Outgoing | Cancelled | None] = field(default_factory=queue.Queue)
    connected_at: float = field(default_factory=time.monotonic)
    closed: bool = field(default=False, init=False, compare=False)
    revoked: str | None = field(default=None, init=False, compare=False)
    """Why the coordinator ended this session because its site may no longer take part
    (revoked, removed from the allowlist): its stream ends with PERMISSION_DENIED and
    this reason, and its tasks in flight fail with it."""
    _upload: tuple[str, Upload] | None = field(default=None, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def close(self) -> None:
        """End the stream's response loop."""
        self.closed = True
        self.outbox.put(None)

    def begin_upload(self, task_id: str, upload: Upload) -> Upload | None:
        """Make ``upload`` (a reply to ``task_id``) the one in progress; returns the
        upload it replaces, if that one never finished."""
        with self._lock:
            previous = self._upload
            self._upload = (task_id, upload)
        return None if previous is None else previous[1]

    def drop_upload(self) -> Upload | None:
        """Clear the upload in progress and return it (None if there was none)."""
        with self._lock:
            previous, self._upload = self._upload, None
        return None if previous is None else previous[1]

    def current_upload(self) -> Upload | None:
        """The upload in progress, if any."""
        with self._lock:
            return None if self._upload is None else self._upload[1]

    def end_upload(self, upload: Upload) -> bool:
        """Clear ``upload`` if it is still the one in progress (False if it was dropped)."""
        with self._lock:
            if self._upload is None or self._upload[1] is not upload:
                return False
            self._upload = None
            return True

    def abandon_upload(self, task_id: str) -> bool:
        """Drop and release the upload in progress if it answers ``task_id``; True if one
        was dropped."""
        with self._lock:
            if self._upload is None or self._upload[0] != task_id:
                return False
            upload = self._upload[1]
            self._upload = None
        upload.release()
        return True


ReplyHandler = Callable[[Session, str, Reply], None]
ReplyLimit = Callable[[Session, str], int | None]


class ClientRegistry:
    """Thread-safe map of client id -> live Session, with a condition to wait on."""

    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}
        self._cond = threading.Condition()
        self.on_reply: ReplyHandler | None = None
        self.on_disconnect: Callable[[Session], None] | None = None
        self.on_reply_limit: ReplyLimit | None = None
        self.on_join: Callable[[Session], None] | None = None
        """Told of each admitted session (a live page's site table)."""
        self.on_leave: Callable[[Session, str], None] | None = None
        """Told of each session that ended, and why."""

    def connect(self, client_id: int, site: str) -> Session:
        """Register a new session; a reconnecting site replaces its old one."""
        session = Session(client_id, site)
        with self._cond:
            old = self._sessions.get(client_id)
            self._sessions[client_id] = session
            self._cond.notify_all()
        if old is not None:
            old.close()
            if self.on_disconnect is not None:
                self.on_disconnect(old)
        if self.on_join is not None:
            self.on_join(session)
        return session

    def disconnect(self, session: Session) -> None:
        """Forget ``session`` if it is still the live one for its client."""
        with self._cond:
            if self._sessions.get(session.client_id) is not session:
                return
            del self._sessions[session.client_id]
            self._cond.notify_all()
        session.close()
        if self.on_disconnect is not None:
            self.on_disconnect(session)
        if self.on_leave is not None:
            self.on_leave(session, session.revoked or "stream ended")

    def revoke(self, client_id: int, reason: str) -> Session | None:
        """End the live session of ``client_id`` because its site may no longer take part;
        returns it (None if the client was not connected)."""
        with self._cond:
            session = self._sessions.get(client_id)
            if session is not None:
                session.revoked = reason
        if session is not None:
            self.disconnect(session)
        return session

    def get(self, client_id: int) -> Session | None:
        """The live session of ``client_id``."""
        with self._cond:
            return self._sessions.get(client_id)

    def available(self) -> list[int]:
        """Ids of the connected clients."""
        with self._cond:
            return sorted(self._sessions)

    def wait_for(self, count: int, timeout: float | None) -> bool:
        """Block until at least ``count`` clients are connected; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._sessions) >= count, timeout)

    def reply_limit(self, session: Session, task_id: str) -> int | None:
        """The most payload bytes a reply to ``task_id`` on ``session`` may carry, or None
        when no such reply is awaited (never issued, already answered, or past its deadline):
        its payload is then discarded without being buffered."""
        if self.on_reply_limit is None:
            return UNLIMITED
        return self.on_reply_limit(session, task_id)

    def deliver(self, session: Session, task_id: str, reply: Reply) -> None:
        """A complete reply arrived on ``session``."""
        if self.on_reply is not None:
            self.on_reply(session, task_id, reply)

    def close_all(self, reason: str) -> None:
        """Say goodbye to every site and end their streams."""
        with self._cond:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.outbox.put(Cancelled("", reason))
            s.close()
            if self.on_leave is not None:
                self.on_leave(s, reason)
