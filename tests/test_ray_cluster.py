"""The Ray backend joins a separately started Ray head at ``backend.address``.

The head is ``ray start --head`` in a private temp dir on a free port; afterwards the
processes it started (found by a marker in their environment) are stopped by pid.
``ray stop`` is never run: it would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.peer_workload import PeerLogReg
from fedlearn.simulation import run_simulation
from fedlearn.simulation.ray_session import INSTALL_HINT, use_private_token
from fedlearn.simulation.ray_transport import RayTransport
from fedlearn.strategy import Strategy

pytestmark = pytest.mark.xdist_group("ray")
ROOT = Path(__file__).resolve().parents[1]
MARKER = "FEDLEARN_TEST_RAY_HEAD"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_marked(value: str) -> list[int]:
    """Pids of the processes whose environment holds ``MARKER=value``."""
    needle = f"{MARKER}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
    return found


def _stop(value: str) -> list[int]:
    """SIGTERM, then SIGKILL, the marked processes; those still alive after both. (The
    GCS server takes its time over a SIGTERM: a test does not wait for it.)"""
    pids = _pids_marked(value)
    for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            pids = [p for p in _pids_marked(value) if p in pids]
            time.sleep(0.1)
    return pids


@dataclass(frozen=True)
class Head:
    address: str
    temp_dir: str


@pytest.fixture
def ray_head() -> Iterator[Head]:
    if importlib.util.find_spec("ray") is None:
        pytest.skip(f"the ray extra is not installed ({INSTALL_HINT})")
    use_private_token()  # the head and this process (the driver) share one token
    temp_dir = tempfile.mkdtemp(prefix="fl-rayhead-")
    port = _free_port()
    env = {
        **os.environ,
        MARKER: temp_dir,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    env.pop("RAY_ADDRESS", None)
    ray_cli = Path(sys.executable).with_name("ray")
    command = [
        str(ray_cli),
        "start",
        "--head",
        f"--temp-dir={temp_dir}",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--disable-usage-stats",
    ]
    try:
        started = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=120, cwd=temp_dir
        )
        assert started.returncode == 0, started.stdout + started.stderr
        yield Head(f"127.0.0.1:{port}", temp_dir)
    finally:
        left = _stop(temp_dir)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
        assert not left, f"Ray head processes still alive: {left}"


def test_a_run_joins_a_separately_started_ray_head(ray_head: Head) -> None:
    transport = RayTransport(PeerLogReg, run_id="joined", address=ray_head.address)
    assert transport.num_actors == 2  # the head's CPUs, one per actor
    session = transport.session
    assert session.owned and session.temp_dir is None  # the head keeps its own temp dir
    settings = {"num_clients": 20, "rounds": 2, "seed": 0}
    joined = run_simulation(PeerLogReg, Strategy(), backend=transport, **settings)  # type: ignore[arg-type]
    assert not session.owned  # closed: disconnected, the head still runs
    assert _pids_marked(ray_head.temp_dir)  # the head's processes are left running
    local = run_simulation(PeerLogReg, Strategy(), **settings)  # type: ignore[arg-type]
    for name in local.arrays:
        assert joined.arrays[name].tobytes() == local.arrays[name].tobytes()
    assert all(c.ok for c in joined.clients)
