"""Round time with the live page open versus closed, in the same run (issue 14, acceptance 3).

One simulation runs with the live page served (``fedlearn simulate --ui`` does the same).
Its rounds alternate, in blocks, between the page *open* (a real headless Chromium showing
it, through Playwright, or with ``--client sse`` a plain server-sent-events client that
reads and parses every event) and *closed* (nobody connected); blocks go closed, open,
open, closed, ... so that drift in the machine's load falls on both sides. The page is
opened and closed between rounds, outside the measured time. A round's time is the
coordinator's own ``duration_s`` (training and evaluation); the first round after each
switch is left out on both sides (it pays for the page's load, or its last drawing), and
so is the warm-up. Prints the median round time of each side (and of this process's CPU
time per round, which other work on the machine disturbs less) and ``open/closed = X``
(goal: at most 1.02).

Usage (from the repo root)::

    python benchmarks/bench_ui.py [--clients 20 --rounds 121 --block 5 --epochs 10 --client browser]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(REPO))

from fedlearn.config.simulation import load_config  # noqa: E402
from fedlearn.engine.messages import Stage  # noqa: E402
from fedlearn.engine.results import ClientRecord, RoundRecord  # noqa: E402
from fedlearn.run.job import run_job  # noqa: E402
from fedlearn.ui.app import LivePage, start_live_page  # noqa: E402
from fedlearn.ui.events import EventBus  # noqa: E402


class BrowserViewer:
    """The page in headless Chromium (one browser, a new page each time it opens)."""

    def __init__(self, url: str, executable: str, screenshot: Path | None) -> None:
        from playwright.sync_api import sync_playwright

        self.url = url
        self.screenshot = screenshot
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=executable, headless=True)
        self.page: Any = None

    def open(self) -> None:
        self.page = self.browser.new_page(viewport={"width": 1280, "height": 800})
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-status=running]", timeout=10_000)

    def close(self) -> None:
        if self.screenshot is not None:
            self.page.screenshot(path=str(self.screenshot))
            self.screenshot = None
        self.page.close()

    def shutdown(self) -> None:
        self.browser.close()
        self._pw.stop()


class SseViewer:
    """A server-sent-events client in a thread: reads and parses every event."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        import json

        import httpx

        self._stop.clear()
        connected = threading.Event()

        def read() -> None:
            with (
                httpx.Client(timeout=None) as http,
                http.stream("GET", self.url + "api/events") as response,
            ):
                connected.set()
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        json.loads(line[6:])
                        self.events += 1
                    if self._stop.is_set():
                        return

        httpx.get(self.url + "api/snapshot").json()
        self._thread = threading.Thread(target=read, daemon=True)
        self._thread.start()
        connected.wait(10)

    def close(self) -> None:
        self._stop.set()  # the reader returns at its next event

    def shutdown(self) -> None:
        self.close()


class Alternate:
    """An Observer that opens and closes the page between rounds, and records which
    rounds ran with it open."""

    def __init__(self, viewer: Any, page: LivePage, block: int, warmup: int) -> None:
        self.viewer = viewer
        self.page = page
        self.block = block
        self.warmup = warmup
        self.open = False
        self.rounds: dict[int, tuple[bool, float, float]] = {}
        """round -> (page open, wall seconds, this process's CPU seconds)"""
        self._cpu = time.process_time()

    def want_open(self, rnd: int) -> bool:
        """Blocks after the warm-up: closed, open, open, closed, closed, open, ..."""
        if rnd <= self.warmup:
            return False
        k = (rnd - self.warmup - 1) // self.block
        return k % 4 in (1, 2)

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        pass

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        cpu = time.process_time()
        self.rounds[record.round] = (self.open, record.duration_s, cpu - self._cpu)
        wanted = self.want_open(record.round + 1)
        if wanted and not self.open:
            self.viewer.open()
        elif not wanted and self.open:
            self.viewer.close()
            deadline = time.monotonic() + 5
            while self.page.state.listeners and time.monotonic() < deadline:
                time.sleep(0.01)
        self.open = wanted
        self._cpu = time.process_time()

    def measured(self, rnd: int) -> bool:
        """Past the warm-up and not the first round after the page opened or closed
        (that one pays for the page's load, or for its last drawing)."""
        return rnd > self.warmup + 1 and self.want_open(rnd) == self.want_open(rnd - 1)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=121)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10, help="local epochs (round length)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--client", choices=["browser", "sse"], default="browser")
    parser.add_argument("--screenshot", type=Path, help="a screenshot of the open page")
    args = parser.parse_args()

    os.chdir(REPO)
    out = Path(tempfile.mkdtemp(prefix="bench-ui-")) / "run"
    config = load_config(
        None,
        {
            "run.name": "bench-ui",
            "run.rounds": args.rounds,
            "run.clients": args.clients,
            "run.out_dir": str(out),
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "clients.tabular:make_app",
            "client.params": {"epochs": args.epochs, "batch_size": 16, "lr": 0.05},
            "strategy.params.min_train_clients": 1,
            "backend.kind": "inprocess",
            "publish.enabled": False,
        },
    )
    bus = EventBus()
    page = start_live_page(out, "bench-ui", bus, clients=range(args.clients))
    if args.client == "browser":
        executable = chromium()
        if executable is None:
            raise SystemExit("no Chromium found: apt-get install chromium, or use --client sse")
        viewer: Any = BrowserViewer(page.url, executable, args.screenshot)
    else:
        viewer = SseViewer(page.url)
    alternate = Alternate(viewer, page, args.block, args.warmup)
    t0 = time.perf_counter()
    try:
        run_job(config, alternate, events=bus)
    finally:
        viewer.shutdown()
        page.stop()
    wall = time.perf_counter() - t0
    kept = {r: v for r, v in alternate.rounds.items() if alternate.measured(r)}
    opened = [d for o, d, _ in kept.values() if o]
    closed = [d for o, d, _ in kept.values() if not o]
    cpu_open = statistics.median(c for o, _, c in kept.values() if o)
    cpu_closed = statistics.median(c for o, _, c in kept.values() if not o)
    m_open, m_closed = statistics.median(opened), statistics.median(closed)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    how = "in headless Chromium" if args.client == "browser" else "as an SSE client"
    print(
        f"{args.clients} clients, {args.rounds} rounds ({args.warmup} warm-up), blocks of "
        f"{args.block}, page {how}, {wall:.0f} s"
    )
    print(
        f"page open:   {len(opened)} rounds, median {m_open * 1000:.1f} ms "
        f"(this process's CPU {cpu_open * 1000:.1f} ms)"
    )
    print(
        f"page closed: {len(closed)} rounds, median {m_closed * 1000:.1f} ms "
        f"(this process's CPU {cpu_closed * 1000:.1f} ms)"
    )
    print(f"CPU per round open/closed = {cpu_open / cpu_closed:.3f}")
    print(f"open/closed = {m_open / m_closed:.3f}")


if __name__ == "__main__":
    main()
