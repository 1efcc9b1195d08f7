"""``fedlearn simulate`` stopped by Ctrl-C or SIGTERM mid-run, then resumed by the hint.

Ctrl-C reaches a terminal's whole process group, pool workers included, so the test
sends SIGINT to the group. The command must stop at a clean point (the last committed
round), print one hint line and no traceback, exit 130 (143 for SIGTERM), and the
hinted command must finish the run to the model an uninterrupted run makes.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedlearn.config.simulation import load_config
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.run.job import run_job
from run_state import committed_round

ROOT = Path(__file__).resolve().parents[1]
RUN = "mnist-fedavg"
SLOW_ROUND = 3
SETTINGS = {
    "run.rounds": 8,
    "run.clients": 8,
    "data.dataset": "breast_cancer",
    "data.partitioner": "iid",
    # a numpy app (fast to start); every client sleeps in one round, so the signal lands
    # in the middle of the run
    "client.app": "fault_apps:make_app",
    "client.params": {"sleep_round": SLOW_ROUND, "sleep_s": 0.25},
    "strategy.params.min_train_clients": 2,
    "publish.enabled": False,
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlearn.cli", *args]


def _start(out: Path) -> subprocess.Popen[str]:
    sets = _sets(SETTINGS)
    return subprocess.Popen(
        _cli("simulate", "--out", str(out), "--backend", "pool", "--workers", "2", *sets),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives it
        env=_env(),
    )


def _sets(settings: dict[str, object]) -> list[str]:
    """``--set key=value`` arguments, tables as TOML inline tables."""
    out = []
    for key, value in settings.items():
        if isinstance(value, dict):
            value = "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"
        out += ["--set", f"{key}={value}"]
    return out


def _env() -> dict[str, str]:
    # tests/ on the path: the app is tests/fault_apps.py
    return dict(os.environ, COLUMNS="200", PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")


def _wait_for_a_round(proc: subprocess.Popen[str], db: Path) -> None:
    deadline = time.monotonic() + 120
    while committed_round(db, RUN) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no round committed in time"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("signum", "to_group", "code"),
    [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_an_interrupted_simulation_stops_cleanly_and_the_hint_finishes_it(
    tmp_path: Path, signum: signal.Signals, to_group: bool, code: int
) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    try:
        _wait_for_a_round(proc, out / "run.db")
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, stdout + stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    hint = re.search(r"interrupted after round (\d+); continue with: (.+)", stdout)
    assert hint is not None, stdout
    committed = int(hint.group(1))
    assert 1 <= committed < SETTINGS["run.rounds"]
    assert hint.group(2).strip() == f"fedlearn simulate --out {out} --resume"
    store = RunStore(out / "run.db", run_id=RUN)
    assert store.run_info()["status"] == "interrupted"
    assert [r.round for r in store.rounds()] == list(range(1, committed + 1))
    store.close()

    again = shlex.split(hint.group(2))
    assert again[0] == "fedlearn"
    resumed = subprocess.run(
        _cli(*again[1:]), cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env()
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resuming after committed round {committed}" in resumed.stdout

    reference = tmp_path / "reference"
    settings = {**SETTINGS, "run.out_dir": str(reference), "backend.kind": "inprocess"}
    settings["client.params"] = {}  # sleeping changes no model
    config = load_config(None, settings)
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        run_job(config)
    finally:
        os.chdir(cwd)
    a, b = load_weights(reference / "model.safetensors"), load_weights(out / "model.safetensors")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a) and list(a) == list(b)


def test_resume_of_a_finished_run_says_so_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from fedlearn.cli.main import app

    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    out = tmp_path / "run"
    sets = _sets({**SETTINGS, "run.rounds": 1, "client.params": {}})
    first = runner.invoke(app, ["simulate", "--out", str(out), "--backend", "inprocess", *sets])
    assert first.exit_code == 0, first.output
    model = (out / "model.safetensors").read_bytes()
    again = runner.invoke(app, ["simulate", "--out", str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert "is already finished (1 rounds)" in again.output
    assert (out / "model.safetensors").read_bytes() == model
    store = RunStore(out / "run.db", run_id=RUN, read_only=True)
    assert store.run_info()["status"] == "finished"
    assert [e.kind for e in store.events()] == ["started", "finished"]
    store.close()
    refused = runner.invoke(app, ["simulate", "--out", str(out), "--resume", "--set", "run.seed=5"])
    assert refused.exit_code == 2
    assert "run.seed: 0 -> 5" in refused.output
