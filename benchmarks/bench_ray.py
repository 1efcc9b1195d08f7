"""fedlearn's Ray backend versus Flower's Ray simulation on the Flower peer workload.

Workload: ``shared/peers/flower/sim_bench.py`` (FedAvg over a numpy logistic regression,
every client trains and evaluates every round; fedlearn's copy is
``benchmarks/peer_workload.py``), at ``--clients`` clients for ``--rounds`` rounds, in
the same run:

* fedlearn, ``backend="ray"``: a whole run including starting a private local Ray (its
  own temp dir) and shutting it down, one actor per core; the pool backend for context;
* Flower 1.42.0 (``sim_bench.py`` in its own venv, Ray backend, ``num_cpus`` per client
  ``--cpus-per-client``), run by ``bench_sim_vs_flower.run_flower``: Ray in a private
  temp dir, telemetry off, leftovers stopped by pid, never ``ray stop``.

fedlearn's final model must be bit-identical to the bare loop's (the same numpy code with
no framework) and its final accuracy equal to Flower's. Prints the ratio against Flower's
whole process and against its ``run_simulation`` call alone.

Usage (from the repo root)::

    python benchmarks/bench_ray.py --clients 1000 --rounds 5 \\
        --flower-venv /work/wt/serving/.peer-venv-flower
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.bench_sim_vs_flower import (  # noqa: E402
    DEFAULT_FLOWER_VENV,
    ensure_flower_venv,
    final_accuracy,
    run_flower,
)
from benchmarks.peer_workload import PeerLogReg, bare_loop  # noqa: E402
from benchmarks.peers import load  # noqa: E402
from fedlearn.engine.results import RunResult  # noqa: E402
from fedlearn.simulation.engine import run_simulation  # noqa: E402
from fedlearn.simulation.ray_session import RaySession  # noqa: E402
from fedlearn.strategy.base import Strategy  # noqa: E402


def run_fedlearn(clients: int, rounds: int, backend: str) -> tuple[float, RunResult]:
    """Wall time of one whole fedlearn run (Ray started and stopped inside) and its result."""
    t0 = time.perf_counter()
    result = run_simulation(
        PeerLogReg,
        Strategy(),
        num_clients=clients,
        rounds=rounds,
        seed=0,
        backend=backend,  # type: ignore[arg-type]
    )
    return time.perf_counter() - t0, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="fedlearn repetitions (median)")
    p.add_argument("--flower-reps", type=int, default=1)
    p.add_argument("--flower-venv", type=Path, default=DEFAULT_FLOWER_VENV)
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--flower-timeout", type=float, default=900.0)
    p.add_argument("--skip-flower", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()
    n, rounds = args.clients, args.rounds
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load {load()}; python {platform.python_version()}, numpy {np.__version__}; "
        f"clients={n} rounds={rounds}",
        flush=True,
    )
    reference, _ = bare_loop(n, rounds, cache=True)
    out: dict[str, Any] = {"clients": n, "rounds": rounds, "load_before": load()}
    for backend in ("ray", "pool"):
        times, result = [], None
        for _ in range(args.reps):
            t, result = run_fedlearn(n, rounds, backend)
            times.append(t)
        assert result is not None
        same = all(np.array_equal(result.arrays[k], reference[k]) for k in reference)
        out[backend] = {
            "median_s": statistics.median(times),
            "times_s": times,
            "acc": final_accuracy(result),
            "bit_identical_to_bare": same,
            "failed": sum(not c.ok for c in result.clients),
        }
        print(
            f"fedlearn[{backend}] median {statistics.median(times):.3f}s "
            f"({', '.join(f'{x:.3f}' for x in times)}) acc={final_accuracy(result):.5f} "
            f"bit-identical to the bare loop: {same}",
            flush=True,
        )
    t0 = time.perf_counter()
    session = RaySession()
    t1 = time.perf_counter()
    session.close()
    out["ray_start_s"], out["ray_stop_s"] = t1 - t0, time.perf_counter() - t1
    print(
        f"of which a private local Ray's start-up {out['ray_start_s']:.3f}s and shutdown "
        f"{out['ray_stop_s']:.3f}s (measured alone)",
        flush=True,
    )
    if not args.skip_flower:
        python = ensure_flower_venv(args.flower_venv)
        runs = [
            run_flower(python, n, rounds, args.cpus_per_client, args.flower_timeout)
            for _ in range(args.flower_reps)
        ]
        good = [r for r in runs if "bench" in r]
        out["flower_runs"] = runs
        if not good:
            print(f"flower FAILED: {runs[-1].get('error', '')}", flush=True)
        else:
            wall = statistics.median(r["wall_s"] for r in good)
            sims = [r["run_simulation_s"] for r in good if "run_simulation_s" in r]
            sim = statistics.median(sims) if sims else wall
            flower_acc = good[-1]["bench"]["final_eval_aggregated"].get("eval_acc")
            out.update(flower_wall_s=wall, flower_sim_s=sim, flower_acc=flower_acc)
            print(
                f"flower wall {wall:.3f}s (run_simulation {sim:.3f}s) acc={flower_acc}",
                flush=True,
            )
            for backend in ("ray", "pool"):
                t = out[backend]["median_s"]
                print(
                    f"clients={n} fedlearn[{backend}] {t:.3f}s vs flower {wall:.3f}s: "
                    f"{wall / t:.1f}x faster (vs Flower's run_simulation alone: "
                    f"{sim / t:.1f}x); same accuracy (to rounding): "
                    f"{math.isclose(out[backend]['acc'], flower_acc, rel_tol=1e-12)}"
                )
    out["load_after"] = load()
    print(f"load after: {out['load_after']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
