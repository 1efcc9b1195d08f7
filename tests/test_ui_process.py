"""The live page in its own process: the run's process only writes its events down a pipe,
keeps going whatever happens to the page, and the page's process never outlives the run."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.errors import ConfigError
from fedlearn.ui.child import follow, relay
from fedlearn.ui.events import Event, EventBus

pytest.importorskip("uvicorn")


def test_relay_keeps_each_events_time_and_order_and_skips_unreadable_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    lines = [
        json.dumps([100.5, "round_started", {"round": 1}]).encode() + b"\n",
        b"{not json\n",
        json.dumps({"at": 1}).encode() + b"\n",  # not [at, kind, data]
        json.dumps([101.25, "status", {"status": "finished", "round": 1}]).encode() + b"\n",
    ]
    with caplog.at_level(logging.WARNING, logger="fedlearn.ui"):
        assert relay(lines, bus) == 2
    assert [(e.seq, e.at, e.kind) for e in seen] == [
        (1, 100.5, "round_started"),
        (2, 101.25, "status"),
    ]
    assert seen[1].data == {"status": "finished", "round": 1}
    assert sum("unreadable event" in r.getMessage() for r in caplog.records) == 2


def test_follow_reassembles_lines_split_across_reads() -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    data = b"".join(
        json.dumps([float(i), "round_started", {"round": i}]).encode() + b"\n" for i in range(50)
    )
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb", buffering=0) as writer:
        for start in range(0, len(data), 7):  # pieces that cut lines anywhere
            writer.write(data[start : start + 7])
    try:
        first = data.index(b"\n") + 1  # as if the first line had been read already
        os.read(read_end, first)
        assert follow(read_end, bus, data[:first], gather_s=0) == 50
    finally:
        os.close(read_end)
    assert [e.data["round"] for e in seen] == list(range(50))
    assert [e.at for e in seen] == [float(i) for i in range(50)]


def test_the_runs_process_never_imports_the_web_stack_and_the_page_follows_it(
    tmp_path: Path,
) -> None:
    """A run serving its page: starlette and uvicorn stay out of its process, its events
    reach the page, and when the run is killed (-9) the page's process ends too."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from fedlearn.engine.results import RoundRecord
        from fedlearn.ui.events import EventBus
        from fedlearn.ui.page import start_live_page

        bus = EventBus()
        page = start_live_page(Path({str(tmp_path)!r}), None, bus, clients=range(3))
        bus.run_started("r", 5, 1)
        bus.round_finished(RoundRecord(1, True, 3, 3, 3, 3, duration_s=0.5))
        web = sorted(m for m in ("starlette", "uvicorn") if m in sys.modules)
        print(page.url, page.pid, ",".join(web) or "-", flush=True)
        time.sleep(60)
        """
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout is not None
        url, pid, web = run.stdout.readline().split()
        assert web == "-"  # the run's process: no web server, no interpreter lock shared
        deadline = time.monotonic() + 10
        snap = httpx.get(url + "api/snapshot", timeout=10).json()
        while snap["run"].get("status") != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
            snap = httpx.get(url + "api/snapshot", timeout=10).json()
        assert snap["run"]["status"] == "running" and snap["run"]["rounds"] == 5
        assert [c["client"] for c in snap["clients"]] == [0, 1, 2]
        run.send_signal(signal.SIGKILL)
        run.wait(10)
        deadline = time.monotonic() + 10
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(int(pid)), "the page's process outlived the run"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (the killed run was its parent) has ended too
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_page_process_that_dies_costs_the_run_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedlearn.ui.page import start_live_page

    bus = EventBus()
    page = start_live_page(tmp_path, None, bus, clients=range(2))
    os.kill(page.pid, signal.SIGKILL)
    page.process.wait(10)
    record = ClientRecord(1, Stage.TRAIN, 0, True, 10, 0.5, {"accuracy": 0.5})
    with caplog.at_level(logging.WARNING, logger="fedlearn.ui"):
        for _ in range(2000):  # the run goes on emitting; nothing raises, nothing blocks
            bus.reply_received(record)
        bus.round_finished(RoundRecord(1, True, 2, 2, 2, 2))
    warnings = [r for r in caplog.records if "stopped following the run" in r.getMessage()]
    assert len(warnings) == 1
    t0 = time.monotonic()
    page.stop()
    assert time.monotonic() - t0 < 5


def test_a_taken_port_is_a_config_error_and_leaves_no_process(tmp_path: Path) -> None:
    from fedlearn.ui.page import start_live_page

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = _children()
        with pytest.raises(ConfigError, match=f"could not listen on 127.0.0.1:{port}"):
            start_live_page(tmp_path, None, EventBus(), port=port)
        assert _children() == before


def _children() -> set[int]:
    """This process's live children (from /proc)."""
    me, out = os.getpid(), set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                out.add(int(entry.name))
    return out
