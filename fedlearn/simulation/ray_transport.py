"""A transport over long-lived Ray actors that keep their ClientApp between tasks.

It mirrors the pool (:mod:`fedlearn.simulation.pool`): each actor builds one ClientApp
when it starts and then serves chunks of tasks. The global arrays go into Ray's object
store once per stage, as a ``uint8`` array holding fedlearn's array encoding (actors map
it without a copy); tasks and replies cross as framed bytes (JSON headers + raw array
bytes), never pickled models. Ray's control plane pickles only what it always does: the
actor class, the call arguments around those bytes, and the app factory (user code, as
a pool worker inherits it through fork).

By default the transport starts a private local Ray and shuts it down on ``close``; with
``address`` it joins an existing cluster and leaves it running; a process that is already
connected to Ray keeps using that connection (:mod:`fedlearn.simulation.ray_session`).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedlearn.engine.client_app import ClientApp
from fedlearn.engine.client_state import DirectoryStateStore
from fedlearn.engine.messages import (
    Reply,
    Task,
    decode_reply,
    unframe,
)
from fedlearn.engine.records import Arrays, decode_arrays, encode_arrays
from fedlearn.engine.runtime import ClientRuntime, describe
from fedlearn.errors import ConfigError, SerializationError
from fedlearn.simulation.chunks import chunk_size as chunk_size_for
from fedlearn.simulation.chunks import encoded_chunks, one_torch_thread, run_chunk, worker_groups
from fedlearn.simulation.inprocess import read_only
from fedlearn.simulation.ray_session import RaySession

IN_FLIGHT = 2
"""Calls queued on one actor: the next chunk is there when the current one ends."""


class ClientActor:
    """The body of one Ray actor: one ClientApp, and the current stage's broadcast.

    ``run`` takes the stage number, the broadcast's object reference wrapped in a list
    (so Ray hands over the reference rather than the value: the actor fetches and decodes
    it once per stage) and a chunk of encoded tasks; it returns the encoded replies.
    """

    def __init__(self, factory: Callable[[], ClientApp], run_id: str, state_dir: str) -> None:
        one_torch_thread()
        self._runtime = ClientRuntime(factory(), run_id, states=DirectoryStateStore(state_dir))
        self._stage = -1
        self._broadcast: Arrays = {}

    def run(self, stage: int, broadcast: list[Any], tasks: bytes) -> bytes:
        """Run a chunk of tasks; their replies, framed."""
        if stage != self._stage:
            import ray

            payload = np.asarray(ray.get(broadcast[0]))
            self._broadcast = read_only(decode_arrays(payload.data))
            self._stage = stage
        return run_chunk(self._runtime, self._broadcast, unframe(tasks))


class _Plan:
    """One stage's chunks of encoded tasks: a shared queue that any actor takes from, or
    for a secure-aggregation stage one queue per actor (``client_id % actors``: the actor
    that holds the client's protocol state from the previous stage)."""

    def __init__(self, tasks: Sequence[Task], actors: int, chunk_size: int | None) -> None:
        size = chunk_size_for(len(tasks), actors, chunk_size)
        self._sticky = tasks[0].stage.secure
        self._queues = [deque(encoded_chunks(g, size)) for g in worker_groups(tasks, actors)]

    def next_for(self, actor: int) -> tuple[list[Task], bytes] | None:
        """The next chunk for ``actor`` and its message, or None when it has none left."""
        queue = self._queues[actor if self._sticky else 0]
        return queue.popleft() if queue else None


class RayTransport:
    """Runs tasks on Ray actors (default: as many as the cluster's CPUs allow at
    ``num_cpus`` each, and its GPUs at ``num_gpus`` each).

    Clients' own states (``ctx.state``) live in files under ``state_dir`` that every actor
    opens (default: a temporary directory, removed on :meth:`close`): on a cluster of
    several machines it must be a shared file system."""

    def __init__(
        self,
        app_factory: Callable[[], ClientApp],
        actors: int | None = None,
        run_id: str = "",
        *,
        address: str | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        chunk_size: int | None = None,
        state_dir: str | Path | None = None,
    ) -> None:
        if num_cpus <= 0 or num_gpus < 0:
            raise ConfigError(
                f"Ray resources per client: num_cpus must be > 0 and num_gpus >= 0, "
                f"got {num_cpus:g} and {num_gpus:g}"
            )
        if actors is not None and actors < 1:
            raise ConfigError(f"workers must be >= 1, got {actors}")
        self.session = RaySession(address)
        self.ray = self.session.ray
        self._factory = app_factory
        self._run_id = run_id
        self._num_cpus = num_cpus
        self._num_gpus = num_gpus
        self._chunk_size = chunk_size
        try:
            self.num_actors = self._count(actors)
        except BaseException:
            self.session.close()
            raise
        self._remove_state_dir: Callable[[], object] = lambda: None
        if state_dir is None:  # its own: removed on close, or when the transport is collected
            state_dir = tempfile.mkdtemp(prefix="fedlearn-client-state-")
            self._remove_state_dir = weakref.finalize(self, shutil.rmtree, state_dir, True)
        self.state_dir = Path(state_dir).resolve()
        self._actors: list[Any] = []
        self._actor_class: Any = None
        self._factory_ref: Any = None
        self._stage = 0

    def _count(self, wanted: int | None) -> int:
        """How many actors to run; refuses a number the cluster cannot place."""
        have = self.session.resources()
        cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
        fit = math.floor(cpus / self._num_cpus + 1e-9)
        if self._num_gpus > 0:
            fit = min(fit, math.floor(gpus / self._num_gpus + 1e-9))
        if fit < 1 or (wanted is not None and wanted > fit):
            raise ConfigError(
                f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: room for {fit} "
                f"actors at num_cpus={self._num_cpus:g}, num_gpus={self._num_gpus:g} "
                f"each, not {wanted or 1}"
            )
        return wanted or fit

    def _spawn(self) -> Any:
        """A new actor (Ray creates it in the background; its first call waits for it)."""
        if self._actor_class is None:
            self._factory_ref = self.ray.put(self._factory)
            self._actor_class = self.ray.remote(
                num_cpus=self._num_cpus, num_gpus=self._num_gpus, max_restarts=0
            )(ClientActor)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return self._actor_class.remote(self._factory_ref, self._run_id, str(self.state_dir))

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Put the broadcast in the object store once, stream chunks to the actors (up
        to two queued on each), and yield replies as chunks finish."""
        if not tasks:
            return
        while len(self._actors) < self.num_actors:
            self._actors.append(self._spawn())
        self._stage += 1
        ref = self.ray.put(np.frombuffer(encode_arrays(broadcast), dtype=np.uint8))
        plan = _Plan(tasks, len(self._actors), self._chunk_size)
        queued = [0] * len(self._actors)
        running: dict[Any, tuple[int, Any, list[Task]]] = {}

        def fill(i: int) -> None:
            while queued[i] < IN_FLIGHT and (item := plan.next_for(i)) is not None:
                chunk, message = item
                actor = self._actors[i]
                running[actor.run.remote(self._stage, [ref], message)] = (i, actor, chunk)
                queued[i] += 1

        for i in range(len(self._actors)):
            fill(i)
        while running:
            done, _ = self.ray.wait(list(running), num_returns=1)
            for call in done:
                i, actor, chunk = running.pop(call)
                if actor is self._actors[i]:
                    queued[i] -= 1
                try:
                    replies = [decode_reply(p) for p in unframe(self.ray.get(call))]
                except (self.ray.exceptions.RayError, SerializationError) as exc:
                    replies = _failed(chunk, exc)
                    if actor is self._actors[i] and isinstance(
                        exc, self.ray.exceptions.RayActorError
                    ):
                        self._replace(i)
                        queued[i] = 0
                fill(i)
                yield from replies
            for i in range(len(self._actors)):  # idle actors take what busy ones left
                fill(i)

    def _replace(self, i: int) -> None:
        """Actor ``i`` died: a fresh one takes its slot (without any secure-aggregation
        state, so that client's later stages in this round fail, as in the pool)."""
        with contextlib.suppress(Exception):
            self.ray.kill(self._actors[i])
        self._actors[i] = self._spawn()

    def close(self) -> None:
        """Stop every actor, then the Ray this transport started (if it did)."""
        for actor in self._actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor)
        self._actors.clear()
        self._actor_class = self._factory_ref = None
        self.session.close()
        self._remove_state_dir()


def _failed(chunk: list[Task], exc: BaseException) -> list[Reply]:
    """Failed replies for the tasks of a chunk whose call failed."""
    reason = f"Ray actor failed ({describe(exc).splitlines()[0]})"
    return [Reply(t.stage, t.round, t.client_id, error=reason) for t in chunk]
