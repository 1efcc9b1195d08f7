"""The gRPC transport: pushes a stage's tasks to connected sites and yields their replies.

The global arrays are encoded once per stage and shared by every session's outbox; each
stream expands them into chunks lazily, so the coordinator never holds N copies. Replies
are yielded as they complete; a stage ends when every task has answered or its deadline
passes (stragglers then count as failures and get a Cancel).
"""

from __future__ import annotations

import hashlib
import queue
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedlearn.deploy.sessions import Cancelled, ClientRegistry, Outgoing, Session
from fedlearn.messages import Reply, Task
from fedlearn.records import Arrays, encode_arrays


@dataclass
class _Pending:
    task: Task
    session: Session


class GrpcTransport:
    """A Transport over the sites connected to a :class:`ClientRegistry`."""

    def __init__(self, registry: ClientRegistry, stage_timeout_s: float = 600.0) -> None:
        self.registry = registry
        self.stage_timeout_s = stage_timeout_s
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._inbox: queue.Queue[Reply] = queue.Queue()
        registry.on_reply = self._on_reply
        registry.on_disconnect = self._on_disconnect
        self.late_replies = 0

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Send every task now; yield replies until all arrive or the deadline passes."""
        payload = memoryview(encode_arrays(broadcast))
        digest = hashlib.sha256(payload).digest()
        inbox: queue.Queue[Reply] = queue.Queue()
        with self._lock:
            self._pending.clear()
            self._inbox = inbox
        immediate: list[Reply] = []
        for task in tasks:
            session = self.registry.get(task.client_id)
            if session is None:
                immediate.append(_fail(task, "client is not connected"))
                continue
            task_id = f"r{task.round}-{task.stage.value}-c{task.client_id}-{secrets.token_hex(4)}"
            with self._lock:
                self._pending[task_id] = _Pending(task, session)
            session.outbox.put(Outgoing(task_id, task, payload, digest))
        yield from immediate
        deadline = time.monotonic() + self.stage_timeout_s
        try:
            while self._outstanding():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    yield inbox.get(timeout=left)
                except queue.Empty:
                    break
            while not inbox.empty():
                yield inbox.get_nowait()
        finally:
            with self._lock:
                stragglers = list(self._pending.items())
                self._pending.clear()
            for task_id, pending in stragglers:
                pending.session.outbox.put(Cancelled(task_id, "stage deadline passed"))

    def _outstanding(self) -> bool:
        with self._lock:
            return bool(self._pending)

    def _on_reply(self, session: Session, task_id: str, reply: Reply) -> None:
        with self._lock:
            pending = self._pending.get(task_id)
            if pending is None or pending.session is not session:
                self.late_replies += 1
                return
            del self._pending[task_id]
            task = pending.task
            inbox = self._inbox
        if not reply.ok:
            reply = _fail(task, str(reply.error))
        elif (reply.stage, reply.round, reply.client_id) != (
            task.stage,
            task.round,
            task.client_id,
        ):
            reply = _fail(task, "reply does not match its task (stage, round or client)")
        inbox.put(reply)

    def _on_disconnect(self, session: Session) -> None:
        with self._lock:
            lost = [(k, p) for k, p in self._pending.items() if p.session is session]
            for task_id, _ in lost:
                del self._pending[task_id]
            inbox = self._inbox
        for _, pending in lost:
            inbox.put(_fail(pending.task, "client disconnected during the task"))

    def close(self) -> None:
        """Nothing to release: sessions belong to the registry."""


def _fail(task: Task, reason: str) -> Reply:
    return Reply(task.stage, task.round, task.client_id, error=reason)
