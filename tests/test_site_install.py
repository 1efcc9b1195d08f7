"""A site operator's install, the core only (``pip install 'fedlearn[site]'``), really works.

``scripts/setup.sh test`` makes ``.venv-site`` with torch and ``-e '.[site]'``: no serving,
plots or scikit-learn. From that venv alone: the CLI, dev PKI and site keys, a TLS
coordinator on 127.0.0.1 and two site daemons reading their own ``.npz`` files run two
rounds; the coordinator (no scipy) ends with the model the in-process simulation (this
venv, all extras) makes, and ``fedlearn report`` writes JSON/CSV and skips the plots.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.tabular import build_model, make_app
from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights, save_weights
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy

ROOT = Path(__file__).resolve().parents[1]
SITE_VENV = ROOT / ".venv-site"
BIN = SITE_VENV / "bin"
#: what the core install must not contain (the extras' modules, and what they pull in)
NOT_INSTALLED = ("sklearn", "scipy", "matplotlib", "starlette", "uvicorn", "pandas")
SITES = 2
ROUNDS = 2
# hidden=600: 30 x 600 weights, past WeightedMeanFold.AXPY_MIN, so the coordinator's fold
# takes its no-scipy path
PARAMS: dict[str, object] = {"epochs": 1, "batch_size": 16, "lr": 0.1, "hidden": 600}


@pytest.fixture(scope="module")
def site_bin() -> Path:
    if not (BIN / "fedlearn").is_file():
        pytest.fail(f"{SITE_VENV} is missing: run scripts/setup.sh test")
    return BIN


def _env() -> dict[str, str]:
    """The site venv's own environment: nothing from this one leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"PYTHONNOUSERSITE": "1", "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


def _run(*args: str | Path, timeout: float = 60) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_core_install_has_no_extra(site_bin: Path) -> None:
    code = (
        "import importlib.util as u\n"
        f"for m in {(*NOT_INSTALLED, 'torch', 'grpc', 'fedlearn')!r}:\n"
        "    print(m, u.find_spec(m) is not None)\n"
    )
    found = dict(line.split() for line in _run(site_bin / "python", "-c", code).splitlines())
    assert found == {m: "False" for m in NOT_INSTALLED} | {
        "torch": "True",
        "grpc": "True",
        "fedlearn": "True",
    }


def test_client_help(site_bin: Path) -> None:
    out = _run(site_bin / "fedlearn", "client", "--help")
    assert "Usage: fedlearn client" in out and "site.toml" in out


def test_serve_names_its_extra(site_bin: Path) -> None:
    done = subprocess.run(
        [str(site_bin / "fedlearn"), "serve"], cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "fedlearn serve needs the serve extra: pip install 'fedlearn[serve]'" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_loopback_round_from_the_site_install(
    site_bin: Path, tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    # the sites' own files: breast_cancer split in two (made here: the site venv has no sklearn)
    data = partition_dataset(load_dataset("breast_cancer"), "iid", SITES, seed=0)
    for i in range(SITES):
        part = data.client(i)
        np.savez(
            tmp_path / f"site-{i}.npz",
            x_train=part.x_train,
            y_train=part.y_train,
            x_test=part.x_test,
            y_test=part.y_test,
        )
    torch.manual_seed(0)
    initial = model_to_arrays(build_model(30, 2, int(PARAMS["hidden"])))  # type: ignore[call-overload]
    save_weights(initial, tmp_path / "init.safetensors")

    fedlearn = site_bin / "fedlearn"
    pki = tmp_path / "pki"
    _run(fedlearn, "certs", "dev", "--out", pki, "--host", "127.0.0.1")
    entries = []
    for i in range(SITES):
        out = _run(fedlearn, "keys", "generate", "--out", tmp_path / f"site-{i}.key", "--name",
                   f"site-{i}")  # fmt: skip
        entries.append(out[out.index("[[site]]") :])
    (tmp_path / "sites.toml").write_text("\n".join(entries))

    port = _free_port()
    state = tmp_path / "state"
    (tmp_path / "coordinator.toml").write_text(
        f"""
[server]
address = "127.0.0.1:{port}"
cert = "{pki / "server.pem"}"
key = "{pki / "server.key"}"
allowlist = "{tmp_path / "sites.toml"}"
state_dir = "{state}"

[run]
name = "site-install"
seed = 0
rounds = {ROUNDS}
min_clients = {SITES}
join_timeout_s = 60
stage_timeout_s = 60

[model]
weights = "{tmp_path / "init.safetensors"}"

[strategy]
name = "fedavg"
params = {{ min_train_clients = {SITES} }}
"""
    )
    params = ", ".join(f"{k} = {v}" for k, v in PARAMS.items())
    for i in range(SITES):
        (tmp_path / f"site-{i}.toml").write_text(
            f"""
[coordinator]
address = "127.0.0.1:{port}"
ca = "{pki / "ca.pem"}"
backoff_initial_s = 0.1
backoff_max_s = 0.5
exit_when_finished = true

[site]
name = "site-{i}"
key = "{tmp_path / f"site-{i}.key"}"

[data]
path = "{tmp_path / f"site-{i}.npz"}"

[client]
app = "clients.tabular:make_app"
params = {{ {params} }}
"""
        )

    def spawn(*args: str | Path) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [str(fedlearn), *map(str, args)],
            cwd=ROOT,  # clients.tabular is imported from the working directory
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        processes.append(proc)
        return proc

    coordinator = spawn("server", "--config", tmp_path / "coordinator.toml")
    sites = [spawn("client", "--config", tmp_path / f"site-{i}.toml") for i in range(SITES)]
    out, _ = coordinator.communicate(timeout=120)
    assert coordinator.returncode == 0, out
    assert f"run finished: {ROUNDS} rounds" in out
    for site in sites:
        site_out, _ = site.communicate(timeout=30)
        assert site.returncode == 0, site_out
        assert "tasks answered" in site_out

    store = RunStore(state / "run.db", run_id="site-install")
    try:
        rounds = store.rounds()
    finally:
        store.close()
    assert [(r.round, r.ok, r.train_ok) for r in rounds] == [(1, True, 2), (2, True, 2)]
    final = load_weights(state / "model.safetensors")

    # the same run simulated in this venv (with every extra) gives the same model, bit for bit
    simulated = run_simulation(
        lambda: make_app(data, **PARAMS),
        build_strategy("fedavg", {"min_train_clients": SITES}),
        num_clients=SITES,
        rounds=ROUNDS,
        initial_arrays=initial,
        seed=0,
    ).arrays
    assert list(final) == list(simulated)
    for name, value in final.items():
        assert value.tobytes() == simulated[name].tobytes(), name

    # the report without matplotlib: JSON and CSV, the plots skipped with a note
    report = _run(fedlearn, "report", state)
    assert "plots skipped: install fedlearn[report]" in report
    assert (state / "report.json").is_file() and (state / "rounds.csv").is_file()
    assert not list(state.glob("*.png"))
