"""Builds a real deployment on loopback for tests: PKI, site keys, allowlist, configs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedlearn.data import load_dataset, partition_dataset
from fedlearn.security.certs import write_dev_pki
from fedlearn.security.keys import (
    allowlist_entry_toml,
    generate_site_key,
    public_key_bytes,
    save_private_key,
)
from fedlearn.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
APP = "clients.tabular:make_app"
PARAMS = {"epochs": 1, "batch_size": 16, "lr": 0.1}
DATA = {"dataset": "breast_cancer", "partitioner": "iid"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _table(values: dict[str, object]) -> str:
    return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in values.items()) + " }"


def simulated_data(num_sites: int, seed: int = 0):  # type: ignore[no-untyped-def]
    return partition_dataset(load_dataset(DATA["dataset"]), DATA["partitioner"], num_sites, seed)


@dataclass
class Deployment:
    root: Path
    num_sites: int = 3
    rounds: int = 3
    seed: int = 0
    strategy: str = "fedavg"
    stage_timeout_s: float = 60.0
    min_clients: int | None = None
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pki = write_dev_pki(self.root / "pki", ["localhost", "127.0.0.1"])
        entries = []
        for i in range(self.num_sites):
            key = generate_site_key()
            save_private_key(self.root / f"site-{i}.key", key)
            entries.append(allowlist_entry_toml(f"site-{i}", public_key_bytes(key)))
        (self.root / "sites.toml").write_text("\n".join(entries))
        from clients.tabular import make_app

        app = make_app(simulated_data(self.num_sites, self.seed), **PARAMS)  # type: ignore[arg-type]
        self.initial = app.initial_arrays(self.seed)
        save_weights(self.initial, self.root / "init.safetensors")
        self.write_coordinator_config()
        for i in range(self.num_sites):
            self.write_site_config(i)

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def write_coordinator_config(self, **run: object) -> Path:
        settings: dict[str, object] = {
            "seed": self.seed,
            "rounds": self.rounds,
            "min_clients": self.min_clients or self.num_sites,
            "join_timeout_s": 60,
            "stage_timeout_s": self.stage_timeout_s,
        }
        settings.update(run)
        path = self.root / "coordinator.toml"
        path.write_text(
            f"""
[server]
address = "127.0.0.1:{self.port}"
cert = "{self.pki.server_cert}"
key = "{self.pki.server_key}"
allowlist = "{self.root / "sites.toml"}"
state_dir = "{self.state_dir}"

[run]
{chr(10).join(f"{k} = {_toml_value(v)}" for k, v in settings.items())}

[model]
weights = "{self.root / "init.safetensors"}"

[strategy]
name = "{self.strategy}"
params = {{ min_train_clients = 1 }}
"""
        )
        return path

    def write_site_config(self, i: int, key: Path | None = None, **extra: object) -> Path:
        path = self.root / f"site-{i}.toml"
        path.write_text(
            f"""
[coordinator]
address = "127.0.0.1:{self.port}"
ca = "{self.pki.ca_cert}"
backoff_initial_s = 0.2
backoff_max_s = 1.0
exit_when_finished = true

[site]
name = "site-{i}"
key = "{key or self.root / f"site-{i}.key"}"

[data]
num_clients = {self.num_sites}
seed = {self.seed}
simulated = {_table(DATA)}

[client]
app = "{APP}"
params = {_table(PARAMS | dict(extra))}
"""
        )
        return path

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlearn.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.processes.append(proc)
        return proc

    def start_coordinator(self) -> subprocess.Popen[bytes]:
        return self._spawn("server", "--config", str(self.root / "coordinator.toml"))

    def start_site(self, i: int) -> subprocess.Popen[bytes]:
        return self._spawn("client", "--config", str(self.root / f"site-{i}.toml"))

    def wait(self, proc: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, str]:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out.decode(errors="replace")

    def wait_for_port(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"coordinator did not listen on {self.port}")

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
