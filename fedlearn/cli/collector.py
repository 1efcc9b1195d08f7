"""The garbage collector of a ``fedlearn simulate`` process: off while it starts, its
start-up heap frozen when the first round starts, everything frozen when it ends.

Start-up (torch, numpy, pydantic, the data, the ClientApp) builds about 250,000 objects
that live until the process ends and hardly any garbage. CPython's collector would still
walk all of them in every full collection while they are being imported (about 0.3 s of a
start-up that is mostly torch's import) and again when the interpreter shuts down (about
0.6 s after the last line is printed). So the command:

1. turns the collector off when it starts;
2. when the first stage starts (just before the pool forks its workers), freezes what
   start-up built (:func:`gc.freeze`: never walked again, and never written to by a
   collection in a forked worker, whose copy-on-write pages stay shared) and turns the
   collector back on for the rounds;
3. freezes everything once more at exit, after the run directory's files are written and
   closed, so that shutdown does not walk a heap that is about to be released anyway.

This is the sequence the :mod:`gc` documentation gives for a process that forks workers;
nothing is collected less during the rounds, and no output depends on it. It applies only
in the ``fedlearn`` program's own process (:func:`mark_command_process`, called by its
entry point), never where a command runs inside a longer-lived process (a test's
``CliRunner``), whose garbage of the moment a freeze would keep for good.
"""

from __future__ import annotations

import atexit
import gc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlearn.engine.messages import Stage
    from fedlearn.engine.results import ClientRecord, RoundRecord


_command_process = False


def mark_command_process() -> None:
    """Say that this process is the ``fedlearn`` program, which ends with its command."""
    global _command_process
    _command_process = True


class StartupCollector:
    """An Observer that turns the collector back on when the first stage starts.

    Creating it (``active``: default, whether :func:`mark_command_process` was called)
    turns the collector off and registers the freeze at exit; :meth:`started`
    (idempotent) freezes start-up's objects and turns it on again (the first stage calls
    it; call it yourself when a command may end without one). Inactive, it does nothing.
    """

    def __init__(self, active: bool | None = None) -> None:
        self.active = _command_process if active is None else active
        self._started = not self.active
        if self.active:
            gc.disable()
            atexit.register(gc.freeze)

    def started(self) -> None:
        """Freeze what exists now and turn the collector back on (once)."""
        if self._started:
            return
        self._started = True
        gc.freeze()
        gc.enable()

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        """The first stage: start-up is over."""
        self.started()

    def reply_received(self, record: ClientRecord) -> None:
        """Nothing to do."""

    def round_finished(self, record: RoundRecord) -> None:
        """Nothing to do."""
