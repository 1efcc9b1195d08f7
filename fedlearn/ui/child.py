"""The live page's own process: ``python -m fedlearn.ui.child``, started by
:func:`fedlearn.ui.page.start_live_page`.

Its stdin carries, as JSON lines, first the page's spec (the run store, the address, TLS,
the registry), then the run's events as ``[at, kind, data]``. It answers one JSON line on
stdout: ``{"url": ...}`` once it listens, or ``{"error": ...}``. The events are relayed to
a bus of its own, which the page's state follows exactly as it would in the run's
process. It ends when stdin closes (the run stopped the page, or died): the pages' event
streams end, then the server. Ctrl-C in the terminal is the run's to handle, not this
process's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedlearn.errors import ConfigError
from fedlearn.ui.app import serve_page
from fedlearn.ui.events import EventBus
from fedlearn.ui.page import PageTls

log = logging.getLogger("fedlearn.ui")

GATHER_S = 0.25
"""How long the page's process lets the run's events gather before it reads them: each
burst wakes it, and each page's stream, once (on a 2-vCPU VM a process's wake-up alone
costs about 0.1 ms of CPU, and the run's own vCPU feels it)."""
READ_BYTES = 1 << 20


def relay(lines: Iterable[bytes], bus: EventBus) -> int:
    """Emit on ``bus`` each ``[at, kind, data]`` line until the input ends; returns how
    many were relayed (an unreadable line is logged and skipped)."""
    count = 0
    for line in lines:
        try:
            at, kind, data = json.loads(line)
            if not isinstance(kind, str) or not isinstance(data, dict):
                raise ValueError("not [at, kind, data]")
            bus.relay(kind, data, float(at))
        except (ValueError, TypeError) as exc:
            log.warning("the live page skipped an unreadable event: %s", exc)
            continue
        count += 1
    return count


def follow(fd: int, bus: EventBus, rest: bytes = b"", gather_s: float = GATHER_S) -> int:
    """Relay the lines read from ``fd`` until it ends, reading whatever has come at most
    every ``gather_s``: a round's replies wake this process a few times, not once each
    (the run never waits on it: its end of the pipe does not block). ``rest``: bytes
    already read."""
    count = 0
    while chunk := os.read(fd, READ_BYTES):
        *lines, rest = (rest + chunk).split(b"\n")
        count += relay(lines, bus)
        time.sleep(gather_s)
    return count


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    fd = sys.stdin.fileno()
    head = b""
    while b"\n" not in head and (chunk := os.read(fd, READ_BYTES)):
        head += chunk
    line, _, rest = head.partition(b"\n")
    spec: dict[str, Any] = json.loads(line)
    bus = EventBus() if spec["live"] else None
    tls = None
    if spec["tls"] is not None:
        cert, key, client_ca = spec["tls"]
        tls = PageTls(Path(cert), Path(key), None if client_ca is None else Path(client_ca))
    try:
        page = serve_page(
            Path(spec["db"]),
            spec["run_id"],
            bus,
            host=spec["host"],
            port=spec["port"],
            clients=spec["clients"],
            tls=tls,
            registry=None if spec["registry"] is None else Path(spec["registry"]),
            endpoint=spec["endpoint"],
            startup_timeout_s=spec["startup_timeout_s"],
        )
    except ConfigError as exc:
        _answer({"error": str(exc)})
        return 2
    _answer({"url": page.url})
    try:
        if bus is None:
            while os.read(fd, READ_BYTES):  # nothing comes: wait for the end
                pass
        else:
            follow(fd, bus, rest)
    finally:
        page.stop()
    return 0


def _answer(body: dict[str, str]) -> None:
    sys.stdout.write(json.dumps(body) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
