"""The default transport: run every task in this process, one after another."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedlearn.engine.client_app import ClientApp
from fedlearn.engine.client_state import open_state_store
from fedlearn.engine.messages import Reply, Task
from fedlearn.engine.records import Arrays
from fedlearn.engine.runtime import ClientRuntime


def read_only(arrays: Arrays) -> Arrays:
    """Read-only views of ``arrays``: a ClientApp cannot corrupt the global model."""
    out: Arrays = {}
    for name, a in arrays.items():
        view = a.view()
        view.flags.writeable = False
        out[name] = view
    return out


class InProcessTransport:
    """Runs tasks lazily in the caller's thread with one ClientApp instance.

    Replies are produced one at a time, so the coordinator folds each update before the
    next client trains. Returned arrays are copied, since an app may hand out views of
    a model it reuses for the next client. Clients' own states (``ctx.state``) live in
    ``state_dir`` when given, else in this process.
    """

    def __init__(
        self,
        app_factory: Callable[[], ClientApp],
        run_id: str = "",
        state_dir: str | Path | None = None,
    ) -> None:
        self._factory = app_factory
        self._run_id = run_id
        self._states = open_state_store(state_dir)
        self._runtime: ClientRuntime | None = None

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        """Yield each task's reply as soon as it is computed."""
        if self._runtime is None:
            self._runtime = ClientRuntime(self._factory(), self._run_id, states=self._states)
        runtime = self._runtime
        view = read_only(broadcast)
        for task in tasks:
            reply = runtime.handle(task, view)
            if reply.arrays is not None:
                reply = replace(reply, arrays={k: np.array(v) for k, v in reply.arrays.items()})
            yield reply

    def close(self) -> None:
        """Drop the ClientApp."""
        self._runtime = None
