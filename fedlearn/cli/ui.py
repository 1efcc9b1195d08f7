"""The live page from the command line: ``fedlearn simulate --ui`` and ``report --ui``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from fedlearn.config.simulation import SimulationConfig
    from fedlearn.ui.events import EventBus

UI_PORT = 8050
"""The live page's default port (on loopback)."""
UI_HELP = "watch it in a browser: a live page on 127.0.0.1"
UI_PORT_HELP = "the live page's port (0: any free)"
ENDPOINT_ENV = "FEDLEARN_UI_ENDPOINT"
"""A ``fedlearn serve`` of the run's registry (``http://127.0.0.1:PORT``) whose request
counts the page shows (the coordinator's is ``[server] ui_endpoint``)."""


@contextlib.contextmanager
def watching(
    enabled: bool, cfg: SimulationConfig, port: int, console: Console
) -> Iterator[EventBus | None]:
    """While the block runs, the live page of the simulation ``cfg`` describes; yields
    the bus to hand to the run (None when ``enabled`` is false: no page, no events)."""
    if not enabled:
        yield None
        return
    from fedlearn.run.job import registry_dir, run_dir
    from fedlearn.ui.events import EventBus
    from fedlearn.ui.page import start_live_page

    bus = EventBus()
    clients = range(cfg.run.clients)
    # loopback only: the simulation's page has no certificate to be served beyond it with
    with start_live_page(
        run_dir(cfg),
        cfg.run.name,
        bus,
        port=port,
        clients=clients,
        registry=registry_dir(cfg),
        endpoint=os.environ.get(ENDPOINT_ENV) or None,
    ) as page:
        console.print(f"live page: {page.url} (while the run runs)", soft_wrap=True)
        yield bus


def serve_run_page(
    directory: Path, run: str | None, port: int, console: Console, wait: Callable[[], None]
) -> None:
    """Serve the page of the run in ``directory`` from its store (and the traffic of its
    registry: ``registry/`` in it, as a coordinator's, else beside it, as a simulation's)
    until ``wait`` returns
    (Ctrl-C, SIGTERM). ConfigError if it cannot listen."""
    from fedlearn.ui.page import start_live_page

    registry = directory / "registry"  # a coordinator's state directory holds its own
    if not registry.is_dir():
        registry = directory.parent / "registry"
    endpoint = os.environ.get(ENDPOINT_ENV) or None
    with start_live_page(directory, run, port=port, registry=registry, endpoint=endpoint) as page:
        console.print(f"run page: {page.url} (until Ctrl-C)", soft_wrap=True)
        wait()
