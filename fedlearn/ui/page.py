"""The live page as the run sees it: a process of its own (:mod:`fedlearn.ui.child`) that
serves the page, and a pipe the run's events go down.

The run's process keeps only what it cannot give away: each event from its
:class:`~fedlearn.ui.events.EventBus` is written to the page process's stdin as one JSON
line (a few microseconds, never blocking: if the pipe is full the rest waits for the next
event or the end). Everything else, the page's state, the per-round statistics, the web
server, the pages' event streams and the registry watcher, runs in the page's process, so
a browser watching takes nothing from the run: no interpreter lock, no thread of the run's.

The page process ends when its stdin closes: on :meth:`LivePage.stop`, and also when the
run's process dies, whatever killed it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fedlearn
from fedlearn.config.deployment import is_loopback
from fedlearn.config.extras import extra_message
from fedlearn.errors import ConfigError
from fedlearn.ui.events import Event, EventBus

log = logging.getLogger("fedlearn.ui")

PIPE_BYTES = 1 << 20
"""The pipe's capacity asked of Linux (``F_SETPIPE_SZ``): a page process that falls
behind by this much makes the run hold events back, never wait."""
MAX_HELD_BYTES = 64 << 20
"""Events held back beyond this mean the page process is stuck: the run stops sending."""
START_GRACE_S = 30.0
"""Time for the page process to start Python and import its server, on top of the
server's own start-up timeout."""
_F_SETPIPE_SZ = 1031


@dataclass(frozen=True)
class PageTls:
    """TLS for the page: its certificate chain and key (PEM files); with ``client_ca``,
    a browser must present a certificate signed by it (refused in the handshake else)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


class _Pipe:
    """Writes events to the page process as JSON lines without ever blocking the run."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.fd = stream.fileno()
        self.held = bytearray()
        self.broken = False
        os.set_blocking(self.fd, False)
        with contextlib.suppress(OSError, ImportError):
            import fcntl

            fcntl.fcntl(self.fd, _F_SETPIPE_SZ, PIPE_BYTES)

    def __call__(self, event: Event) -> None:
        """Send one event (in the emitting thread; the bus serializes its calls)."""
        if self.broken:
            return
        line = json.dumps((event.at, event.kind, event.data), separators=(",", ":"))
        self.held += line.encode()
        self.held += b"\n"
        self._write()
        if len(self.held) > MAX_HELD_BYTES:
            self._give_up("it has not read the last 64 MiB of events")

    def _write(self) -> None:
        try:
            written = os.write(self.fd, self.held)
        except BlockingIOError:
            return
        except OSError as exc:  # the page process is gone
            self._give_up(f"its pipe failed: {exc.strerror or exc}")
            return
        del self.held[:written]

    def _give_up(self, why: str) -> None:
        self.broken = True
        self.held.clear()
        log.warning("the live page stopped following the run: %s", why)

    def close(self, timeout_s: float) -> None:
        """Write what is held (for up to ``timeout_s``), then close the pipe."""
        deadline = time.monotonic() + timeout_s
        while self.held and not self.broken:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([], [self.fd], [], left)
            self._write()
        with contextlib.suppress(OSError):
            self.stream.close()


class LivePage:
    """The page, served by its own process; :meth:`stop` ends it."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        url: str,
        pipe: _Pipe,
        unsubscribe: Callable[[], None],
    ) -> None:
        self.process = process
        self.url = url
        """The page's address, e.g. ``http://127.0.0.1:8050/`` (``https`` over TLS)."""
        self._pipe = pipe
        self._unsubscribe = unsubscribe
        self._stopped = False
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The page process's id."""
        return self.process.pid

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop following the run, let the page process end the pages' event streams and
        exit (killed if it has not within ``timeout_s``); idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._unsubscribe()
        self._pipe.close(timeout_s / 2)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the live page's process %d did not exit; killing it", self.pid)
            self.process.kill()
            self.process.wait(5)

    def __enter__(self) -> LivePage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_live_page(
    directory: Path,
    run_id: str | None,
    bus: EventBus | None = None,
    *,
    port: int = 0,
    host: str = "127.0.0.1",
    clients: Sequence[int] = (),
    tls: PageTls | None = None,
    registry: Path | None = None,
    endpoint: str | None = None,
    startup_timeout_s: float = 10.0,
) -> LivePage:
    """Serve the page of the run in ``directory`` (its ``run.db``), following ``bus``
    (None: a finished run from its store), from a process of its own; returns once it
    listens (port 0: any free). A ``host`` beyond loopback needs ``tls`` (ConfigError
    otherwise). With ``registry`` the page shows its models' traffic, read again when the
    registry changes; with ``endpoint`` (``http://127.0.0.1:PORT``, a ``fedlearn serve`` of
    that registry) also its request counts per answering version, read from its
    ``/metrics`` every second."""
    if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
        raise ConfigError(extra_message("serve", "the live run page"))
    if tls is None and not is_loopback(host):
        raise ConfigError(
            f"the live page: {host} is not a loopback address; it is served there over "
            "TLS only (give a certificate and key)"
        )
    for path in () if tls is None else (tls.cert, tls.key, tls.client_ca):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"the live page: no such file: {path}")
    spec: dict[str, Any] = {
        "db": str(Path(directory) / "run.db"),
        "run_id": run_id,
        "live": bus is not None,
        "clients": [int(c) for c in clients],
        "host": host,
        "port": int(port),
        "tls": None if tls is None else [str(tls.cert), str(tls.key), _opt(tls.client_ca)],
        "registry": _opt(registry),
        "endpoint": endpoint,
        "startup_timeout_s": startup_timeout_s,
    }
    process = _spawn(spec)
    url = _answer(process, startup_timeout_s + START_GRACE_S)
    assert process.stdin is not None
    pipe = _Pipe(process.stdin)
    unsubscribe = (lambda: None) if bus is None else bus.subscribe(pipe)
    return LivePage(process, url, pipe, unsubscribe)


def _opt(path: Path | str | None) -> str | None:
    return None if path is None else str(path)


def _spawn(spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    """The page process, its spec already on its stdin."""
    root = str(Path(fedlearn.__file__).resolve().parents[1])  # this very fedlearn
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    process = subprocess.Popen(
        [sys.executable, "-m", "fedlearn.ui.child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps(spec).encode() + b"\n")
    process.stdin.flush()
    return process


def _answer(process: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The URL the page process listens on, or ConfigError with why it does not."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline() if ready else b""
    process.stdout.close()
    try:
        answer = json.loads(line) if line else {}
    except ValueError:
        answer = {}
    if "url" in answer:
        return str(answer["url"])
    if process.poll() is None:
        process.kill()
    process.wait(5)
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    if "error" in answer:
        raise ConfigError(str(answer["error"]))
    if not ready:
        raise ConfigError(f"the live page did not start within {timeout_s:.0f} s")
    code = process.returncode
    raise ConfigError(f"the live page's process ended before it listened (exit code {code})")
