"""The gRPC transport: pushes a stage's tasks to connected sites and yields their replies.

The global arrays are encoded once per stage and shared by every session's outbox; each
stream expands them into chunks lazily, so the coordinator never holds N copies. Replies
are yielded as they complete; a stage ends when every task has answered or its deadline
passes (stragglers then count as failures and get a Cancel).

Each task settles exactly once, under the transport's lock: by its reply, by its session
going away, or by the deadline. A reply for a task that has already settled (a late reply,
a duplicate, a task id that was never issued, another site's task) is counted in
``late_replies`` and dropped; the servicer asks :meth:`GrpcTransport.reply_limit` before
buffering an upload, so such a reply's payload is never even held in memory.

Every task's reply has an expected size (:func:`reply_limit_for`): a training reply is the
model's size plus :data:`REPLY_SLACK`, an evaluation carries no payload beyond
:data:`EVALUATE_REPLY_LIMIT`, and a secure-aggregation reply its protocol size (set on the
task by :mod:`fedlearn.secagg.stages`). A reply declaring more is refused before anything
is allocated for it.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedlearn.deploy.sessions import Cancelled, ClientRegistry, Outgoing, Session
from fedlearn.drift.codec import reply_bytes
from fedlearn.drift.stats import SummarySpec
from fedlearn.engine.messages import Reply, Stage, Task
from fedlearn.engine.records import Arrays, encode_arrays_parts
from fedlearn.wire.chunks import Digest

REPLY_SLACK = 64 << 10
"""Bytes a training reply may exceed the broadcast by. A valid training reply has the
global model's names, shapes and dtypes, so its payload is exactly the broadcast's size;
the slack only keeps a refusal for what cannot be valid."""

EVALUATE_REPLY_LIMIT = 64 << 10
"""Largest evaluation reply payload: its loss and metrics travel in the header, so a valid
one has no payload at all."""


def reply_limit_for(task: Task, broadcast_size: int) -> int:
    """The largest reply payload accepted for ``task`` when its stage's broadcast is
    ``broadcast_size`` bytes: the task's own ``reply_limit`` when its protocol set one
    (secure aggregation sets it on every task), EVALUATE_REPLY_LIMIT for an evaluation,
    and otherwise (training) the broadcast's size plus REPLY_SLACK, plus the size of the
    data summary the task asks for (drift monitoring, when its shape is fixed). Anything
    larger is refused before a buffer is allocated; no stage is left without a limit."""
    if task.reply_limit is not None:
        return task.reply_limit
    if task.stage is Stage.EVALUATE:
        return EVALUATE_REPLY_LIMIT
    spec = SummarySpec.from_config(task.config)
    return broadcast_size + REPLY_SLACK + (0 if spec is None else reply_bytes(spec))


ASYNC_LANE = 0
"""The stage number of tasks sent one at a time (:meth:`GrpcTransport.submit`): no stage
settles or cancels them; each has its own deadline."""


@dataclass
class _Pending:
    task: Task
    session: Session
    reply_limit: int
    stage: int
    inbox: queue.Queue[Reply]
    deadline: float = 0.0


@dataclass(frozen=True)
class Broadcast:
    """Arrays encoded once for the wire (views of the model, not a copy), their digest and
    size: what every task sent from them shares."""

    payload: tuple[bytes | memoryview, ...]
    digest: Digest | None
    size: int


class GrpcTransport:
    """A Transport over the sites connected to a :class:`ClientRegistry`."""

    def __init__(
        self, registry: ClientRegistry, stage_timeout_s: float = 600.0, digest: bool = True
    ) -> None:
        self.registry = registry
        self.digest = digest
        """Attach the payload's SHA-256 to each task (off over TLS: records are authenticated)."""
        self.stage_timeout_s = stage_timeout_s
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._async_inbox: queue.Queue[Reply] = queue.Queue()
        self._stage = 0
        registry.on_reply = self._on_reply
        registry.on_disconnect = self._on_disconnect
        registry.on_reply_limit = self.reply_limit
        self.late_replies = 0

    def encode(self, arrays: Arrays) -> Broadcast:
        """``arrays`` ready to send with any number of tasks."""
        payload = tuple(encode_arrays_parts(arrays))  # views: one copy of the model at most
        # Hashed once on another thread while the first chunks are already sent; the
        # digest travels on each payload's last chunk.
        digest = Digest(payload) if self.digest else None
        return Broadcast(payload, digest, sum(len(p) for p in payload))

    def submit(self, broadcast: Broadcast, task: Task) -> None:
        """Send one task on its own (asynchronous rounds); its reply, or its failure (the
        site gone, no reply within ``stage_timeout_s``), comes from :meth:`next_reply`."""
        session = self.registry.get(task.client_id)
        if session is None:
            self._async_inbox.put(_fail(task, "client is not connected"))
            return
        task_id = f"r{task.round}-{task.stage.value}-c{task.client_id}-{secrets.token_hex(4)}"
        pending = _Pending(
            task,
            session,
            reply_limit_for(task, broadcast.size),
            ASYNC_LANE,
            self._async_inbox,
            time.monotonic() + self.stage_timeout_s,
        )
        with self._lock:
            self._pending[task_id] = pending
        if self.registry.get(task.client_id) is not session:
            self._settle(task_id, "client disconnected before the task was sent")
            return
        session.outbox.put(Outgoing(task_id, task, broadcast.payload, broadcast.digest))

    def next_reply(self, timeout: float) -> Reply | None:
        """The next reply (or failure) to a :meth:`submit` task, waiting up to ``timeout``
        seconds; None if none came. A task past its deadline fails here (and is cancelled
        at its site)."""
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            with self._lock:
                late = [
                    (k, p)
                    for k, p in self._pending.items()
                    if p.stage == ASYNC_LANE and p.deadline <= now
                ]
                for task_id, _ in late:
                    del self._pending[task_id]
                upcoming = min(
                    (p.deadline for p in self._pending.values() if p.stage == ASYNC_LANE),
                    default=end,
                )
            for task_id, pending in late:
                pending.session.abandon_upload(task_id)
                if not pending.session.closed:
                    pending.session.outbox.put(Cancelled(task_id, "task deadline passed"))
                self._async_inbox.put(
                    _fail(pending.task, f"no reply within {self.stage_timeout_s:g} s")
                )
            try:
                return self._async_inbox.get(timeout=max(0.0, min(end, upcoming) - now))
            except queue.Empty:
                if time.monotonic() >= end:
                    return None

    def cancel_submitted(self, reason: str) -> None:
        """Cancel every :meth:`submit` task still awaited (the run ended)."""
        self._cancel_pending(reason, ASYNC_LANE)

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Send every task now; yield replies until all arrive or the deadline passes."""
        encoded = self.encode(broadcast)
        payload, digest, broadcast_size = encoded.payload, encoded.digest, encoded.size
        inbox: queue.Queue[Reply] = queue.Queue()
        self._cancel_pending("stage abandoned")  # left over by an unfinished earlier stage
        with self._lock:
            self._stage += 1
            stage = self._stage
        immediate: list[Reply] = []
        sent = 0
        try:
            for task in tasks:
                session = self.registry.get(task.client_id)
                if session is None:
                    immediate.append(_fail(task, "client is not connected"))
                    continue
                task_id = (
                    f"r{task.round}-{task.stage.value}-c{task.client_id}-{secrets.token_hex(4)}"
                )
                task_limit = reply_limit_for(task, broadcast_size)
                with self._lock:
                    self._pending[task_id] = _Pending(task, session, task_limit, stage, inbox)
                sent += 1
                if self.registry.get(task.client_id) is not session:
                    # The session went away between get() and now; its on_disconnect may
                    # have run before the task was pending, so settle the task here.
                    self._settle(task_id, "client disconnected before the task was sent")
                    continue
                session.outbox.put(Outgoing(task_id, task, payload, digest))
            yield from immediate
            deadline = time.monotonic() + self.stage_timeout_s
            received = 0
            while received < sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    reply = inbox.get(timeout=left)
                except queue.Empty:
                    break
                received += 1
                yield reply
            stragglers = self._cancel_pending("stage deadline passed", stage)
            while True:  # replies that settled just before the deadline
                try:
                    yield inbox.get_nowait()
                except queue.Empty:
                    break
            for pending in stragglers:
                yield _fail(
                    pending.task,
                    f"no reply within the stage deadline of {self.stage_timeout_s:g} s",
                )
        finally:
            self._cancel_pending("stage abandoned", stage)

    def reply_limit(self, session: Session, task_id: str) -> int | None:
        """The payload limit for a reply to ``task_id`` on ``session``; None (and counted as
        a late reply) when that task is not awaited from that session."""
        with self._lock:
            pending = self._pending.get(task_id)
            if pending is None or pending.session is not session:
                self.late_replies += 1
                return None
            return pending.reply_limit

    def _cancel_pending(self, reason: str, stage: int | None = None) -> list[_Pending]:
        """Settle the tasks still pending (of ``stage``, or of every stage but the
        asynchronous lane) as stragglers: tell their sites and drop their uploads."""
        with self._lock:
            stragglers = [
                (k, p)
                for k, p in self._pending.items()
                if p.stage == stage or (stage is None and p.stage != ASYNC_LANE)
            ]
            for task_id, _ in stragglers:
                del self._pending[task_id]
        for task_id, pending in stragglers:
            pending.session.abandon_upload(task_id)
            if not pending.session.closed:
                pending.session.outbox.put(Cancelled(task_id, reason))
        return [pending for _, pending in stragglers]

    def _settle(self, task_id: str, error: str) -> None:
        with self._lock:
            pending = self._pending.pop(task_id, None)
            if pending is not None:
                pending.inbox.put(_fail(pending.task, error))

    def _on_reply(self, session: Session, task_id: str, reply: Reply) -> None:
        with self._lock:
            pending = self._pending.get(task_id)
            if pending is None or pending.session is not session:
                self.late_replies += 1
                return
            del self._pending[task_id]
            task = pending.task
            if not reply.ok:
                reply = _fail(task, str(reply.error))
            elif (reply.stage, reply.round, reply.client_id) != (
                task.stage,
                task.round,
                task.client_id,
            ):
                reply = _fail(
                    task,
                    f"reply is for stage {reply.stage.value!r} of round {reply.round}, but the "
                    f"task is stage {task.stage.value!r} of round {task.round}",
                )
                if not session.closed:  # the site hears why, as for any refused upload
                    session.outbox.put(Cancelled(task_id, f"upload refused: {reply.error}"))
            # Put under the lock: a task leaves _pending and enters the inbox atomically,
            # so the stage loop never sees it in neither.
            pending.inbox.put(reply)

    def _on_disconnect(self, session: Session) -> None:
        reason = session.revoked or f"site {session.site!r} disconnected during the task"
        with self._lock:
            lost = [k for k, p in self._pending.items() if p.session is session]
            for task_id in lost:
                pending = self._pending.pop(task_id)
                pending.inbox.put(_fail(pending.task, reason))

    def close(self) -> None:
        """Nothing to release: sessions belong to the registry."""


def _fail(task: Task, reason: str) -> Reply:
    return Reply(task.stage, task.round, task.client_id, error=reason)
