"""A transport over a pool of worker processes that keep their ClientApp between tasks.

Each worker builds one ClientApp (model, cached data) when it starts and then serves
chunks of tasks. The global arrays go to each worker once per stage; tasks and replies
cross the pipe as framed bytes (JSON headers + raw array bytes), never pickled.

Workers start by ``fork`` where that is safe, which needs nothing of the ClientApp factory.
CUDA cannot survive a fork, and torch refuses autograd in a child forked after the parent
ran a backward pass on a CUDA build, so once this process has imported a CUDA build of
torch the default (``start_method="auto"``) is ``forkserver``: workers fork from a clean
server process that imported torch and fedlearn once and never trained or touched a
device. ``forkserver``
and ``spawn`` hand the factory to each worker by pickling it over the pipe to that local
child (the only pickling here, between two processes of the same run): it must be a
module-level function or a ``functools.partial`` of one.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal

from fedlearn.engine.client_app import ClientApp
from fedlearn.engine.client_state import DirectoryStateStore
from fedlearn.engine.messages import (
    Reply,
    Task,
    decode_reply,
    frame,
    unframe,
)
from fedlearn.engine.records import Arrays, decode_arrays, encode_arrays
from fedlearn.engine.runtime import ClientRuntime, describe
from fedlearn.errors import ConfigError, SerializationError
from fedlearn.simulation.chunks import (
    chunk_size,
    encoded_chunks,
    one_torch_thread,
    run_chunk,
    worker_groups,
)
from fedlearn.simulation.inprocess import read_only

StartMethod = Literal["auto", "fork", "forkserver", "spawn"]
START_METHODS: tuple[StartMethod, ...] = ("auto", "fork", "forkserver", "spawn")
_PRELOAD = ["torch", "fedlearn.simulation.pool"]
"""What the forkserver imports once, so each worker it forks starts with them loaded."""

_BROADCAST, _TASKS, _QUIT = b"B", b"T", b"Q"


def resolve_start_method(requested: StartMethod = "auto") -> str:
    """The multiprocessing start method the pool uses for ``requested``.

    ``auto``: ``forkserver`` when this process imported a CUDA build of torch, else
    ``fork`` (the pool also forks when its factory does not pickle).
    Raises ConfigError for a method this platform lacks.
    """
    if requested not in START_METHODS:
        raise ConfigError(f"start_method must be one of {', '.join(START_METHODS)}")
    method = requested
    if method == "auto":
        method = "forkserver" if _cuda_build() else "fork"
    if method not in mp.get_all_start_methods():
        raise ConfigError(f"the pool's start method {method!r} is not available here")
    return method


def _cuda_build() -> bool:
    """Whether this process imported a CUDA build of torch (without initializing CUDA).
    A process that never imported torch cannot have touched CUDA or autograd, so its
    workers fork safely (and a numpy workload does not pay torch's import here)."""
    torch = sys.modules.get("torch")
    return torch is not None and getattr(torch.version, "cuda", None) is not None


PIPELINE_BYTES = 16 * 1024
"""Largest task message queued behind a running one (well under a pipe's 64 KiB buffer)."""


def _serve(
    conn: Connection,
    factory: Callable[[], ClientApp],
    run_id: str,
    states: DirectoryStateStore,
    inherited: list[Connection],
) -> None:
    """Worker main loop. It first closes the parent's ends of every pipe it inherited
    through fork (its own included), so it sees end-of-file as soon as the parent dies."""
    for other in inherited:
        other.close()
    # Ctrl-C reaches the whole process group: the parent stops the run, workers just end.
    # SIGTERM (the pool terminating a busy worker) ends the process, whatever handler the
    # parent had installed when it forked.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    one_torch_thread()
    runtime = ClientRuntime(factory(), run_id, states=states)
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
            conn.send_bytes(run_chunk(runtime, broadcast, parts[1:]))


class _Worker:
    def __init__(
        self,
        ctx: Any,
        factory: Callable[[], ClientApp],
        run_id: str,
        states: DirectoryStateStore,
        siblings: list[_Worker],
    ) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        # a forked child inherits every pipe end the parent holds; a spawned one none
        forked = ctx.get_start_method() == "fork"
        inherited = [self.conn, *(w.conn for w in siblings)] if forked else []
        self.process = ctx.Process(
            target=_serve, args=(child, factory, run_id, states, inherited), daemon=True
        )
        self.process.start()
        child.close()
        self.pending: list[list[Task]] = []


class PoolTransport:
    """Runs tasks on ``workers`` processes (default: one per core), started by
    ``start_method`` (see the module's docstring; ``auto`` forks unless torch is a CUDA
    build).

    Clients' own states (``ctx.state``) live in files under ``state_dir``, which every
    worker shares (a client may train in a different worker each round); without one, in
    a temporary directory removed on :meth:`close`.
    """

    def __init__(
        self,
        app_factory: Callable[[], ClientApp],
        workers: int | None = None,
        run_id: str = "",
        chunk_size: int | None = None,
        state_dir: str | Path | None = None,
        start_method: StartMethod = "auto",
    ) -> None:
        self.start_method = resolve_start_method(start_method)
        if self.start_method != "fork":
            try:
                pickle.dumps(app_factory)
            except Exception as exc:
                if start_method == "auto":  # a factory that cannot travel: fork it is
                    self.start_method = resolve_start_method("fork")
                else:
                    raise ConfigError(
                        f"the pool's {self.start_method!r} workers need a ClientApp factory "
                        "that pickles (a module-level function or a functools.partial of "
                        f"one): {describe(exc)}"
                    ) from exc
        self.num_workers = workers or os.cpu_count() or 1
        if self.num_workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.num_workers}")
        self._factory = app_factory
        self._run_id = run_id
        self._chunk_size = chunk_size
        self._ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._workers: list[_Worker] = []
        self._payload = b""
        self._remove_state_dir: Callable[[], object] = lambda: None
        if state_dir is None:  # its own: removed on close, or when the pool is collected
            state_dir = tempfile.mkdtemp(prefix="fedlearn-client-state-")
            self._remove_state_dir = weakref.finalize(self, shutil.rmtree, state_dir, True)
        self.states = DirectoryStateStore(state_dir)

    def _start(self) -> None:
        self.states.directory.mkdir(parents=True, exist_ok=True)
        while len(self._workers) < self.num_workers:
            self._workers.append(
                _Worker(self._ctx, self._factory, self._run_id, self.states, self._workers)
            )

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
        for i in range(len(self._workers)):
            self._fill(i, queues[i])
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
                    self._fill(i, queues[i])
                    continue
                self._fill(i, queues[i])
                yield from replies
            for i, w in enumerate(self._workers):  # idle workers take what busy ones left
                if not w.pending:
                    self._fill(i, queues[i])

    def _fill(self, i: int, queue: list[tuple[list[Task], bytes]]) -> None:
        """Give worker ``i`` up to two chunks. A second one goes only while it is small:
        a worker that is sending its replies must never face a parent blocked on a
        full pipe (both sides would wait forever)."""
        w = self._workers[i]
        while queue and len(w.pending) < 2:
            chunk, message = queue[-1]
            if w.pending and len(message) > PIPELINE_BYTES:
                return
            queue.pop()
            self._send(w, chunk, message)

    def _plan(self, tasks: Sequence[Task]) -> list[list[tuple[list[Task], bytes]]]:
        """Per worker, the encoded chunks it will run (popped from the end)."""
        n = len(self._workers)
        size = chunk_size(len(tasks), n, self._chunk_size)
        queues = [encoded_chunks(g, size, [_TASKS])[::-1] for g in worker_groups(tasks, n)]
        return queues if len(queues) == n else queues * n  # one shared queue

    def _send(self, w: _Worker, chunk: list[Task], message: bytes) -> None:
        """Queue ``chunk`` on ``w``; if its pipe is already broken the chunk stays pending
        there and fails with the worker when the pool notices the death."""
        w.pending.append(chunk)
        with contextlib.suppress(OSError):
            w.conn.send_bytes(message)

    def _lost(self, i: int, chunk: list[Task], exc: BaseException) -> Iterator[Reply]:
        """Worker ``i`` died: fail its outstanding tasks and start a replacement in its slot."""
        w = self._workers[i]
        w.process.join(timeout=1)
        reason = f"worker process died (exit code {w.process.exitcode}; {describe(exc)})"
        for task in chunk + [t for c in w.pending for t in c]:
            yield Reply(task.stage, task.round, task.client_id, error=reason)
        w.pending.clear()
        w.conn.close()
        others = [o for j, o in enumerate(self._workers) if j != i]
        fresh = _Worker(self._ctx, self._factory, self._run_id, self.states, others)
        with contextlib.suppress(OSError):
            fresh.conn.send_bytes(self._payload)
        self._workers[i] = fresh

    def close(self) -> None:
        """Stop every worker: idle ones finish, busy ones (a stage was abandoned, e.g. on
        Ctrl-C) are terminated at once rather than waited for."""
        for w in self._workers:
            if w.pending:
                w.process.terminate()
                continue
            with contextlib.suppress(OSError):
                w.conn.send_bytes(frame([_QUIT]))
        for w in self._workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.kill()
            w.conn.close()
        self._workers.clear()
        self._remove_state_dir()
