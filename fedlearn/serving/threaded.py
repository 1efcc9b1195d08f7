"""An ASGI app under uvicorn in a background thread: the endpoint's REST server and the
live run page both run this way."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette

from fedlearn.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class RestServer:
    """A uvicorn server running an app in a background thread; ``stop()`` shuts it down."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int
    scheme: str = "http"
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8000`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        if self._stopped:
            return
        self._stopped = True
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("%s did not stop within %.1f s", self.thread.name, timeout_s)

    def __enter__(self) -> RestServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_rest(
    app: Starlette,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    ssl_client_ca: str | None = None,
    access_log: bool = False,
    startup_timeout_s: float = 10.0,
    graceful_s: int = 5,
    name: str = "fedlearn-rest",
    what: str = "the REST server",
) -> RestServer:
    """Run ``app`` under uvicorn in a thread named ``name``; returns once it listens (port
    0: any free one). With ``ssl_client_ca`` a client must present a certificate signed by
    it (refused in the TLS handshake otherwise). ``what`` names the server in errors."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_ca_certs=ssl_client_ca,
        ssl_cert_reqs=ssl.CERT_NONE if ssl_client_ca is None else ssl.CERT_REQUIRED,
        log_level="warning",
        access_log=access_log,
        lifespan="off",
        ws="none",
        timeout_graceful_shutdown=graceful_s,
    )
    server = uvicorn.Server(config)

    def run() -> None:
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
            log.debug("uvicorn exited during startup")

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            raise ConfigError(f"{what} could not listen on {host}:{port}")
        if time.monotonic() > deadline:
            server.should_exit = True
            thread.join(5)
            raise ConfigError(f"{what} did not start within {startup_timeout_s} s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    scheme = "https" if ssl_certfile else "http"
    return RestServer(server, thread, host, int(bound), scheme)
