"""The live page's web app (Starlette) and the server that runs it in a thread of the
page's own process (:mod:`fedlearn.ui.child`).

Routes::

    GET /                  the page (static/index.html)
    GET /static/{file}     its script and style, shipped in the package
    GET /api/snapshot      the run so far (JSON): a page loads it first
    GET /api/events        server-sent events after ``?after=SEQ`` (or Last-Event-ID)
    GET /api/traffic       the registry's models and their traffic (fedlearn.ui.traffic)

Every answer forbids loading anything from elsewhere (Content-Security-Policy
``default-src 'self'``). The server listens on loopback unless told otherwise; on any
other address only over TLS (:class:`~fedlearn.ui.page.PageTls`: the coordinator's
certificate, and with a client CA, only to browsers that present a certificate it signed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlearn.config.extras import extra_message
from fedlearn.errors import ConfigError
from fedlearn.ui.events import Event, EventBus
from fedlearn.ui.page import PageTls
from fedlearn.ui.state import LiveState
from fedlearn.ui.traffic import RegistryWatcher

try:  # the serve extra: without it, a ConfigError that names it rather than an ImportError
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from fedlearn.serving.threaded import RestServer, serve_rest
except ImportError as exc:
    raise ConfigError(extra_message("serve", "the live run page")) from exc

log = logging.getLogger("fedlearn.ui")

STATIC = Path(__file__).with_name("static")
KEEPALIVE_S = 15.0
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def sse(event: Event) -> str:
    """One server-sent event: ``id`` its sequence number, ``data`` the event as JSON."""
    body = {"seq": event.seq, "at": event.at, "kind": event.kind, "data": event.data}
    return f"id: {event.seq}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def build_app(state: LiveState) -> Starlette:
    """The page's app over ``state``."""

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def snapshot(request: Request) -> Response:
        body: dict[str, Any] = await run_in_threadpool(state.snapshot)
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    async def events(request: Request) -> Response:
        raw = request.query_params.get("after") or request.headers.get("last-event-id") or "0"
        try:
            after = int(raw)
        except ValueError:
            return JSONResponse({"error": f"after: not a number: {raw[:40]!r}"}, 400)
        listener, missed = state.listen(asyncio.get_running_loop(), after)

        async def stream() -> AsyncIterator[str]:
            try:
                yield "retry: 1000\n\n" + "".join(sse(e) for e in missed)
                while True:
                    try:
                        await asyncio.wait_for(listener.ready.wait(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    # events come in bursts (fedlearn.ui.child.GATHER_S): one write each
                    batch = listener.take()
                    text = "".join(sse(e) for e in batch if e is not None)
                    if None in batch:
                        yield text + "event: end\ndata: {}\n\n"
                        return
                    if text:
                        yield text
            finally:
                state.unlisten(listener)

        if not state.live:
            state.unlisten(listener)
            return Response("event: end\ndata: {}\n\n", media_type="text/event-stream")
        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def traffic(request: Request) -> Response:
        return JSONResponse({"models": state.traffic()}, headers={"Cache-Control": "no-store"})

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/traffic", traffic),
            Route("/api/snapshot", snapshot),
            Route("/api/events", events),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(_SecurityHeaders)],
    )


@dataclass
class PageServer:
    """The page served by uvicorn in a background thread of the page's process
    (:mod:`fedlearn.ui.child`); :meth:`stop` ends it."""

    state: LiveState
    server: RestServer
    watcher: RegistryWatcher | None = None

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8050/`` (``https`` over TLS)."""
        return self.server.url + "/"

    def stop(self, timeout_s: float = 10.0) -> None:
        """End the pages' event streams, then the server."""
        if self.watcher is not None:
            self.watcher.close()
        self.state.close()
        self.server.stop(timeout_s)


def serve_page(
    db: Path,
    run_id: str | None,
    bus: EventBus | None,
    *,
    host: str,
    port: int,
    clients: Sequence[int] = (),
    tls: PageTls | None = None,
    registry: Path | None = None,
    endpoint: str | None = None,
    startup_timeout_s: float = 10.0,
) -> PageServer:
    """Serve the page of the run in ``db`` following ``bus`` (None: a finished run from its
    store) on ``host:port`` in a thread; returns once it listens. The caller checked the
    address and TLS files (:func:`fedlearn.ui.page.start_live_page`)."""
    state = LiveState(db, run_id, bus, clients)
    watcher = None
    if registry is not None:
        watcher = RegistryWatcher(registry, None if bus is None else bus.traffic, endpoint=endpoint)
        state.traffic = lambda: watcher.view
    try:
        server = serve_rest(
            build_app(state),
            host,
            port,
            ssl_certfile=None if tls is None else str(tls.cert),
            ssl_keyfile=None if tls is None else str(tls.key),
            ssl_client_ca=None if tls is None or tls.client_ca is None else str(tls.client_ca),
            startup_timeout_s=startup_timeout_s,
            graceful_s=2,
            name="fedlearn-ui",
            what="the live page",
        )
    except ConfigError:
        if watcher is not None:
            watcher.close()
        state.close()
        raise
    return PageServer(state, server, watcher)
