"""torch's intra-op thread count, held at one while fedlearn's own code or a client runs.

One thread for two reasons. Determinism: some kernels (oneDNN convolution gradients) sum
per-thread partial results, so their rounding depends on the thread count; one thread
everywhere keeps a seeded run bit-identical in-process, in the worker pool and at a site.
Fork safety: torch's CPU builds use GNU OpenMP, and a process that has run an OpenMP
parallel region can no longer fork a child that runs one (the child hangs), so code that
may run before the worker pool forks (the coordinator's folds, DP noise) never starts one.
Parallelism comes from running clients side by side instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_thread() -> Iterator[None]:
    """torch with one intra-op thread inside the block (the count before, after it).

    Does not import torch: when nothing has imported it, nothing can use its threads.
    """
    torch = sys.modules.get("torch")
    previous = torch.get_num_threads() if torch is not None else 1
    if previous != 1:
        torch.set_num_threads(1)  # type: ignore[union-attr]
    try:
        yield
    finally:
        if previous != 1:
            torch.set_num_threads(previous)  # type: ignore[union-attr]
