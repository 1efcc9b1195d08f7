"""fedlearn's simulation versus Flower's on the same workload, in the same run.

Workload: the Flower peer benchmark (``shared/peers/flower/sim_bench.py``), FedAvg over
a numpy logistic regression; every client trains and evaluates every round. For each
number of clients this measures the wall time of a whole run of

* the bare numpy loop, no framework (``shared/peers/limits/bare_loop.py``): the floor,
  both as written (data regenerated on every call) and with each client's data cached;
* fedlearn, in-process backend and pool backend (median of ``--reps`` runs);
* Flower 1.42.0 (``sim_bench.py`` in its own venv, Ray backend; ``--flower-reps`` runs).

and checks that the frameworks compute the same thing: fedlearn's final model must be
bit-identical to the bare loop's, and its final weighted eval accuracy equal to Flower's
``final_eval_aggregated`` accuracy (Flower aggregates with pre-divided weights, so its
model agrees to rounding only; the norm of ``w`` is compared).

Usage (from the repo root)::

    python benchmarks/bench_sim_vs_flower.py --sizes 10,100,1000 --rounds 5
    python benchmarks/bench_sim_vs_flower.py --skip-flower --profile

Flower runs with telemetry and update checks off and with Ray's temp dir in a private
``tempfile.mkdtemp()`` (``RAY_TMPDIR``), so it neither joins nor disturbs any other Ray
on the machine; afterwards only processes that carry that private dir in their
environment (the ones this script started) are killed, by pid. ``ray stop`` is never run.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.peer_workload import PeerLogReg, bare_loop  # noqa: E402
from benchmarks.peers import flower_peer_dir  # noqa: E402
from fedlearn.engine.results import RunResult  # noqa: E402
from fedlearn.simulation.engine import run_simulation  # noqa: E402
from fedlearn.strategy.base import Strategy  # noqa: E402

DEFAULT_FLOWER_VENV = REPO / ".peer-venv-flower"
FLOWER_DIR = flower_peer_dir()


# --------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall time of one call of ``fn`` and its result."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_of(fn: Callable[[], Any], reps: int) -> tuple[float, list[float], Any]:
    """Median wall time over ``reps`` calls, all times, and the last result."""
    times, out = [], None
    for _ in range(reps):
        t, out = timed(fn)
        times.append(t)
    return statistics.median(times), times, out


# --------------------------------------------------------------------------- fedlearn
def run_fedlearn(clients: int, rounds: int, backend: str, workers: int | None) -> RunResult:
    """One whole fedlearn run (pool workers are started and stopped inside)."""
    return run_simulation(
        PeerLogReg,
        Strategy(),
        num_clients=clients,
        rounds=rounds,
        seed=0,
        backend=backend,
        workers=workers,
    )  # type: ignore[arg-type]


def final_accuracy(result: RunResult) -> float:
    """Last round's num_examples-weighted eval accuracy."""
    return float(result.rounds[-1].eval_metrics["accuracy"])


# --------------------------------------------------------------------------- Flower
def ensure_flower_venv(venv: Path) -> Path:
    """The venv's python, creating the venv with the peer's setup.sh if it is missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating the Flower peer venv {venv} (about 25 s) ...", flush=True)
        subprocess.run(
            ["bash", str(FLOWER_DIR / "setup.sh"), str(venv)], check=True, stdout=subprocess.DEVNULL
        )
    return python


def _pids_with_env(marker: bytes) -> list[int]:
    """Pids of processes whose environment contains ``marker`` (our private RAY_TMPDIR)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _kill_ours(marker: bytes) -> int:
    """Terminate, then kill, the processes started by this script's Flower run."""
    pids = _pids_with_env(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
            time.sleep(0.1)
    return len(pids)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def run_in_flower_env(
    cmd: list[str], timeout: float, prefix: str, **extra_env: str
) -> tuple[str, str, float, int, int]:
    """Run ``cmd`` (a Flower script in its venv) with telemetry off and Ray in a private
    temp dir, then stop whatever it left behind by that dir and remove it.

    Returns stdout, stderr (``[timed out]`` appended on a timeout), the wall time, the
    exit code and how many leftover processes were killed."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_TMPDIR=tmp,
        TMPDIR=tmp,
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=tmp,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        out += "\n[timed out]"
    wall = time.perf_counter() - t0
    leftover = _kill_ours(f"RAY_TMPDIR={tmp}".encode())
    shutil.rmtree(tmp, ignore_errors=True)
    return out, err, wall, proc.returncode, leftover


def run_flower(
    python: Path, clients: int, rounds: int, cpus_per_client: float, timeout: float
) -> dict[str, Any]:
    """One run of Flower's sim_bench.py; the parent's wall time and its BENCH_RESULT."""
    cmd = [
        str(python),
        str(FLOWER_DIR / "sim_bench.py"),
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--cpus-per-client",
        str(cpus_per_client),
    ]
    out, err, wall, rc, leftover = run_in_flower_env(cmd, timeout, "flwr-bench-")
    result: dict[str, Any] = {"wall_s": wall, "rc": rc, "leftover_killed": leftover}
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            result["bench"] = json.loads(line[len("BENCH_RESULT ") :])
    for line in err.splitlines():
        if line.startswith("BENCH_TOTAL_SECONDS "):
            result["run_simulation_s"] = float(line.split()[1])
    if "bench" not in result:
        result["error"] = (err + out)[-2000:]
    return result


# --------------------------------------------------------------------------- profile
def profile_fedlearn(clients: int, rounds: int, top: int) -> str:
    """cProfile of one in-process fedlearn run: where the time goes."""
    run_fedlearn(clients, rounds, "inprocess", None)
    prof = cProfile.Profile()
    prof.enable()
    run_fedlearn(clients, rounds, "inprocess", None)
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# --------------------------------------------------------------------------- main
def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10,100,1000", help="comma-separated client counts")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="fedlearn and bare-loop repetitions")
    p.add_argument("--flower-reps", type=int, default=1)
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument("--flower-venv", type=Path, default=DEFAULT_FLOWER_VENV)
    p.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="Flower's Ray num_cpus per client (the peer README's figures use 1)",
    )
    p.add_argument("--flower-timeout", type=float, default=900.0)
    p.add_argument("--workers", type=int, default=None, help="pool workers (default: cores)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one in-process fedlearn run at the largest size",
    )
    p.add_argument("--json", type=Path, default=None, help="also write all results here")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    python = None if args.skip_flower else ensure_flower_venv(args.flower_venv)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, numpy {np.__version__}; rounds={args.rounds}, "
        f"fedlearn reps={args.reps}, flower reps={0 if args.skip_flower else args.flower_reps}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    for n in sizes:
        row: dict[str, Any] = {"clients": n}
        bare_t, _, _ = median_of(lambda n=n: bare_loop(n, args.rounds), args.reps)
        cached_t, _, (ref, ref_acc) = median_of(
            lambda n=n: bare_loop(n, args.rounds, cache=True), args.reps
        )
        row.update(bare_s=bare_t, bare_cached_s=cached_t, bare_acc=ref_acc)
        for backend in ("inprocess", "pool"):
            t, times, res = median_of(
                lambda n=n, b=backend: run_fedlearn(n, args.rounds, b, args.workers), args.reps
            )
            same = all(np.array_equal(res.arrays[k], ref[k]) for k in ref)
            row[backend] = {
                "median_s": t,
                "times_s": times,
                "acc": final_accuracy(res),
                "loss": float(res.rounds[-1].eval_metrics["loss"]),
                "w_norm": float(np.linalg.norm(res.arrays["w"])),
                "bit_identical_to_bare": same,
            }
            print(
                f"clients={n} fedlearn[{backend}] median {t:.3f}s "
                f"({', '.join(f'{x:.3f}' for x in times)}) acc={final_accuracy(res):.5f} "
                f"bit-identical to bare loop: {same}",
                flush=True,
            )
        if python is not None:
            runs = [
                run_flower(python, n, args.rounds, args.cpus_per_client, args.flower_timeout)
                for _ in range(args.flower_reps)
            ]
            good = [r for r in runs if "bench" in r]
            row["flower_runs"] = runs
            if good:
                row["flower_wall_s"] = statistics.median(r["wall_s"] for r in good)
                sims = [r["run_simulation_s"] for r in good if "run_simulation_s" in r]
                row["flower_sim_s"] = statistics.median(sims) if sims else None
                bench = good[-1]["bench"]
                row["flower_eval"] = bench["final_eval_aggregated"]
                row["flower_w_norm"] = bench["final_w_norm"]
                print(
                    f"clients={n} flower wall {row['flower_wall_s']:.3f}s "
                    f"(run_simulation {fmt(row['flower_sim_s'])}s) "
                    f"final_eval_aggregated={bench['final_eval_aggregated']}",
                    flush=True,
                )
            else:
                print(f"clients={n} flower FAILED: {runs[-1].get('error', '')}", flush=True)
        rows.append(row)

    print()
    print(
        f"{'clients':>7} | {'bare':>7} | {'bare+cache':>10} | {'fl inproc':>9} | "
        f"{'fl pool':>7} | {'flower':>8} | {'flwr sim':>8} | {'fl acc':>7} | "
        f"{'flwr acc':>8} | {'|w| fedlearn':>14} | {'|w| rel diff':>12}"
    )
    for r in rows:
        acc = r.get("flower_eval", {}).get("eval_acc")
        fw = r.get("flower_w_norm")
        rel = None if fw is None else abs(r["inprocess"]["w_norm"] - fw) / fw
        print(
            f"{r['clients']:>7} | {r['bare_s']:>7.3f} | {r['bare_cached_s']:>10.3f} | "
            f"{r['inprocess']['median_s']:>9.3f} | {r['pool']['median_s']:>7.3f} | "
            f"{fmt(r.get('flower_wall_s')):>8} | {fmt(r.get('flower_sim_s')):>8} | "
            f"{r['inprocess']['acc']:>7.5f} | {fmt(acc, 5):>8} | "
            f"{r['inprocess']['w_norm']:>14.12f} | {'-' if rel is None else f'{rel:.1e}':>12}"
        )
    print(
        "(seconds for the whole run; 'flower' = subprocess wall incl. interpreter, imports "
        "and Ray start-up; 'flwr sim' = Flower's own run_simulation time, BENCH_TOTAL_SECONDS)"
    )
    print()
    for r in rows:
        n = r["clients"]
        for backend in ("inprocess", "pool"):
            t = r[backend]["median_s"]
            vs_bare = f"fedlearn/bare = {t / r['bare_s']:.3f}"
            if r.get("flower_wall_s"):
                ratio = t / r["flower_wall_s"]
                sim_ratio = t / (r["flower_sim_s"] or r["flower_wall_s"])
                print(
                    f"clients={n} fedlearn/flower = {ratio:.4f} ({1 / ratio:.1f}x faster) "
                    f"[{backend}; vs Flower's run_simulation alone: {sim_ratio:.4f}]; {vs_bare}"
                )
            else:
                print(f"clients={n} [{backend}] {vs_bare}")
    if args.profile:
        print()
        print(profile_fedlearn(max(sizes), args.rounds, 30))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
