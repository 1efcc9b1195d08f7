"""The same Flower app in fedlearn and in Flower, in the same run (issue 15, acceptance 1).

The app is the Flower peer workload's own ClientApp, ``shared/peers/flower/sim_bench.py``
(``client_app``: a Message-API ``flwr.clientapp.ClientApp``), imported, not copied, on
both sides:

* **Flower**: ``benchmarks/flower_sim_app.py`` in the Flower peer venv runs sim_bench's
  ServerApp and ClientApp under Flower's ``run_simulation`` (Ray backend, 1 CPU per client)
  and saves the final model; telemetry off, Ray in a private temp dir, whatever it leaves
  behind killed by pid (``run_in_flower_env`` of ``bench_sim_vs_flower.py``).
* **fedlearn**: ``fedlearn.MessageClientApp(sim_bench.client_app, ...)`` with what
  sim_bench's ServerApp gives Flower's FedAvg (initial arrays zeros under keys ``"0"``,
  ``"1"``, ``train_config={"lr": LR}``, every client trains and evaluates every round),
  under ``fedlearn.run_simulation`` with fedlearn's FedAvg, pool and in-process backends.

For each size it prints both wall times (whole runs: fedlearn's pool start-up and shutdown
included; Flower's subprocess, interpreter, imports and Ray start-up included, and Flower's
own ``run_simulation`` time), the ratio fedlearn/flower and the max |Δ| between the two
final models (Flower's FedAvg scales each update by ``n_k / Σn`` and sums; fedlearn sums
``n_k x_k`` and divides once, so they agree to rounding, not bit for bit).

Usage (from the repo root)::

    python benchmarks/bench_flower_app.py --clients 10 --clients 100 --clients 1000 \\
        --rounds 5 --reps 3 --flower-reps 1
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

import fedlearn  # noqa: E402
from benchmarks.bench_sim_vs_flower import run_in_flower_env  # noqa: E402
from benchmarks.peers import flower_peer_dir, load  # noqa: E402
from fedlearn.engine.results import RunResult  # noqa: E402

HERE = Path(__file__).resolve().parent
WRAPPER = HERE / "flower_sim_app.py"
BACKENDS = ("pool", "inprocess")


def find_flower_python() -> Path:
    """``$FLOWER_PYTHON``, else ``.peer-venv-flower`` of this checkout or a sibling one."""
    if os.environ.get("FLOWER_PYTHON"):
        return Path(os.environ["FLOWER_PYTHON"])
    candidates = [REPO / ".peer-venv-flower"]
    candidates += sorted(REPO.parent.glob("*/.peer-venv-flower"))
    for venv in candidates:
        if (venv / "bin" / "python").exists():
            return venv / "bin" / "python"
    raise SystemExit("no Flower peer venv: pass --flower-python (see shared/peers/flower/setup.sh)")


def import_sim_bench(flower_dir: Path) -> ModuleType:
    """sim_bench.py, imported from the peer directory (its ClientApp unchanged)."""
    if str(flower_dir) not in sys.path:
        sys.path.insert(0, str(flower_dir))
    import sim_bench

    return sim_bench


# --------------------------------------------------------------------------- fedlearn
def run_fedlearn(sim_bench: ModuleType, clients: int, rounds: int, backend: str) -> RunResult:
    """One whole fedlearn run of sim_bench's ClientApp (adapter built inside the timing)."""
    app = fedlearn.MessageClientApp(
        sim_bench.client_app,
        num_partitions=clients,
        initial_arrays={"0": np.zeros(sim_bench.D), "1": np.zeros(1)},
        train_config={"lr": sim_bench.LR},
    )
    strategy = fedlearn.FedAvg(min_train_clients=clients, min_evaluate_clients=clients)
    return fedlearn.run_simulation(
        lambda: app, strategy, num_clients=clients, rounds=rounds, backend=backend
    )


PEER_APP = Path(__file__).resolve().parent / "flower_peer_app"


def run_cli(clients: int, rounds: int, backend: str) -> tuple[float, dict[str, np.ndarray]]:
    """``fedlearn simulate --flower-app benchmarks/flower_peer_app`` as its own process
    (imports, run store, report and plots included): wall time and final model."""
    from fedlearn.engine.weights import load_weights

    exe = Path(sys.executable).parent / "fedlearn"
    with tempfile.TemporaryDirectory(prefix="fl-app-cli-") as tmp:
        out = Path(tmp) / "run"
        cmd = [str(exe), "simulate", "--flower-app", str(PEER_APP), "--clients", str(clients)]
        cmd += ["--run-config", f"num-clients={clients} num-server-rounds={rounds}"]
        cmd += ["--out", str(out), "--no-check-serving", "--set", f"backend.kind={backend}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(
                f"fedlearn simulate failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return wall, load_weights(out / "model.safetensors")


def median_of(fn: Callable[[], Any], reps: int) -> tuple[float, list[float], Any]:
    """Median wall time over ``reps`` calls, all times, and the last result."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


# --------------------------------------------------------------------------- Flower
def run_flower(
    python: Path, flower_dir: Path, clients: int, rounds: int, timeout: float
) -> dict[str, Any]:
    """One Flower run of sim_bench (through flower_sim_app.py): wall times, final model."""
    with tempfile.TemporaryDirectory(prefix="flwr-app-out-") as out_dir:
        out = Path(out_dir) / "final.npz"
        cmd = [str(python), str(WRAPPER), "--clients", str(clients), "--rounds", str(rounds)]
        cmd += ["--cpus-per-client", "1", "--out", str(out)]
        stdout, stderr, wall, rc, leftover = run_in_flower_env(
            cmd, timeout, "flwr-app-", FLOWER_PEER_DIR=str(flower_dir)
        )
        result: dict[str, Any] = {"wall_s": wall, "rc": rc, "leftover_killed": leftover}
        for line in stderr.splitlines():
            if line.startswith("BENCH_TOTAL_SECONDS "):
                result["sim_s"] = float(line.split()[1])
        if rc == 0 and out.exists():
            with np.load(out) as z:
                result["arrays"] = {k: z[k] for k in z.files}
        else:
            result["error"] = (stderr + stdout)[-3000:]
    return result


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max |a - b| over every array (the same keys and shapes required)."""
    if list(a) != list(b):
        raise ValueError(f"different arrays: {list(a)} vs {list(b)}")
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, action="append", help="repeat: 10, 100, 1000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="fedlearn runs per size and backend")
    p.add_argument("--flower-reps", type=int, default=1, help="Flower runs per size")
    p.add_argument("--flower-python", type=Path, default=None)
    p.add_argument("--flower-timeout", type=float, default=900.0)
    args = p.parse_args()
    sizes = args.clients or [10, 100, 1000]
    flower_dir = flower_peer_dir()
    if not (flower_dir / "sim_bench.py").is_file():
        raise SystemExit(f"{flower_dir / 'sim_bench.py'} not found: set FLOWER_PEER_DIR")
    python = args.flower_python or find_flower_python()
    sim_bench = import_sim_bench(flower_dir)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, numpy {np.__version__}; rounds={args.rounds}; "
        f"fedlearn reps={args.reps}, flower reps={args.flower_reps}; "
        f"app: {flower_dir / 'sim_bench.py'}:client_app; flower python: {python}",
        flush=True,
    )
    print(f"load average at start: {load()}", flush=True)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        row: dict[str, Any] = {"clients": n}
        for backend in BACKENDS:
            med, times, res = median_of(
                lambda n=n, b=backend: run_fedlearn(sim_bench, n, args.rounds, b), args.reps
            )
            assert all(c.ok for c in res.clients), [c.error for c in res.clients if not c.ok]
            row[backend] = {"median_s": med, "times_s": times, "arrays": dict(res.arrays)}
            print(
                f"clients={n} fedlearn[{backend}] median {med:.3f}s "
                f"({', '.join(f'{t:.3f}' for t in times)}) "
                f"eval_acc={res.rounds[-1].eval_metrics['eval_acc']:.5f}",
                flush=True,
            )
        cli_times, cli_arrays = [], {}
        for _ in range(args.reps):
            wall, cli_arrays = run_cli(n, args.rounds, "pool")
            cli_times.append(wall)
        row["cli"] = {"median_s": statistics.median(cli_times), "times_s": cli_times}
        print(
            f"clients={n} fedlearn simulate --flower-app (whole process, pool) median "
            f"{row['cli']['median_s']:.3f}s ({', '.join(f'{t:.3f}' for t in cli_times)})",
            flush=True,
        )
        same = all(
            np.array_equal(row["pool"]["arrays"][k], row["inprocess"]["arrays"][k])
            and np.array_equal(row["pool"]["arrays"][k], cli_arrays[k])
            for k in row["pool"]["arrays"]
        )
        row["backends_bit_identical"] = same
        runs = [
            run_flower(python, flower_dir, n, args.rounds, args.flower_timeout)
            for _ in range(args.flower_reps)
        ]
        good = [r for r in runs if "arrays" in r]
        if not good:
            print(f"clients={n} flower FAILED: {runs[-1].get('error', '')}", flush=True)
            rows.append(row)
            continue
        row["flower_wall_s"] = statistics.median(r["wall_s"] for r in good)
        sims = [r["sim_s"] for r in good if "sim_s" in r]
        row["flower_sim_s"] = statistics.median(sims) if sims else None
        row["flower_times_s"] = [r["wall_s"] for r in good]
        row["max_abs_diff"] = max(max_abs_diff(row["pool"]["arrays"], r["arrays"]) for r in good)
        print(
            f"clients={n} flower wall {row['flower_wall_s']:.3f}s "
            f"({', '.join(f'{t:.3f}' for t in row['flower_times_s'])}; run_simulation "
            f"{row['flower_sim_s']}s) max|Δ| fedlearn vs Flower = {row['max_abs_diff']:.3e}; "
            f"pool == in-process == simulate CLI bit for bit: {same}",
            flush=True,
        )
        rows.append(row)
    print(f"load average at end: {load()}", flush=True)

    print()
    print(
        f"{'clients':>7} | {'fl pool':>8} | {'fl inproc':>9} | {'Flower wall':>11} | "
        f"{'Flower sim':>10} | {'pool/flower':>22} | {'inproc/flower':>22} | {'max |Δ|':>9}"
    )
    for r in rows:
        if "flower_wall_s" not in r:
            continue
        fw = r["flower_wall_s"]
        cells = []
        for backend in BACKENDS:
            ratio = r[backend]["median_s"] / fw
            cells.append(f"{ratio:.4f} ({1 / ratio:.0f}x faster)")
        sim = r["flower_sim_s"]
        print(
            f"{r['clients']:>7} | {r['pool']['median_s']:>7.3f}s | "
            f"{r['inprocess']['median_s']:>8.3f}s | {fw:>10.2f}s | "
            f"{'-' if sim is None else f'{sim:.2f}s':>10} | {cells[0]:>22} | {cells[1]:>22} | "
            f"{r['max_abs_diff']:>9.1e}"
        )
    for r in rows:
        if "flower_wall_s" in r:
            ratio = r["pool"]["median_s"] / r["flower_wall_s"]
            cli = r["cli"]["median_s"] / r["flower_wall_s"]
            print(
                f"clients={r['clients']} fedlearn/flower = {ratio:.4f} (pool, run_simulation); "
                f"{cli:.4f} (fedlearn simulate --flower-app, whole process, against Flower's "
                "whole process)"
            )


if __name__ == "__main__":
    main()
