"""What the worker pool and the Ray backend share: how a stage's tasks are cut into chunks
for the workers, and how a worker runs a chunk.

A secure-aggregation stage keeps each client on the worker that holds its protocol state
from the previous stage (``client_id % workers``); any other stage's chunks go to whichever
worker is free. A chunk is a framed list of encoded tasks; its answer a framed list of
encoded replies.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence

from fedlearn.engine.messages import Task, decode_task, encode_reply, encode_task, frame
from fedlearn.engine.records import Arrays
from fedlearn.engine.runtime import ClientRuntime


def chunk_size(tasks: int, workers: int, requested: int | None = None) -> int:
    """``requested``, else about four chunks per worker, at most 64 tasks each."""
    return requested or max(1, min(64, math.ceil(tasks / (4 * workers))))


def worker_groups(tasks: Sequence[Task], workers: int) -> list[list[Task]]:
    """One group per worker for a secure stage (``client_id % workers``), else one shared."""
    if tasks and tasks[0].stage.secure:
        return [[t for t in tasks if t.client_id % workers == i] for i in range(workers)]
    return [list(tasks)]


def encoded_chunks(
    tasks: Sequence[Task], size: int, prefix: Sequence[bytes] = ()
) -> list[tuple[list[Task], bytes]]:
    """``tasks`` in chunks of ``size``, each with its message: ``prefix`` and the encoded
    tasks, framed."""
    out = []
    for start in range(0, len(tasks), size):
        chunk = list(tasks[start : start + size])
        out.append((chunk, frame([*prefix, *(encode_task(t) for t in chunk)])))
    return out


def run_chunk(
    runtime: ClientRuntime, broadcast: Arrays, tasks: Iterable[bytes | memoryview]
) -> bytes:
    """Run encoded tasks one after another; their encoded replies, framed."""
    return frame([encode_reply(runtime.handle(decode_task(t), broadcast)) for t in tasks])


def one_torch_thread() -> None:
    """A worker's torch (when loaded) on one intra-op thread for good: parallelism comes
    from the workers (see :mod:`fedlearn.engine.threads`)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
