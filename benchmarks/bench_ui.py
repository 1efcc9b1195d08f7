"""Round time with the live page open versus closed, in the same run (issue 14, acceptance 3).

One simulation runs with the live page served (``fedlearn simulate --ui`` does the same).
Its rounds alternate, in blocks, between the page *open* (a real headless Chromium showing
it, through Playwright, or with ``--client sse`` a plain server-sent-events client in its
own process that reads and parses every event; or, as a control, ``--client burn``: no
viewer, a process that only burns a few % of a CPU) and *closed* (nobody connected); blocks go
closed, open, open, closed, ... so that drift in the machine's load falls on both sides. The page is
opened and closed between rounds, outside the measured time. A round's time is the
coordinator's own ``duration_s`` (training and evaluation); the first round after each
switch is left out on both sides (it pays for the page's load, or its last drawing), and
so is the warm-up. Prints the median round time of each side (with the CPU time per round
of the run's process, which other work on the machine disturbs less, and of the page's
own process), the run's CPU cost of one event on its way to the page, and
``open/closed = X`` (goal: at most 1.02).

Usage (from the repo root)::

    python benchmarks/bench_ui.py [--clients 20 --rounds 121 --block 5 --epochs 10 --client browser]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
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
from fedlearn.ui.events import EventBus  # noqa: E402
from fedlearn.ui.page import LivePage, start_live_page  # noqa: E402


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


SSE_READER = """
import json, sys, httpx
url = sys.argv[1]
httpx.get(url + "api/snapshot").json()
with httpx.Client(timeout=None) as http, http.stream("GET", url + "api/events") as response:
    print("connected", flush=True)
    for line in response.iter_lines():
        if line.startswith("data: "):
            json.loads(line[6:])
"""


class ProcessViewer:
    """A viewer that is one Python process running ``script`` with ``args``; it prints
    ``connected`` once it watches, and runs on ``cpus`` when set."""

    def __init__(self, script: str, *args: str) -> None:
        self.script = script
        self.args = args
        self.proc: subprocess.Popen[str] | None = None
        self.cpus: set[int] | None = None

    def open(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.script, *self.args], stdout=subprocess.PIPE, text=True
        )
        if self.cpus is not None:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "connected":
            raise SystemExit("the viewer could not connect")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def shutdown(self) -> None:
        self.close()


def sse_viewer(url: str) -> ProcessViewer:
    """A server-sent-events client in its own process (as a page is): it loads the
    snapshot, then reads and parses every event until it is stopped."""
    return ProcessViewer(SSE_READER, url)


BURNER = """
import sys, time
duty, period = float(sys.argv[1]), 0.05
print("connected", flush=True)
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < duty * period:
        pass
    time.sleep(period * (1 - duty))
"""


def burner(duty: float) -> ProcessViewer:
    """The control (``--client burn``): no page at all, a process that keeps a CPU busy for
    ``duty`` of every 50 ms while "open" -- what any small process beside the run costs it
    on this machine."""
    return ProcessViewer(BURNER, str(duty))


def children_cpu() -> float:
    """CPU seconds used so far by this process's descendants that still run (the
    Playwright driver and Chromium's processes), from /proc (0 where there is none)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return 0.0
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
    me, total = os.getpid(), 0
    for pid in ticks:
        p = parents.get(pid, 0)
        while p > 1 and p != me:
            p = parents.get(p, 0)
        if p == me:
            total += ticks[pid]
    return total / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (0 where /proc cannot say)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        """round -> (page open, wall seconds, CPU seconds of the run's process)"""
        self.server: dict[int, float] = {}
        """round -> CPU seconds of the page's process"""
        self.browser: dict[int, float] = {}
        """round -> the viewer's CPU seconds during it (its own processes)"""
        self._marks = self._now()

    def _now(self) -> tuple[float, float, float]:
        server = process_cpu(self.page.pid)
        return time.process_time(), server, children_cpu() - server

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
        cpu, server, viewer = self._now()
        self.rounds[record.round] = (self.open, record.duration_s, cpu - self._marks[0])
        self.server[record.round] = server - self._marks[1]
        self.browser[record.round] = viewer - self._marks[2]
        wanted = self.want_open(record.round + 1)
        if wanted and not self.open:
            self.viewer.open()
        elif not wanted and self.open:
            self.viewer.close()
        self.open = wanted
        self._marks = self._now()

    def measured(self, rnd: int) -> bool:
        """Past the warm-up and not the first round after the page opened or closed
        (that one pays for the page's load, or for its last drawing)."""
        return rnd > self.warmup + 1 and self.want_open(rnd) == self.want_open(rnd - 1)


def event_costs(clients: int, n: int = 20_000) -> tuple[float, float, float]:
    """CPU seconds, in the emitting thread, per client event (one reply) with no
    subscriber and with a live page's process following the bus; and per round's end
    (the round's row, from ``clients`` evaluations) with the page following."""
    bus = EventBus()
    record = ClientRecord(1, Stage.EVALUATE, 3, True, 50, 0.31, {"accuracy": 0.9})
    t0 = time.process_time()
    for _ in range(n):
        bus.reply_received(record)
    nobody = (time.process_time() - t0) / n
    out = Path(tempfile.mkdtemp(prefix="bench-ui-events-"))
    with start_live_page(out, None, bus, clients=range(clients)):
        t0 = time.thread_time()
        for i in range(n):
            bus.reply_received(record)
            if i % 100 == 99:
                time.sleep(0.001)  # a run's replies come spread out; the pipe drains
        piped = (time.thread_time() - t0) / n
        ends = 200
        total = 0.0
        for rnd in range(2, ends + 2):
            for cid in range(clients):
                metrics = {"accuracy": 0.9 - cid / 1000}
                bus.reply_received(ClientRecord(rnd, Stage.EVALUATE, cid, True, 50, 0.3, metrics))
            t0 = time.thread_time()
            bus.round_finished(RoundRecord(rnd, True, clients, clients, clients, clients))
            total += time.thread_time() - t0
            time.sleep(0.002)
    shutil.rmtree(out, ignore_errors=True)
    return nobody, piped, total / ends


def paired_ratio(
    alternate: Alternate, kept: dict[int, tuple[bool, float, float]], seed: int, draws: int = 4000
) -> tuple[float, float, float]:
    """Each open block's median round over that of the closed block beside it (blocks go
    closed, open, open, closed, ...: every open block has one closed neighbour), so that the
    machine's slow drift cancels within a pair; returns the median of those ratios and a
    95 % bootstrap interval of it (pairs resampled)."""
    blocks: dict[int, list[float]] = {}
    for rnd, (_, duration, _) in kept.items():
        blocks.setdefault((rnd - alternate.warmup - 1) // alternate.block, []).append(duration)
    ratios = []
    for k, durations in blocks.items():
        if k % 4 in (1, 2):  # open; its closed neighbour is k - 1 (k % 4 == 1) or k + 1
            other = blocks.get(k - 1 if k % 4 == 1 else k + 1)
            if other:
                ratios.append(statistics.median(durations) / statistics.median(other))
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return statistics.median(ratios), medians[draws // 40], medians[draws - 1 - draws // 40]


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
    parser.add_argument(
        "--workload",
        choices=["tabular", "mnist"],
        default="tabular",
        help="tabular: breast_cancer and the MLP (rounds of 0.05-0.5 s); mnist: the main job "
        "(MNIST-5k and the CNN, rounds of about a second)",
    )
    parser.add_argument(
        "--epochs", type=int, default=10, help="local epochs of the tabular workload"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the run on the first CPU, the page's process and the viewer on the others",
    )
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--client", choices=["browser", "sse", "burn"], default="browser")
    parser.add_argument(
        "--burn-duty", type=float, default=0.03, help="--client burn: the share of a CPU it uses"
    )
    parser.add_argument("--screenshot", type=Path, help="a screenshot of the open page")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's threads (1: no spinning threads blur the CPU times on a shared machine)",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)

    os.chdir(REPO)
    out = Path(tempfile.mkdtemp(prefix="bench-ui-")) / "run"
    overrides: dict[str, Any] = {
        "run.name": "bench-ui",
        "run.rounds": args.rounds,
        "run.clients": args.clients,
        "run.out_dir": str(out),
        "backend.kind": "inprocess",
        "publish.enabled": False,
    }
    if args.workload == "tabular":
        overrides |= {
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "clients.tabular:make_app",
            "client.params": {"epochs": args.epochs, "batch_size": 16, "lr": 0.05},
            "strategy.params.min_train_clients": 1,
        }
    config = load_config(None, overrides)  # mnist: the main job's defaults
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:
        if len(cpus) < 2:
            raise SystemExit("--pin needs two CPUs")
        os.sched_setaffinity(0, cpus[1:])  # what starts now (page, browser) runs there
    bus = EventBus()
    page = start_live_page(out, "bench-ui", bus, clients=range(args.clients))
    if args.client == "browser":
        executable = chromium()
        if executable is None:
            raise SystemExit("no Chromium found: apt-get install chromium, or use --client sse")
        viewer: Any = BrowserViewer(page.url, executable, args.screenshot)
    elif args.client == "burn":
        viewer = burner(args.burn_duty)
    else:
        viewer = sse_viewer(page.url)
    if args.pin:
        os.sched_setaffinity(0, cpus[:1])  # the run
        viewer.cpus = set(cpus[1:])
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
    how = {
        "browser": "in headless Chromium",
        "sse": "as an SSE client",
        "burn": f"never opened: a process burning {args.burn_duty:.0%} of a CPU instead",
    }[args.client]
    print(
        f"{args.clients} clients, {args.rounds} rounds ({args.warmup} warm-up), blocks of "
        f"{args.block}, {args.torch_threads} torch thread(s), page {how}, {wall:.0f} s"
    )
    print(
        f"page open:   {len(opened)} rounds, median {m_open * 1000:.1f} ms "
        f"(the run's process: CPU {cpu_open * 1000:.1f} ms)"
    )
    print(
        f"page closed: {len(closed)} rounds, median {m_closed * 1000:.1f} ms "
        f"(the run's process: CPU {cpu_closed * 1000:.1f} ms)"
    )
    print(f"the run's process's CPU per round open/closed = {cpu_open / cpu_closed:.3f}")
    served = [
        statistics.mean(alternate.server[r] for r, v in kept.items() if v[0] is o)
        for o in (True, False)
    ]
    print(
        f"the page's own process, CPU per round (mean): {served[0] * 1e3:.1f} ms open, "
        f"{served[1] * 1e3:.1f} ms closed"
    )
    spent = [alternate.browser[r] for r, v in kept.items() if v[0]]
    viewer_is = {"browser": "Playwright's driver and Chromium", "sse": "the client"}.get(
        args.client, "the burner"
    )
    print(
        f"the viewer's own CPU per open round: median {statistics.median(spent) * 1e3:.0f} ms "
        f"({viewer_is}, other processes)"
    )
    nobody, piped, ending = event_costs(args.clients)
    events = 2 * args.clients + 4  # a reply per task, 2 stages, a round's start and end
    cost = (events - 1) * piped + ending
    print(
        f"the run's CPU per client event: {nobody * 1e9:.0f} ns with no subscriber, "
        f"{piped * 1e6:.1f} µs with the page's process following (open or closed alike); "
        f"a round's end {ending * 1e6:.0f} µs; a round ({events} events) {cost * 1e3:.2f} ms "
        f"= {cost / m_closed * 100:.2f} % of a closed round"
    )
    ratio, low, high = paired_ratio(alternate, kept, args.seed)
    print(
        f"pairs of neighbouring open and closed blocks: median ratio {ratio:.3f}, "
        f"95 % bootstrap interval {low:.3f}-{high:.3f}"
    )
    print(f"open/closed = {m_open / m_closed:.3f}")


if __name__ == "__main__":
    main()
