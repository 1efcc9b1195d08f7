"""fedlearn's deployment (coordinator + site daemons over gRPC) measured three ways.

(a) ``--parts a``: the Flower peer workload (``shared/peers/flower/sim_bench.py``; here
    :mod:`benchmarks.peer_site`) in deployment mode, 10 sites x 5 rounds, in the same run:

    * fedlearn: ``fedlearn server`` + 10 ``fedlearn client`` processes over TLS on loopback
      (dev PKI, Ed25519 site keys, allowlist; each site reads its own ``.npz``);
    * Flower 1.42: ``flower-superlink --insecure`` + 10 ``flower-supernode --insecure`` and
      ``flwr run`` of a Flower app built in a temp dir from sim_bench.py's ClientApp and
      ServerApp (private ``FLWR_HOME``, telemetry and update checks off).

    Wall time from the first process start to the final model: fedlearn's coordinator has
    written ``model.safetensors``, Flower's ServerApp has written its result file (the
    files' mtimes). The times to the coordinator's and ``flwr run``'s exit are printed too.
    Prints ``deploy fedlearn/flower = X (Y x faster)``; with ``--skip-flower`` the ratio is
    against the peer README's 139.6 s, labelled as not measured in the same run.

(b) ``--parts b``: a 1 GiB model through fedlearn's wire path versus raw grpcio in the same
    run. A coordinator process hosts the real deployment pieces (``start_server``,
    ``CoordinatorServicer``, ``ClientRegistry``, ``GrpcTransport``) and pushes one task to
    one ``SiteClient`` in another process, whose app echoes the arrays back. Download =
    ``transport.execute`` called -> app's ``train`` entered; upload = ``train`` returned ->
    the reply is yielded by the transport (both processes read ``time.monotonic``, one
    clock system-wide). The floor is grpc_bench.py's: raw grpcio with bytes serializers,
    client-streaming (upload) and server-streaming (download) of the same bytes in 5 MiB
    chunks, measured before and after fedlearn; also shown: raw plus the one copy into a
    fresh buffer that any receiver keeping the model needs. Prints ``upload fedlearn/raw``
    and ``download fedlearn/raw`` (throughput ratios) and the coordinator process's peak
    RSS (``VmHWM``) over the model size. ``--full-coordinator``
    measures the peak RSS of a whole ``run_coordinator`` round (fold, SQLite checkpoint and
    final save included) with a ``--full-model-mib`` model.

(c) ``--parts c``: round overhead with 100 connected sites and a tiny model: one
    ``run_coordinator`` process and 100 ``SiteClient`` threads spread over
    ``--overhead-procs`` processes. Per round: coordinator wall time between consecutive
    round ends minus the clients' own compute (measured inside the app), median over
    rounds 2..R, with the CPU time of the coordinator and site processes. The floor is raw
    grpcio with the same streams and message pattern (``--skip-raw-floor`` to skip).

Usage (from the repo root)::

    python benchmarks/bench_deploy_vs_flower.py                       # a, b, c
    python benchmarks/bench_deploy_vs_flower.py --parts a --fed-reps 5
    python benchmarks/bench_deploy_vs_flower.py --parts a --skip-flower   # vs README figure
    python benchmarks/bench_deploy_vs_flower.py --parts b --model-mib 256 --wire-tls both
    python benchmarks/bench_deploy_vs_flower.py --parts b --wire-tls on --wire-reps 3
    python benchmarks/bench_deploy_vs_flower.py --parts b --variants "" --full-coordinator
    python benchmarks/bench_deploy_vs_flower.py --parts c --overhead-clients 100 --profile

Every process this script starts is stopped by its pid (with the descendants it started,
found through ``/proc``); nothing is stopped by name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.peers import flower_peer_dir  # noqa: E402

DEFAULT_FLOWER_VENV = REPO / ".peer-venv-flower"
FLOWER_DIR = flower_peer_dir()
README_FLOWER_DEPLOY_S = 139.6
"""Flower deployment, 10 clients x 5 rounds, from shared/peers/flower/README.md."""
MIB = 1 << 20


# =========================================================================== processes
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, poll: float = 0.01) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port`` within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(poll)
    return False


def descendants(pid: int) -> list[int]:
    """Pids of every live process below ``pid`` (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_tree(procs: Sequence[subprocess.Popen[Any]], grace: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, the given processes and their descendants, by pid.

    Returns how many had to be killed. Only processes this script started (and what they
    started) are touched.
    """
    pids: list[int] = []
    for proc in procs:
        if proc.poll() is None:
            pids.append(proc.pid)
        pids.extend(descendants(proc.pid))
    pids = list(dict.fromkeys(pids))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        for proc in procs:
            proc.poll()
        time.sleep(0.05)
    killed = [p for p in pids if _alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    return len(killed)


class Child:
    """A subprocess of this script in a ``--role``; its output is read line by line.

    A role reports with ``READY {json}`` and ``RESULT {json}`` lines on stdout; every other
    line (stderr included) is kept for diagnostics.
    """

    def __init__(self, role: str, role_args: dict[str, Any], env: dict[str, str] | None = None):
        self.role = role
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--role",
            role,
            "--role-args",
            json.dumps(role_args),
        ]
        full_env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._tagged: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            tag, _, rest = line.partition(" ")
            if tag in ("READY", "RESULT"):
                self._tagged.put((tag, json.loads(rest)))
            else:
                self.lines.append(line)
        self._tagged.put(("EOF", None))

    def expect(self, tag: str, timeout: float) -> Any:
        """The next ``tag`` report; RuntimeError with the child's output if it never comes."""
        try:
            got, value = self._tagged.get(timeout=timeout)
        except queue.Empty:
            got, value = "TIMEOUT", None
        if got != tag:
            tail = "\n".join(self.lines[-40:])
            raise RuntimeError(f"{self.role}: expected {tag}, got {got}; output:\n{tail}")
        return value

    def stop(self) -> None:
        stop_tree([self.proc], grace=3.0)


def emit(tag: str, value: Any) -> None:
    """Report to the parent (roles only)."""
    print(f"{tag} {json.dumps(value)}", flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size since it exec'd.

    ``VmHWM`` from /proc/self/status; ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used as
    the measure because Linux carries the parent's RSS at fork into it across exec (a
    child started while this script holds 2 GiB would report at least 2 GiB). Falls back
    to ``ru_maxrss`` where /proc is missing.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """This process's resident set size now."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


# =========================================================================== PKI, keys
def write_pki_and_keys(root: Path, num_sites: int) -> dict[str, Any]:
    """Dev CA + server cert for 127.0.0.1, one Ed25519 key per site, and the allowlist."""
    from fedlearn.security.certs import write_dev_pki
    from fedlearn.security.keys import (
        allowlist_entry_toml,
        generate_site_key,
        public_key_bytes,
        save_private_key,
    )

    root.mkdir(parents=True, exist_ok=True)
    pki = write_dev_pki(root / "pki", ["localhost", "127.0.0.1"])
    entries, keys = [], []
    for i in range(num_sites):
        key = generate_site_key()
        path = root / f"site-{i}.key"
        save_private_key(path, key)
        keys.append(str(path))
        entries.append(allowlist_entry_toml(f"site-{i}", public_key_bytes(key)))
    allowlist = root / "sites.toml"
    allowlist.write_text("\n".join(entries))
    return {
        "ca": str(pki.ca_cert),
        "cert": str(pki.server_cert),
        "key": str(pki.server_key),
        "allowlist": str(allowlist),
        "site_keys": keys,
    }


def _tls_lines(material: dict[str, Any], tls: bool, server: bool) -> str:
    if not tls:
        return "insecure = true"
    if server:
        return f'cert = "{material["cert"]}"\nkey = "{material["key"]}"'
    return f'ca = "{material["ca"]}"'


def coordinator_toml(
    path: Path,
    material: dict[str, Any],
    *,
    port: int,
    state_dir: Path,
    rounds: int,
    min_clients: int,
    tls: bool,
    model_factory: str,
    evaluate_every: int = 1,
    name: str = "run",
) -> Path:
    """Write a coordinator.toml."""
    path.write_text(f"""
[server]
address = "127.0.0.1:{port}"
{_tls_lines(material, tls, server=True)}
allowlist = "{material["allowlist"]}"
state_dir = "{state_dir}"

[run]
name = "{name}"
seed = 0
rounds = {rounds}
min_clients = {min_clients}
join_timeout_s = 120
stage_timeout_s = 300
evaluate_every = {evaluate_every}

[model]
factory = "{model_factory}"

[strategy]
name = "fedavg"
""")
    return path


def site_toml(
    path: Path, material: dict[str, Any], *, index: int, port: int, tls: bool, npz: Path, app: str
) -> Path:
    """Write a site.toml for site ``index``."""
    path.write_text(f"""
[coordinator]
address = "127.0.0.1:{port}"
{_tls_lines(material, tls, server=False)}
backoff_initial_s = 0.05
backoff_max_s = 0.2
exit_when_finished = true

[site]
name = "site-{index}"
key = "{material["site_keys"][index]}"

[data]
path = "{npz}"

[client]
app = "{app}"
""")
    return path


# =========================================================================== part (a)
def fedlearn_cli(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m fedlearn.cli ARGS`` from the repo root, output to ``log``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONFAULTHANDLER="1")
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedlearn.cli", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def prepare_fedlearn_deploy(root: Path, clients: int) -> dict[str, Any]:
    """PKI, keys, allowlist and each site's ``.npz`` (the peer's data of that client)."""
    from benchmarks.peer_site import write_site_npz

    material = write_pki_and_keys(root, clients)
    material["npz"] = [str(write_site_npz(root / f"site-{i}.npz", i)) for i in range(clients)]
    return material


def run_fedlearn_deploy(
    root: Path,
    material: dict[str, Any],
    clients: int,
    rounds: int,
    rep: int,
    tls: bool,
    timeout: float,
) -> dict[str, Any]:
    """One whole deployment run: coordinator + ``clients`` site processes, fresh state."""
    from fedlearn.engine.store import RunStore
    from fedlearn.engine.weights import load_weights

    port = free_port()
    run_dir = root / f"rep-{rep}"
    run_dir.mkdir()
    state = run_dir / "state"
    coord_cfg = coordinator_toml(
        run_dir / "coordinator.toml",
        material,
        port=port,
        state_dir=state,
        rounds=rounds,
        min_clients=clients,
        tls=tls,
        model_factory="benchmarks.peer_site:initial_arrays",
    )
    site_cfgs = [
        site_toml(
            run_dir / f"site-{i}.toml",
            material,
            index=i,
            port=port,
            tls=tls,
            npz=Path(material["npz"][i]),
            app="benchmarks.peer_site:make_app",
        )
        for i in range(clients)
    ]
    wall0 = time.time()
    t0 = time.perf_counter()
    coord = fedlearn_cli("server", "--config", str(coord_cfg), log=run_dir / "coordinator.log")
    sites = [
        fedlearn_cli("client", "--config", str(c), log=run_dir / f"site-{i}.log")
        for i, c in enumerate(site_cfgs)
    ]
    t_spawned = time.perf_counter() - t0
    exits: dict[int, float] = {}
    t_listen = None
    deadline = time.monotonic() + timeout
    try:
        while coord.pid not in exits or len(exits) < clients + 1:
            if time.monotonic() > deadline:
                for proc in (coord, *sites):  # faulthandler: every thread's stack to the log
                    if proc.poll() is None:
                        os.kill(proc.pid, signal.SIGABRT)
                time.sleep(1.0)
                raise RuntimeError(
                    f"fedlearn deployment did not finish within {timeout} s:\n"
                    + (run_dir / "coordinator.log").read_text()[-6000:]
                )
            now = time.perf_counter() - t0
            for proc in (coord, *sites):
                if proc.pid not in exits and proc.poll() is not None:
                    exits[proc.pid] = now
            if coord.pid in exits and coord.returncode != 0:
                break
            if t_listen is None:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        t_listen = time.perf_counter() - t0
            time.sleep(0.005)
    finally:
        stop_tree([coord, *sites])
    rc = coord.returncode
    t_coord = exits.get(coord.pid, float("nan"))
    site_exits = [exits.get(s.pid, float("nan")) for s in sites]
    site_rcs = [s.returncode for s in sites]
    model_path = state / "model.safetensors"
    if rc != 0 or not model_path.exists():
        raise RuntimeError(
            f"fedlearn deployment failed (rc={rc}):\n"
            + (run_dir / "coordinator.log").read_text()[-3000:]
        )
    store = RunStore(state / "run.db", run_id="run")
    try:
        rounds_done = store.rounds()
    finally:
        store.close()
    return {
        "wall_s": model_path.stat().st_mtime - wall0,
        "coordinator_exited_s": t_coord,
        "spawned_s": t_spawned,
        "listening_s": t_listen,
        "first_site_exit_s": min(site_exits),
        "all_sites_exited_s": max(site_exits),
        "site_rcs": site_rcs,
        "round_durations_s": [r.duration_s for r in rounds_done],
        "accuracy": float(rounds_done[-1].eval_metrics["accuracy"]),
        "loss": float(rounds_done[-1].eval_metrics["loss"]),
        "arrays": load_weights(model_path),
    }


FLOWER_SERVER_APP = '''"""The peer ServerApp: sim_bench.py's main, set up from run_config."""

import argparse

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from peerapp import sim_bench

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    sim_bench.ARGS = argparse.Namespace(
        clients=int(cfg["clients"]), rounds=int(cfg["rounds"]), cpus_per_client=0,
        out=str(cfg["out"]),
    )
    sim_bench.main(grid, context)
'''

FLOWER_CLIENT_APP = '''"""ClientApp of the peer benchmark: sim_bench.py's, unchanged."""

from peerapp import sim_bench

app = sim_bench.client_app
'''

FLOWER_PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "peerapp"
version = "1.0.0"
description = "Flower peer workload (shared/peers/flower/sim_bench.py) for deployment mode"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlearn-bench"

[tool.flwr.app.components]
serverapp = "peerapp.server_app:app"
clientapp = "peerapp.client_app:app"

[tool.flwr.app.config]
clients = 10
rounds = 5
out = ""
"""


def build_flower_app(root: Path, superlink_port: int) -> tuple[Path, Path]:
    """A Flower app dir (sim_bench.py's apps) and a private FLWR_HOME naming the SuperLink."""
    app_dir = root / "flower-app"
    pkg = app_dir / "peerapp"
    pkg.mkdir(parents=True)
    shutil.copy(FLOWER_DIR / "sim_bench.py", pkg / "sim_bench.py")
    (pkg / "__init__.py").write_text("")
    (pkg / "server_app.py").write_text(FLOWER_SERVER_APP)
    (pkg / "client_app.py").write_text(FLOWER_CLIENT_APP)
    (app_dir / "pyproject.toml").write_text(FLOWER_PYPROJECT)
    home = root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\n'
        f'address = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )
    return app_dir, home


def run_flower_deploy(
    venv: Path, root: Path, clients: int, rounds: int, timeout: float
) -> dict[str, Any]:
    """SuperLink + ``clients`` SuperNodes + ``flwr run``; wall time to the final model."""
    root.mkdir(parents=True)
    port = free_port()
    app_dir, home = build_flower_app(root, port)
    out_json = root / "result.json"
    tmp = root / "tmp"
    tmp.mkdir()
    env = dict(os.environ)
    for key in ("PYTHONPATH", "RAY_ADDRESS", "VIRTUAL_ENV"):
        env.pop(key, None)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        TMPDIR=str(tmp),
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    bin_dir = venv / "bin"
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = root / f"{name}.log"
        logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    marks: dict[str, float] = {}
    wall0 = time.time()
    t0 = time.perf_counter()
    try:
        start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--port",
                str(port),
                "--fleet-api-address",
                f"127.0.0.1:{free_port()}",
                "--control-api-address",
                f"127.0.0.1:{free_port()}",
                "--disable-runtime-dependency-installation",
            ],
        )
        for i in range(clients):
            start(
                f"supernode-{i}",
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={clients}",
                ],
            )
        if not wait_for_port(port, 120):
            raise RuntimeError("the SuperLink did not listen within 120 s")
        marks["superlink_listening_s"] = time.perf_counter() - t0
        run = start(
            "flwr-run",
            [
                str(bin_dir / "flwr"),
                "run",
                str(app_dir),
                "bench",
                "--stream",
                "--run-config",
                f"clients={clients} rounds={rounds} out='{out_json}'",
            ],
        )
        deadline = time.monotonic() + timeout
        while not out_json.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no final model from Flower within {timeout} s")
            if run.poll() is not None and not out_json.exists():
                time.sleep(1.0)  # the result file may land just after the CLI returns
                if not out_json.exists():
                    raise RuntimeError(f"`flwr run` exited with {run.returncode} and no result")
            time.sleep(0.05)
        marks["result_seen_s"] = time.perf_counter() - t0
        marks["final_model_s"] = out_json.stat().st_mtime - wall0
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(timeout=60)
        marks["flwr_run_exited_s"] = time.perf_counter() - t0
        time.sleep(0.2)
        result = json.loads(out_json.read_text())
    except Exception as exc:
        tails = "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
            for p in logs[:2] + logs[-1:]
            if p.exists()
        )
        raise RuntimeError(f"Flower deployment failed: {exc}\n{tails}") from exc
    finally:
        killed = stop_tree(procs)
    return {
        "wall_s": marks["final_model_s"],
        **marks,
        "bench": result,
        "killed_after_sigterm": killed,
    }


def part_a(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchmarks.peer_workload import bare_loop

    print(
        f"\n== (a) deployment, {args.clients} sites x {args.rounds} rounds: fedlearn "
        f"({'TLS' if not args.insecure else 'plaintext'}) vs Flower 1.42 deployment",
        flush=True,
    )
    root = work / "a"
    material = prepare_fedlearn_deploy(root, args.clients)
    ref, ref_acc = bare_loop(args.clients, args.rounds)
    fed_runs = []
    failures = []
    for rep in range(args.fed_reps):
        try:
            run = run_fedlearn_deploy(
                root, material, args.clients, args.rounds, rep, tls=not args.insecure, timeout=60
            )
        except RuntimeError as exc:
            failures.append(str(exc))
            print(f"fedlearn rep {rep} FAILED (left out of the median): {exc}", flush=True)
            continue
        run["bit_identical_to_bare_loop"] = all(
            np.array_equal(run["arrays"][k], ref[k]) for k in ref
        )
        run["w_norm"] = float(np.linalg.norm(run.pop("arrays")["w"]))
        fed_runs.append(run)
        print(
            f"fedlearn rep {rep}: {run['wall_s']:.3f} s to the final model (all spawned "
            f"{run['spawned_s']:.3f} s, coordinator listening {run['listening_s']:.3f} s, "
            f"coordinator exited {run['coordinator_exited_s']:.3f} s, sites exited "
            f"{run['first_site_exit_s']:.3f}-{run['all_sites_exited_s']:.3f} s); rounds "
            f"{', '.join(f'{d * 1e3:.1f}' for d in run['round_durations_s'])} ms; "
            f"acc {run['accuracy']:.5f}; bit-identical to bare loop: "
            f"{run['bit_identical_to_bare_loop']}",
            flush=True,
        )
    fed = statistics.median(r["wall_s"] for r in fed_runs)
    fed_exit = statistics.median(r["coordinator_exited_s"] for r in fed_runs)
    out: dict[str, Any] = {
        "fedlearn_runs": fed_runs,
        "fedlearn_median_s": fed,
        "fedlearn_median_exit_s": fed_exit,
        "bare_loop_acc": ref_acc,
        "fedlearn_failures": failures,
    }
    flower_runs: list[dict[str, Any]] = []
    if not args.skip_flower:
        python = (
            DEFAULT_FLOWER_VENV / "bin" / "python"
            if args.flower_venv is None
            else args.flower_venv / "bin" / "python"
        )
        venv = python.parent.parent
        if not python.exists():
            print(f"creating the Flower peer venv {venv} (about 25 s) ...", flush=True)
            subprocess.run(
                ["bash", str(FLOWER_DIR / "setup.sh"), str(venv)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        for rep in range(args.flower_reps):
            try:
                run = run_flower_deploy(
                    venv, root / f"flower-{rep}", args.clients, args.rounds, args.flower_timeout
                )
            except RuntimeError as exc:
                print(f"Flower deployment FAILED: {exc}", flush=True)
                out["flower_error"] = str(exc)
                break
            flower_runs.append(run)
            bench = run["bench"]
            print(
                f"flower rep {rep}: {run['wall_s']:.3f} s to the final model (SuperLink "
                f"listening at {run['superlink_listening_s']:.2f} s; `flwr run` exited at "
                f"{run['flwr_run_exited_s']:.2f} s); rounds "
                f"{', '.join(f'{v:.1f}' for v in bench['round_seconds'].values())} s; "
                f"final_eval_aggregated {bench['final_eval_aggregated']}",
                flush=True,
            )
    out["flower_runs"] = flower_runs
    if flower_runs:
        flower = statistics.median(r["wall_s"] for r in flower_runs)
        ratio = fed / flower
        out.update(flower_median_s=flower, ratio=ratio, measured_in_same_run=True)
        acc = flower_runs[-1]["bench"]["final_eval_aggregated"].get("eval_acc")
        fw = flower_runs[-1]["bench"]["final_w_norm"]
        print(
            f"same model: fedlearn acc {fed_runs[-1]['accuracy']:.5f} vs Flower eval_acc "
            f"{acc:.5f}; |w| {fed_runs[-1]['w_norm']:.16f} vs {fw:.16f} (rel diff "
            f"{abs(fed_runs[-1]['w_norm'] - fw) / fw:.1e})"
        )
        print(
            f"deploy fedlearn/flower = {ratio:.4f} ({1 / ratio:.1f}x faster)  "
            f"[fedlearn median of {len(fed_runs)}: {fed:.3f} s; Flower median of "
            f"{len(flower_runs)}: {flower:.3f} s; same run]",
            flush=True,
        )
        flower_exit = statistics.median(r["flwr_run_exited_s"] for r in flower_runs)
        out["flower_median_exit_s"] = flower_exit
        print(
            f"  to process exit instead: fedlearn coordinator exit {fed_exit:.3f} s vs Flower "
            f"`flwr run` exit {flower_exit:.3f} s: {fed_exit / flower_exit:.4f}"
        )
    else:
        ratio = fed / README_FLOWER_DEPLOY_S
        out.update(ratio=ratio, measured_in_same_run=False)
        print(
            f"deploy fedlearn/flower = {ratio:.4f} ({1 / ratio:.1f}x faster)  "
            f"[NOT measured in the same run: fedlearn {fed:.3f} s vs the peer README's "
            f"{README_FLOWER_DEPLOY_S} s]",
            flush=True,
        )
        print(
            f"  to coordinator exit instead: {fed_exit:.3f} s, "
            f"{fed_exit / README_FLOWER_DEPLOY_S:.4f}"
        )
    return out


# =========================================================================== part (b)
class EchoApp:
    """Returns the arrays it was sent; reports when train() was entered and left."""

    def train(self, arrays: Any, config: Any, ctx: Any) -> Any:
        from fedlearn.engine.client_app import TrainResult

        t_recv = time.monotonic()
        return TrainResult(dict(arrays), 1, {"t_recv": t_recv, "t_ret": time.monotonic()})

    def evaluate(self, arrays: Any, config: Any, ctx: Any) -> Any:
        from fedlearn.engine.client_app import EvaluateResult

        return EvaluateResult(1, 0.0, {})


def wire_model(seed: int) -> dict[str, np.ndarray]:
    """``[model] factory`` for the full-coordinator check: FEDLEARN_BENCH_MODEL_BYTES float32."""
    n = int(os.environ["FEDLEARN_BENCH_MODEL_BYTES"]) // 4
    return {"w": np.full(n, 1.5, np.float32)}


def blockwise_equal(x: np.ndarray, y: np.ndarray, block: int = 1 << 22) -> bool:
    """``np.array_equal`` without a temporary the size of the arrays (it would count in the
    peak RSS being measured)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return x.shape == y.shape and all(
        np.array_equal(x[i : i + block], y[i : i + block]) for i in range(0, x.size, block)
    )


def role_wire_coord(a: dict[str, Any]) -> None:
    """Host the coordinator side of the wire path; run ``reps`` one-task stages."""
    from fedlearn.config.deployment import ServerSection
    from fedlearn.deploy.server import start_server
    from fedlearn.deploy.servicer import CoordinatorServicer
    from fedlearn.deploy.sessions import ClientRegistry
    from fedlearn.deploy.transport import GrpcTransport
    from fedlearn.engine.messages import Stage, Task
    from fedlearn.security.auth import Authenticator
    from fedlearn.security.keys import load_allowlist

    baseline = current_rss_bytes()
    registry = ClientRegistry()
    # as run_coordinator sets them: a payload digest on plaintext channels only
    transport = GrpcTransport(registry, 600.0, digest=not a["tls"])
    auth = Authenticator(load_allowlist(a["allowlist"]), "fedlearn-bench")
    servicer = CoordinatorServicer(
        registry, auth, 2 * a["model_bytes"] + MIB, require_digest=not a["tls"]
    )
    section = ServerSection.model_validate(
        {
            "address": "127.0.0.1:0",
            "insecure": not a["tls"],
            "cert": a.get("cert"),
            "key": a.get("key"),
            "allowlist": a["allowlist"],
        }
    )
    server, port = start_server(section, servicer, max_workers=10)
    emit("READY", {"port": port})
    if not registry.wait_for(1, 120):
        raise SystemExit("no site joined")
    arrays = {"w": np.full(a["model_bytes"] // 4, 1.5, np.float32)}
    with_model = current_rss_bytes()
    reps = []
    for rep in range(a["reps"]):
        task = Task(Stage.TRAIN, rep + 1, 0, 0, {})
        t0 = time.monotonic()
        replies = list(transport.execute(arrays, [task]))
        t1 = time.monotonic()
        reply = replies[0]
        if not reply.ok:
            raise SystemExit(f"task failed: {reply.error}")
        m = reply.metrics
        assert reply.arrays is not None
        same = blockwise_equal(reply.arrays["w"], arrays["w"]) if rep == 0 else None
        reps.append(
            {
                "download_s": float(m["t_recv"]) - t0,
                "upload_s": t1 - float(m["t_ret"]),
                "total_s": t1 - t0,
                "echo_identical": same,
            }
        )
        del replies, reply
    peak = peak_rss_bytes()
    registry.close_all("benchmark finished")
    server.stop(grace=1).wait()
    emit(
        "RESULT",
        {"reps": reps, "peak_rss": peak, "baseline_rss": baseline, "rss_with_model": with_model},
    )


def role_wire_site(a: dict[str, Any]) -> None:
    """One SiteClient with the echo app; exits when the coordinator says goodbye."""
    from fedlearn.deploy.site import Backoff, SiteClient
    from fedlearn.security.certs import load_pem
    from fedlearn.security.keys import load_private_key

    site = SiteClient(
        f"127.0.0.1:{a['port']}",
        EchoApp(),
        load_private_key(a["site_key"]),
        "site-0",
        root_certificates=load_pem(a["ca"]) if a["tls"] else None,
        backoff=Backoff(0.05, 1.0),
        exit_when_finished=True,
    )
    site.run()
    emit("RESULT", {"tasks": site.tasks_done, "peak_rss": peak_rss_bytes()})


RAW_OPTIONS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
]


def role_raw_server(a: dict[str, Any]) -> None:
    """grpc_bench.py's server: client-streaming upload (count bytes), server-streaming
    download of a prebuilt payload in ``chunk``-byte pieces."""
    from concurrent import futures

    import grpc

    payload = b"\x02" * a["model_bytes"]
    chunk = a["chunk"]

    def upload(it: Iterator[bytes], ctx: Any) -> bytes:
        n = 0
        for piece in it:
            n += len(piece)
        return n.to_bytes(8, "little")

    def upload_assembled(it: Iterator[bytes], ctx: Any) -> bytes:
        buf = memoryview(bytearray(a["model_bytes"]))  # a fresh buffer, as a receiver needs
        n = 0
        for piece in it:
            buf[n : n + len(piece)] = piece
            n += len(piece)
        return n.to_bytes(8, "little")

    def download(req: bytes, ctx: Any) -> Iterator[bytes]:
        n = int.from_bytes(req, "little")
        view = memoryview(payload)
        for start in range(0, n, chunk):
            yield bytes(view[start : min(n, start + chunk)])

    handler = grpc.method_handlers_generic_handler(
        "b.B",
        {
            "C": grpc.stream_unary_rpc_method_handler(upload),
            "A": grpc.stream_unary_rpc_method_handler(upload_assembled),
            "S": grpc.unary_stream_rpc_method_handler(download),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=RAW_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    if a["tls"]:
        creds = grpc.ssl_server_credentials(
            [(Path(a["key"]).read_bytes(), Path(a["cert"]).read_bytes())]
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    emit("READY", {"port": port})
    server.wait_for_termination()


def raw_transfers(
    port: int, tls: bool, ca: str | None, size: int, chunk: int, reps: int
) -> list[dict[str, float]]:
    """Upload (client-streaming) and download (server-streaming) ``size`` bytes, ``reps``
    times each, from this process."""
    import grpc

    if tls:
        assert ca is not None
        creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
        channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, RAW_OPTIONS)
    else:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", RAW_OPTIONS)
    upload = channel.stream_unary("/b.B/C")
    upload_assembled = channel.stream_unary("/b.B/A")
    download = channel.unary_stream("/b.B/S")
    data = b"\x01" * size
    view = memoryview(data)

    def pieces() -> Iterator[bytes]:
        for start in range(0, size, chunk):
            yield bytes(view[start : start + chunk])

    upload(iter([b"x"]))  # connect (and TLS handshake) outside the timings
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        got = int.from_bytes(upload(pieces()), "little")
        up = time.perf_counter() - t
        t = time.perf_counter()
        n = sum(len(p) for p in download(size.to_bytes(8, "little")))
        down = time.perf_counter() - t
        t = time.perf_counter()
        got_a = int.from_bytes(upload_assembled(pieces()), "little")
        up_a = time.perf_counter() - t
        t = time.perf_counter()
        buf = memoryview(bytearray(size))
        n_a = 0
        for piece in download(size.to_bytes(8, "little")):
            buf[n_a : n_a + len(piece)] = piece
            n_a += len(piece)
        down_a = time.perf_counter() - t
        del buf
        if got != size or n != size or got_a != size or n_a != size:
            raise RuntimeError(f"raw transfer lost bytes: {got}, {n}, {got_a}, {n_a} of {size}")
        out.append(
            {
                "upload_s": up,
                "download_s": down,
                "upload_assembled_s": up_a,
                "download_assembled_s": down_a,
            }
        )
    channel.close()
    return out


def wire_once(material: dict[str, Any], tls: bool, size: int, reps: int) -> dict[str, Any]:
    """fedlearn's wire path: coordinator process + site process, ``reps`` round trips."""
    base = {
        "tls": tls,
        "cert": material["cert"],
        "key": material["key"],
        "ca": material["ca"],
        "allowlist": material["allowlist"],
    }
    coord = Child("wire-coord", {**base, "model_bytes": size, "reps": reps})
    site = None
    try:
        port = coord.expect("READY", 60)["port"]
        site = Child("wire-site", {**base, "port": port, "site_key": material["site_keys"][0]})
        result: dict[str, Any] = coord.expect("RESULT", 120 + 30 * reps * size / 2**30)
        result["site"] = site.expect("RESULT", 60)
        return result
    finally:
        coord.stop()
        if site is not None:
            site.stop()


def raw_once(
    material: dict[str, Any], tls: bool, size: int, chunk: int, reps: int
) -> list[dict[str, float]]:
    """The raw grpcio floor, server in its own process."""
    server = Child(
        "raw-server",
        {
            "tls": tls,
            "cert": material["cert"],
            "key": material["key"],
            "model_bytes": size,
            "chunk": chunk,
        },
    )
    try:
        port = server.expect("READY", 60)["port"]
        return raw_transfers(port, tls, material["ca"], size, chunk, reps)
    finally:
        server.stop()


def role_full_coord(a: dict[str, Any]) -> None:
    """A whole ``run_coordinator`` (1 round, no evaluation) with a ``model_bytes`` model."""
    from fedlearn.config.deployment import CoordinatorConfig
    from fedlearn.config.loading import load_toml
    from fedlearn.deploy.server import run_coordinator

    config = load_toml(CoordinatorConfig, a["config"])
    baseline = current_rss_bytes()
    t0 = time.perf_counter()
    run_coordinator(config, on_ready=lambda port: emit("READY", {"port": port}))
    emit(
        "RESULT",
        {
            "wall_s": time.perf_counter() - t0,
            "peak_rss": peak_rss_bytes(),
            "baseline_rss": baseline,
        },
    )


def full_coordinator_once(
    material: dict[str, Any], root: Path, tls: bool, size: int
) -> dict[str, Any]:
    """Peak RSS of a whole coordinator process running one round with a ``size`` model."""
    port = free_port()
    run_dir = Path(tempfile.mkdtemp(prefix="full-", dir=root))
    cfg = coordinator_toml(
        run_dir / "coordinator.toml",
        material,
        port=port,
        state_dir=run_dir / "state",
        rounds=1,
        min_clients=1,
        tls=tls,
        model_factory="benchmarks.bench_deploy_vs_flower:wire_model",
        evaluate_every=0,
    )
    coord = Child(
        "full-coord",
        {"config": str(cfg)},
        env={"FEDLEARN_BENCH_MODEL_BYTES": str(size)},
    )
    site = None
    try:
        coord.expect("READY", 60)
        site = Child(
            "wire-site",
            {
                "tls": tls,
                "ca": material["ca"],
                "port": port,
                "site_key": material["site_keys"][0],
            },
        )
        try:
            result: dict[str, Any] = coord.expect("RESULT", 300)
        except RuntimeError:
            errors = [line for line in coord.lines if "Error" in line]
            return {"error": errors[-1] if errors else "\n".join(coord.lines[-5:])}
        result["site"] = site.expect("RESULT", 60)
        return result
    finally:
        coord.stop()
        if site is not None:
            site.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def updown(reps: Sequence[dict[str, Any]]) -> str:
    """``up/down`` seconds of each rep."""
    return ", ".join(f"{r['upload_s']:.2f}/{r['download_s']:.2f}" for r in reps)


def part_b(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size = int(args.model_mib * MIB)
    chunk = int(args.raw_chunk_mib * MIB)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.wire_tls]
    variants = [v for v in args.variants.split(",") if v]
    print(
        f"\n== (b) {size / MIB:.0f} MiB model: fedlearn wire path vs raw grpcio "
        f"({args.wire_reps} reps each; raw chunks {chunk / MIB:g} MiB, raw measured before "
        f"and after fedlearn; variants: {', '.join(variants)})",
        flush=True,
    )
    if any(v != "baseline" for v in variants):
        raise SystemExit("--variants: only 'baseline' (or '') is left; see BENCHMARKS.md 3(b)")
    material = write_pki_and_keys(work / "b", 1)
    out: dict[str, Any] = {"model_bytes": size, "variants": variants}
    mb = size / 1e6
    for tls in modes if variants else []:
        label = "TLS" if tls else "plaintext"
        raw = raw_once(material, tls, size, chunk, args.wire_reps)
        feds = {}
        for variant in variants:
            try:
                feds[variant] = wire_once(material, tls, size, args.wire_reps)
            except RuntimeError as exc:
                lines = [x for x in str(exc).splitlines() if "Error" in x or "Apply" in x]
                print(f"[{label}][{variant}] FAILED: {lines[-1] if lines else exc}", flush=True)
                res_failed = out.setdefault("failed", {})
                res_failed[f"{label}/{variant}"] = str(exc)[-2000:]
        raw += raw_once(material, tls, size, chunk, args.wire_reps)
        r_up = statistics.median(r["upload_s"] for r in raw)
        r_down = statistics.median(r["download_s"] for r in raw)
        a_up = statistics.median(r["upload_assembled_s"] for r in raw)
        a_down = statistics.median(r["download_assembled_s"] for r in raw)
        print(
            f"[{label}] raw grpcio: upload {r_up:.3f} s ({mb / r_up:.0f} MB/s), download "
            f"{r_down:.3f} s ({mb / r_down:.0f} MB/s); per rep up/down s {updown(raw)}"
        )
        print(
            f"[{label}] raw grpcio + copy into a fresh buffer at the receiver (what any "
            f"receiver that keeps the model must add): upload {a_up:.3f} s "
            f"({mb / a_up:.0f} MB/s), download {a_down:.3f} s ({mb / a_down:.0f} MB/s)"
        )
        res: dict[str, Any] = {
            "raw": raw,
            "raw_upload_s": r_up,
            "raw_download_s": r_down,
            "raw_assembled_upload_s": a_up,
            "raw_assembled_download_s": a_down,
        }
        for variant, fed in feds.items():
            f_up = statistics.median(r["upload_s"] for r in fed["reps"])
            f_down = statistics.median(r["download_s"] for r in fed["reps"])
            peak = fed["peak_rss"]
            v = {
                "fedlearn": fed,
                "fed_upload_s": f_up,
                "fed_download_s": f_down,
                "upload_ratio": r_up / f_up,
                "download_ratio": r_down / f_down,
                "upload_ratio_vs_assembled": a_up / f_up,
                "download_ratio_vs_assembled": a_down / f_down,
                "peak_rss_over_model": peak / size,
                "peak_rss_above_baseline_over_model": (peak - fed["baseline_rss"]) / size,
            }
            res[variant] = v
            tag = f"[{label}]" + ("" if variant == "baseline" else f"[{variant}]")
            print(
                f"{tag} fedlearn upload {f_up:.3f} s ({mb / f_up:.0f} MB/s), download "
                f"{f_down:.3f} s ({mb / f_down:.0f} MB/s); per rep up/down s "
                f"{updown(fed['reps'])}; echo identical: "
                f"{fed['reps'][0]['echo_identical']}"
            )
            print(
                f"{tag} upload fedlearn/raw = {v['upload_ratio']:.3f}  (vs raw + copy: "
                f"{v['upload_ratio_vs_assembled']:.3f})"
            )
            print(
                f"{tag} download fedlearn/raw = {v['download_ratio']:.3f}  (vs raw + copy: "
                f"{v['download_ratio_vs_assembled']:.3f})"
            )
            print(
                f"{tag} coordinator peak RSS = {peak / 2**30:.2f} GiB = "
                f"{v['peak_rss_over_model']:.2f}x the model "
                f"({v['peak_rss_above_baseline_over_model']:.2f}x above the "
                f"{fed['baseline_rss'] / MIB:.0f} MiB interpreter baseline); site peak RSS "
                f"{fed['site']['peak_rss'] / 2**30:.2f} GiB",
                flush=True,
            )
        out[label] = res
    if args.full_coordinator:
        tls = modes[-1]
        full_size = int(args.full_model_mib * MIB)
        full = full_coordinator_once(material, work / "b", tls, full_size)
        out["full_coordinator"] = full
        if "error" in full:
            print(
                f"[{'TLS' if tls else 'plaintext'}] whole run_coordinator with a "
                f"{full_size / MIB:.0f} MiB model FAILED: {full['error']}",
                flush=True,
            )
        else:
            print(
                f"[{'TLS' if tls else 'plaintext'}] whole run_coordinator, "
                f"{full_size / MIB:.0f} MiB model, 1 round (train, fold, checkpoint, save)"
                f": {full['wall_s']:.2f} s; "
                f"coordinator peak RSS {full['peak_rss'] / 2**30:.2f} GiB = "
                f"{full['peak_rss'] / full_size:.2f}x the model",
                flush=True,
            )
    return out


# =========================================================================== part (c)
class TinyApp:
    """Echo app for the overhead test; records its own compute time per (round, stage)."""

    def __init__(self, compute: dict[tuple[int, str], float], lock: threading.Lock) -> None:
        self.compute = compute
        self.lock = lock

    def _note(self, ctx: Any, stage: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        with self.lock:
            key = (ctx.round, stage)
            self.compute[key] = self.compute.get(key, 0.0) + dt
            if stage == "evaluate":  # the process's CPU time at its last task of the round
                self.compute[(ctx.round, "cpu")] = time.process_time()

    def train(self, arrays: Any, config: Any, ctx: Any) -> Any:
        from fedlearn.engine.client_app import TrainResult

        t0 = time.perf_counter()
        new = {k: np.asarray(v) + 0.0 for k, v in arrays.items()}
        result = TrainResult(new, 10, {"train_loss": 0.5})
        self._note(ctx, "train", t0)
        return result

    def evaluate(self, arrays: Any, config: Any, ctx: Any) -> Any:
        from fedlearn.engine.client_app import EvaluateResult

        t0 = time.perf_counter()
        result = EvaluateResult(10, 0.5, {"accuracy": 0.5})
        self._note(ctx, "evaluate", t0)
        return result


def start_profiling() -> list[Any]:
    """cProfile (thread CPU time) every thread of this process started from now on (gRPC's
    handler and reader threads included), and the calling thread."""
    import cProfile

    profilers: list[Any] = []
    lock = threading.Lock()

    def first_call(frame: Any, event: str, arg: Any) -> None:
        profiler = cProfile.Profile(time.thread_time)  # CPU time, not time spent waiting
        with lock:
            profilers.append(profiler)
        profiler.enable()  # replaces this hook for the rest of the thread's life

    threading.setprofile(first_call)
    main = cProfile.Profile(time.thread_time)
    profilers.append(main)
    main.enable()
    return profilers


def stop_profiling(profilers: list[Any], top: int = 30) -> str:
    """The merged profile of every thread, by own time and by cumulative time."""
    import io
    import pstats

    threading.setprofile(None)
    profilers[0].disable()
    buf = io.StringIO()
    stats = pstats.Stats(profilers[0], stream=buf)
    for profiler in profilers[1:]:
        with contextlib.suppress(Exception):
            profiler.create_stats()
            stats.add(profiler)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def role_c_coord(a: dict[str, Any]) -> None:
    """run_coordinator with an observer stamping each stage start and round end."""
    from fedlearn.config.deployment import CoordinatorConfig
    from fedlearn.config.loading import load_toml
    from fedlearn.deploy.server import run_coordinator

    marks: list[tuple[str, int, float]] = []

    class Stamps:
        def stage_started(self, round: int, stage: Any, num_tasks: int) -> None:
            marks.append((f"start-{stage.value}", round, time.perf_counter()))

        def reply_received(self, record: Any) -> None:
            pass

        def round_finished(self, record: Any) -> None:
            marks.append(("end", record.round, time.perf_counter()))
            marks.append(("cpu", record.round, time.process_time()))

    config = load_toml(CoordinatorConfig, a["config"])
    profilers = start_profiling() if a.get("profile") else None
    t0 = time.perf_counter()
    result = run_coordinator(
        config, on_ready=lambda port: emit("READY", {"port": port}), observer=Stamps()
    )
    profile = stop_profiling(profilers) if profilers is not None else None
    emit(
        "RESULT",
        {
            "wall_s": time.perf_counter() - t0,
            "marks": marks,
            "profile": profile,
            "durations": [r.duration_s for r in result.rounds],
            "train_ok": [r.train_ok for r in result.rounds],
            "eval_ok": [r.eval_ok for r in result.rounds],
            "peak_rss": peak_rss_bytes(),
        },
    )


def role_c_sites(a: dict[str, Any]) -> None:
    """Many SiteClients as threads of this process, each with its own channel and key."""
    from fedlearn.deploy.site import Backoff, SiteClient
    from fedlearn.security.certs import load_pem
    from fedlearn.security.keys import load_private_key

    compute: dict[tuple[int, str], float] = {}
    lock = threading.Lock()
    roots = load_pem(a["ca"]) if a["tls"] else None
    errors: list[str] = []

    def serve(index: int) -> None:
        try:
            SiteClient(
                f"127.0.0.1:{a['port']}",
                TinyApp(compute, lock),
                load_private_key(a["site_keys"][index]),
                f"site-{index}",
                root_certificates=roots,
                backoff=Backoff(0.05, 1.0),
                exit_when_finished=True,
            ).run()
        except Exception as exc:  # reported to the parent
            errors.append(f"site-{index}: {exc!r}")

    threads = [threading.Thread(target=serve, args=(i,), daemon=True) for i in a["indices"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    emit(
        "RESULT",
        {
            "compute": [[r, s, v] for (r, s), v in compute.items()],
            "errors": errors,
            "peak_rss": peak_rss_bytes(),
        },
    )


def role_c_raw_server(a: dict[str, Any]) -> None:
    """The raw-grpcio floor of (c): the same streams and message pattern, no fedlearn.

    One bidi stream per client, served by a thread per stream (as fedlearn's servicer) with
    a reader thread each; bytes serializers. Per round and client: train = 2 messages out
    (header, chunk) and 2 back; evaluate = 2 out and 1 back, as fedlearn's tiny-model round.
    """
    from concurrent import futures

    import grpc

    n, rounds = a["clients"], a["rounds"]
    outboxes: dict[int, queue.Queue[bytes | None]] = {}
    inbox: queue.Queue[bytes] = queue.Queue()
    joined = threading.Condition()

    def connect(requests: Iterator[bytes], ctx: Any) -> Iterator[bytes]:
        cid = int(next(requests))
        box: queue.Queue[bytes | None] = queue.Queue()
        with joined:
            outboxes[cid] = box
            joined.notify_all()

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):
                for message in requests:
                    inbox.put(message)

        threading.Thread(target=read, daemon=True).start()
        yield b"W"
        while True:
            item = box.get()
            if item is None:
                return
            yield item

    handler = grpc.method_handlers_generic_handler(
        "r.R", {"C": grpc.stream_stream_rpc_method_handler(connect)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * n + 8))
    server.add_generic_rpc_handlers((handler,))
    if a["tls"]:
        creds = grpc.ssl_server_credentials(
            [(Path(a["key"]).read_bytes(), Path(a["cert"]).read_bytes())]
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    emit("READY", {"port": port})
    with joined:
        joined.wait_for(lambda: len(outboxes) == n)
    header, chunk = b"H" + bytes(60), b"C" + bytes(300)
    rows = []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        for stage, replies in ((b"t", 2), (b"e", 1)):
            for box in outboxes.values():
                box.put(header + stage)
                box.put(chunk + stage)
            for _ in range(n * replies):
                inbox.get()
        rows.append((time.perf_counter() - t0, time.process_time() - c0))
    for box in outboxes.values():
        box.put(None)
    server.stop(grace=1).wait()
    emit("RESULT", {"rows": rows})


def role_c_raw_clients(a: dict[str, Any]) -> None:
    """Raw-grpcio clients of the (c) floor: threads, one channel and bidi stream each."""
    import grpc

    roots = Path(a["ca"]).read_bytes() if a["tls"] else None

    def serve(cid: int) -> None:
        if roots is None:
            channel = grpc.insecure_channel(f"127.0.0.1:{a['port']}")
        else:
            channel = grpc.secure_channel(
                f"127.0.0.1:{a['port']}", grpc.ssl_channel_credentials(roots)
            )
        out: queue.Queue[bytes | None] = queue.Queue()
        out.put(str(cid).encode())

        def requests() -> Iterator[bytes]:
            while True:
                item = out.get()
                if item is None:
                    return
                yield item

        with contextlib.suppress(grpc.RpcError):
            for message in channel.stream_stream("/r.R/C")(requests()):
                if message[:1] == b"C":
                    out.put(b"R" + bytes(60))
                    if message[-1:] == b"t":
                        out.put(b"D" + bytes(300))
        out.put(None)
        channel.close()

    threads = [threading.Thread(target=serve, args=(i,)) for i in a["indices"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def raw_overhead_floor(
    material: dict[str, Any], n: int, rounds: int, procs: int, tls: bool
) -> dict[str, float]:
    """Median ms per round (rounds 2..R) and server CPU of the raw-grpcio floor."""
    server = Child(
        "c-raw-server",
        {
            "clients": n,
            "rounds": rounds,
            "tls": tls,
            "cert": material["cert"],
            "key": material["key"],
        },
    )
    clients: list[Child] = []
    try:
        port = server.expect("READY", 60)["port"]
        for p in range(procs):
            clients.append(
                Child(
                    "c-raw-clients",
                    {
                        "port": port,
                        "tls": tls,
                        "ca": material["ca"],
                        "indices": list(range(p, n, procs)),
                    },
                )
            )
        rows = server.expect("RESULT", 600)["rows"][1:]
    finally:
        server.stop()
        for c in clients:
            c.stop()
    return {
        "round_ms": statistics.median(r[0] for r in rows) * 1e3,
        "server_cpu_ms": statistics.median(r[1] for r in rows) * 1e3,
    }


def part_c(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n, rounds, procs = args.overhead_clients, args.overhead_rounds, args.overhead_procs
    tls = not args.insecure
    print(
        f"\n== (c) round overhead: {n} connected sites ({procs} processes of threads), "
        f"tiny model (21 float64), {rounds} rounds, {'TLS' if tls else 'plaintext'}",
        flush=True,
    )
    root = work / "c"
    material = write_pki_and_keys(root, n)
    port = free_port()
    cfg = coordinator_toml(
        root / "coordinator.toml",
        material,
        port=port,
        state_dir=root / "state",
        rounds=rounds,
        min_clients=n,
        tls=tls,
        model_factory="benchmarks.peer_site:initial_arrays",
    )
    coord = Child("c-coord", {"config": str(cfg), "profile": args.profile})
    children: list[Child] = []
    try:
        coord.expect("READY", 60)
        for p in range(procs):
            indices = list(range(p, n, procs))
            children.append(
                Child(
                    "c-sites",
                    {
                        "tls": tls,
                        "ca": material["ca"],
                        "port": port,
                        "site_keys": material["site_keys"],
                        "indices": indices,
                    },
                )
            )
        res = coord.expect("RESULT", 600)
        sites = [c.expect("RESULT", 120) for c in children]
    finally:
        coord.stop()
        for c in children:
            c.stop()
    errors = [e for s in sites for e in s["errors"]]
    compute: dict[int, float] = {}
    site_cpu: dict[int, float] = {}
    for s in sites:
        cpu_at = {r: v for r, kind, v in s["compute"] if kind == "cpu"}
        for r, kind, v in s["compute"]:
            if kind != "cpu":
                compute[r] = compute.get(r, 0.0) + v
        for r in cpu_at:
            if r - 1 in cpu_at:
                site_cpu[r] = site_cpu.get(r, 0.0) + cpu_at[r] - cpu_at[r - 1]
    ends = {r: t for kind, r, t in res["marks"] if kind == "end"}
    coord_cpu = {r: t for kind, r, t in res["marks"] if kind == "cpu"}
    starts = {r: t for kind, r, t in res["marks"] if kind == "start-train"}
    rows = []
    for r in range(2, rounds + 1):
        interval = ends[r] - ends[r - 1]
        rows.append(
            {
                "round": r,
                "interval_s": interval,
                "duration_s": res["durations"][r - 1],
                "train_start_gap_s": starts[r] - ends[r - 1],
                "compute_s": compute.get(r, 0.0),
                "overhead_s": interval - compute.get(r, 0.0),
                "coordinator_cpu_s": coord_cpu[r] - coord_cpu[r - 1],
                "sites_cpu_s": site_cpu.get(r),
            }
        )
    med = statistics.median(x["overhead_s"] for x in rows)
    med_dur = statistics.median(x["duration_s"] - x["compute_s"] for x in rows)
    cpu_c = statistics.median(x["coordinator_cpu_s"] for x in rows)
    cpu_s = statistics.median(x["sites_cpu_s"] for x in rows if x["sites_cpu_s"] is not None)
    out = {
        "clients": n,
        "rounds": rounds,
        "rows": rows,
        "errors": errors,
        "median_coordinator_cpu_ms_per_round": cpu_c * 1e3,
        "median_sites_cpu_ms_per_round": cpu_s * 1e3,
        "train_ok": res["train_ok"],
        "eval_ok": res["eval_ok"],
        "median_overhead_ms_per_round": med * 1e3,
        "median_overhead_ms_per_client": med * 1e3 / n,
        "median_duration_minus_compute_ms": med_dur * 1e3,
        "first_round_ms": res["durations"][0] * 1e3,
        "coordinator_peak_rss_mib": res["peak_rss"] / MIB,
    }
    print(
        f"tasks ok per round (train/eval): {res['train_ok']} / {res['eval_ok']}; "
        f"errors: {errors or 'none'}"
    )
    print(
        "round: interval between round ends ms (train+eval stages ms, store+wait gap ms), "
        "client compute ms: "
        + "; ".join(
            f"{x['round']}: {x['interval_s'] * 1e3:.1f} ({x['duration_s'] * 1e3:.1f},"
            f" {x['train_start_gap_s'] * 1e3:.1f}), {x['compute_s'] * 1e3:.2f}"
            for x in rows
        )
    )
    print(
        f"round overhead, {n} clients: median {med * 1e3:.1f} ms per round = "
        f"{med * 1e3 / n:.3f} ms per client (stages only: {med_dur * 1e3:.1f} ms); "
        f"round 1 {res['durations'][0] * 1e3:.1f} ms; coordinator peak RSS "
        f"{res['peak_rss'] / MIB:.0f} MiB",
        flush=True,
    )
    print(
        f"CPU per round (median): coordinator process {cpu_c * 1e3:.1f} ms, site processes "
        f"{cpu_s * 1e3:.1f} ms together ({os.cpu_count()} cores)",
        flush=True,
    )
    if res.get("profile"):
        print(f"coordinator profile, all threads, whole run:\n{res['profile']}")
    if not args.skip_raw_floor:
        floor = raw_overhead_floor(material, n, rounds, procs, tls)
        out["raw_floor"] = floor
        print(
            f"raw grpcio floor, same streams and message pattern (2+2 train, 2+1 evaluate "
            f"messages per client; thread per stream): median {floor['round_ms']:.1f} ms per "
            f"round, server CPU {floor['server_cpu_ms']:.1f} ms; fedlearn/raw = "
            f"{med * 1e3 / floor['round_ms']:.2f}",
            flush=True,
        )
    return out


# =========================================================================== main
ROLES = {
    "wire-coord": role_wire_coord,
    "wire-site": role_wire_site,
    "raw-server": role_raw_server,
    "full-coord": role_full_coord,
    "c-coord": role_c_coord,
    "c-sites": role_c_sites,
    "c-raw-server": role_c_raw_server,
    "c-raw-clients": role_c_raw_clients,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="a,b,c", help="comma-separated: a, b, c")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="(a), (c): plaintext gRPC for fedlearn (TLS by default)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep configs and logs here (default: a temp dir, removed)",
    )
    g = p.add_argument_group("(a) deployment vs Flower")
    g.add_argument("--clients", type=int, default=10)
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--fed-reps", type=int, default=3)
    g.add_argument("--flower-reps", type=int, default=1)
    g.add_argument(
        "--skip-flower",
        action="store_true",
        help=f"compare with the peer README's {README_FLOWER_DEPLOY_S} s instead",
    )
    g.add_argument("--flower-venv", type=Path, default=None)
    g.add_argument("--flower-timeout", type=float, default=600.0)
    g = p.add_argument_group("(b) 1 GiB through the wire path")
    g.add_argument("--model-mib", type=float, default=1024.0)
    g.add_argument("--wire-reps", type=int, default=3)
    g.add_argument("--raw-chunk-mib", type=float, default=5.0)
    g.add_argument("--wire-tls", choices=["off", "on", "both"], default="both")
    g.add_argument(
        "--variants",
        default="baseline",
        help="'baseline' (fedlearn as it is), or empty: only --full-coordinator (the "
        "monkeypatched variants of earlier measurements are now fedlearn itself)",
    )
    g.add_argument(
        "--full-coordinator",
        action="store_true",
        help="also the peak RSS of a whole run_coordinator round",
    )
    g.add_argument(
        "--full-model-mib",
        type=float,
        default=900.0,
        help="model size for --full-coordinator (SQLite refuses blobs over 1e9 "
        "bytes, so a 1 GiB model cannot be checkpointed)",
    )
    g = p.add_argument_group("(c) round overhead")
    g.add_argument("--overhead-clients", type=int, default=100)
    g.add_argument("--overhead-rounds", type=int, default=10)
    g.add_argument("--overhead-procs", type=int, default=2)
    g.add_argument(
        "--skip-raw-floor",
        action="store_true",
        help="skip the raw-grpcio floor of the (c) message pattern",
    )
    g.add_argument(
        "--profile",
        action="store_true",
        help="cProfile every thread of the (c) coordinator and print the top",
    )
    p.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    p.add_argument("--role-args", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.role:
        import logging

        logging.basicConfig(level=logging.WARNING, format=f"{args.role} %(name)s: %(message)s")
        ROLES[args.role](json.loads(args.role_args))
        return

    parts = [x for x in args.parts.split(",") if x]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.1f}; python {platform.python_version()}, "
        f"numpy {np.__version__}",
        flush=True,
    )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    try:
        if "a" in parts:
            results["a"] = part_a(args, work)
        if "b" in parts:
            results["b"] = part_b(args, work)
        if "c" in parts:
            results["c"] = part_c(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
