"""A report's plots drawn in a child process that imports matplotlib while the run starts.

matplotlib's import and the report's two PNGs take about a second of one core at the end
of a run. ``fedlearn simulate`` forks this child when it starts: the child imports
matplotlib on the core that the command's own start-up (torch's import, mostly) leaves
idle, then waits. When the run ends, :func:`~fedlearn.report.files.write_report` asks it
for the plots: the child reads the run store (read-only, everything committed) and draws
the same figures with the same code into the same files, while this process writes the
JSON and CSV files; ``write_report`` returns once all of them are written. Should the
child be gone, the plots are drawn here as before.

Requests and replies cross the pipe as JSON; nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import signal
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fedlearn.config.extras import has_extra
from fedlearn.errors import FedlearnError

_active: PlotProcess | None = None


def active() -> PlotProcess | None:
    """The plot process that reports written now use, if one is running."""
    return _active


class PlotProcess:
    """A forked child that imports matplotlib at once and then draws plots on request.

    From its start until :meth:`close` it is the one :func:`active` returns, which
    :func:`~fedlearn.report.files.write_report` asks for its plots. Use
    :func:`start_plot_process`.
    """

    def __init__(self) -> None:
        global _active
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=_serve, args=(child, self._conn), daemon=True, name="fedlearn-plots"
        )
        self._process.start()
        child.close()
        self._asked = False
        _active = self

    def request(self, store: Path, run_id: str, pngs: Mapping[str, Path]) -> bool:
        """Ask for the plots ``pngs`` names (``metrics``, ``clients``, ``privacy`` -> file)
        of run ``run_id`` in ``store``; False (nothing asked) when the child is gone."""
        if self._asked or self._conn.closed:
            return False
        body = {"store": str(store), "run": run_id, "pngs": {k: str(v) for k, v in pngs.items()}}
        try:
            self._conn.send_bytes(json.dumps(body).encode())
        except OSError:
            return False
        self._asked = True
        return True

    def wait(self) -> bool:
        """Wait for the plots asked for: True once they are written, False when the child
        ended first (nothing written); FedlearnError when drawing them failed."""
        self._asked = False
        try:
            reply = json.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self.close()
            return False
        if reply.get("error") is not None:
            raise FedlearnError(f"drawing the report's plots: {reply['error']}")
        return True

    def close(self) -> None:
        """Stop the child and stop being the active one (idempotent)."""
        global _active
        if _active is self:
            _active = None
        if not self._conn.closed:
            with contextlib.suppress(OSError):
                self._conn.send_bytes(b"{}")
            self._conn.close()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


def start_plot_process() -> PlotProcess | None:
    """A started :class:`PlotProcess`, or None when matplotlib (the ``report`` extra) is
    not installed or this platform cannot fork (the plots are then drawn in-process)."""
    if not has_extra("report") or "fork" not in mp.get_all_start_methods():
        return None
    return PlotProcess()


def _serve(conn: Connection, parent_end: Connection) -> None:
    """The child: import matplotlib, then draw what each request asks until told to stop
    (an empty request, or the parent's end closing)."""
    parent_end.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    from fedlearn.report.plots import _pyplot

    _pyplot()
    while True:
        try:
            request: dict[str, Any] = json.loads(conn.recv_bytes())
        except EOFError:
            return
        if "store" not in request:
            return
        try:
            _draw(Path(request["store"]), request["run"], request["pngs"])
            reply: dict[str, Any] = {"error": None}
        except Exception as exc:  # the parent raises it as it would its own failure
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send_bytes(json.dumps(reply).encode())


def _draw(path: Path, run_id: str, pngs: dict[str, str]) -> None:
    from fedlearn.engine.store import RunStore
    from fedlearn.report.plots import write_plots
    from fedlearn.report.summary import summarize

    store = RunStore(path, run_id=run_id, read_only=True)
    try:
        report = summarize(store)
    finally:
        store.close()
    write_plots(report, {name: Path(file) for name, file in pngs.items()})
