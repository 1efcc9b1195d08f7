"""A transport over a pool of worker processes that keep their ClientApp between tasks.

Each worker builds one ClientApp (model, cached data) when it starts and then serves
chunks of tasks. The global arrays go to each worker once per stage; tasks and replies
cross the pipe as framed bytes (JSON headers + raw array bytes), never pickled.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from fedlearn.client_app import ClientApp
from fedlearn.errors import ConfigError, SerializationError
from fedlearn.messages import (
    Reply,
    Task,
    decode_reply,
    decode_task,
    encode_reply,
    encode_task,
    frame,
    unframe,
)
from fedlearn.records import Arrays, decode_arrays, encode_arrays
from fedlearn.runtime import ClientRuntime, describe
from fedlearn.simulation.inprocess import read_only

_BROADCAST, _TASKS, _QUIT = b"B", b"T", b"Q"


def _serve(conn: Connection, factory: Callable[[], ClientApp], run_id: str) -> None:
    """Worker main loop."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    runtime = ClientRuntime(factory(), run_id)
    broadcast: Arrays = {}
    while True:
        try:
            message = conn.recv_bytes()
        except EOFError:
            return
        parts = list(unframe(message))
        kind = bytes(parts[0])
        if kind == _QUIT:
            return
        if kind == _BROADCAST:
            broadcast = read_only(decode_arrays(parts[1]))
        elif kind == _TASKS:
            replies = []
            for part in parts[1:]:
                task = decode_task(part)
                replies.append(encode_reply(runtime.handle(task, broadcast)))
            conn.send_bytes(frame(replies))


class _Worker:
    def __init__(self, ctx: Any, factory: Callable[[], ClientApp], run_id: str) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_serve, args=(child, factory, run_id), daemon=True)
        self.process.start()
        child.close()
        self.pending: list[list[Task]] = []


class PoolTransport:
    """Runs tasks on ``workers`` forked processes (default: one per core)."""

    def __init__(
        self,
        app_factory: Callable[[], ClientApp],
        workers: int | None = None,
        run_id: str = "",
        chunk_size: int | None = None,
    ) -> None:
        if "fork" not in mp.get_all_start_methods():
            raise ConfigError("the pool backend needs the 'fork' start method (Linux, macOS)")
        self.num_workers = workers or os.cpu_count() or 1
        if self.num_workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.num_workers}")
        self._factory = app_factory
        self._run_id = run_id
        self._chunk_size = chunk_size
        self._ctx = mp.get_context("fork")
        self._workers: list[_Worker] = []
        self._payload = b""

    def _start(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self._factory, self._run_id))

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Send the broadcast to every worker, then stream chunks; yield replies as they come.

        Tasks of a secure-aggregation stage stick to worker ``client_id % workers``: that
        worker holds the client's protocol state from the previous stage.
        """
        if not tasks:
            return
        self._start()
        self._payload = frame([_BROADCAST, encode_arrays(broadcast)])
        for w in self._workers:
            w.conn.send_bytes(self._payload)
        queues = self._plan(tasks)
        for i, w in enumerate(self._workers):
            for _ in range(2):
                if queues[i]:
                    self._send(w, queues[i].pop())
        while any(w.pending for w in self._workers):
            ready = wait([w.conn for w in self._workers if w.pending])
            for i, w in enumerate(self._workers):
                if w.conn not in ready:
                    continue
                chunk = w.pending.pop(0)
                try:
                    replies = [decode_reply(p) for p in unframe(w.conn.recv_bytes())]
                except (EOFError, OSError, SerializationError) as exc:
                    yield from self._lost(i, chunk, exc)
                    continue
                if queues[i]:
                    self._send(w, queues[i].pop())
                yield from replies

    def _plan(self, tasks: Sequence[Task]) -> list[list[list[Task]]]:
        """Per worker, the chunks it will run (popped from the end)."""
        n = len(self._workers)
        size = self._chunk_size or max(1, min(64, math.ceil(len(tasks) / (4 * n))))
        if tasks[0].stage.secure:
            own = [[t for t in tasks if t.client_id % n == i] for i in range(n)]
            return [[q[j : j + size] for j in range(0, len(q), size)][::-1] for q in own]
        shared = [list(tasks[j : j + size]) for j in range(0, len(tasks), size)][::-1]
        return [shared] * n

    def _send(self, w: _Worker, chunk: list[Task]) -> None:
        """Queue ``chunk`` on ``w``; if its pipe is already broken the chunk stays pending
        there and fails with the worker when the pool notices the death."""
        w.pending.append(chunk)
        with contextlib.suppress(OSError):
            w.conn.send_bytes(frame([_TASKS, *(encode_task(t) for t in chunk)]))

    def _lost(self, i: int, chunk: list[Task], exc: BaseException) -> Iterator[Reply]:
        """Worker ``i`` died: fail its outstanding tasks and start a replacement in its slot."""
        w = self._workers[i]
        w.process.join(timeout=1)
        reason = f"worker process died (exit code {w.process.exitcode}; {describe(exc)})"
        for task in chunk + [t for c in w.pending for t in c]:
            yield Reply(task.stage, task.round, task.client_id, error=reason)
        w.pending.clear()
        w.conn.close()
        fresh = _Worker(self._ctx, self._factory, self._run_id)
        with contextlib.suppress(OSError):
            fresh.conn.send_bytes(self._payload)
        self._workers[i] = fresh

    def close(self) -> None:
        """Stop every worker."""
        for w in self._workers:
            with contextlib.suppress(OSError):
                w.conn.send_bytes(frame([_QUIT]))
        for w in self._workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
            w.conn.close()
        self._workers.clear()
