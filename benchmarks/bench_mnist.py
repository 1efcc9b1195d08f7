"""The MNIST CNN main job at 100 and 250 clients: fedlearn (pool and Ray), Flower's Ray
simulation and a bare torch loop, in the same run (issue 12, acceptance 3).

Workload: MNIST-5k, the CNN of ``clients/mnist.py``, Dirichlet 0.5, 5 rounds, 1 local epoch
(SGD lr 0.1, batch 32), every client trains and evaluates every round.

* fedlearn: ``fedlearn simulate`` as its own process (interpreter, imports, data, run
  store, report and plots included), ``backend.kind`` = ``pool`` (2 workers) and ``ray``;
* Flower: ``shared/peers/flower/mnist_bench.py`` (the same data split, model, initial
  weights, seeds and updates) under Flower's Ray simulation in the Flower venv, 1 CPU per
  client, through ``run_in_flower_env`` (telemetry off, private Ray temp dir);
* bare: ``shared/peers/limits/mnist_bare_loop.py``, one process, one thread.

At 250 clients no Dirichlet(0.5) draw gives every client the 10 samples all three require
by default: ``--min-size 5`` sets fedlearn's ``data.min_size`` and the peers' (through
``benchmarks/peer_min_size/sitecustomize.py`` on their ``PYTHONPATH``), so all three
still split the data identically.

Prints the whole-run ratio ``fedlearn/flower`` (target <= 0.2, i.e. >= 5x) and the steady
round (median of rounds 2..5) against the bare loop's divided by the cores fedlearn uses
(target <= 1.1)::

    python benchmarks/bench_mnist.py --clients 100 --flower-python .peer-venv-flower/bin/python
    python benchmarks/bench_mnist.py --clients 250 --min-size 5 \\
        --flower-python .peer-venv-flower/bin/python
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # first: Opacus's wheel installs a package named "benchmarks"

from benchmarks.bench_sim_vs_flower import run_in_flower_env  # noqa: E402
from benchmarks.peers import flower_peer_dir, load  # noqa: E402

ROUNDS = 5
WORKERS = 2
MIN_SIZE = 10
"""The peers' own Dirichlet min_size (and fedlearn's default)."""
PEER_HOOK = Path(__file__).resolve().parent / "peer_min_size"


def peer_env(min_size: int) -> dict[str, str]:
    """Environment that lowers the peers' min_size in each of their processes."""
    if min_size == MIN_SIZE:
        return {}
    path = os.pathsep.join(filter(None, [str(PEER_HOOK), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "FEDLEARN_PEER_MIN_SIZE": str(min_size)}


def steady(rounds: list[float]) -> float:
    """The median of rounds 2.. (round 1 carries the workers' start and first data)."""
    return statistics.median(rounds[1:] if len(rounds) > 1 else rounds)


def run_fedlearn(clients: int, backend: str, min_size: int = MIN_SIZE) -> dict[str, Any]:
    """``fedlearn simulate`` of the main job as its own process."""
    exe = Path(sys.executable).parent / "fedlearn"
    with tempfile.TemporaryDirectory(prefix="fl-mnist-") as tmp:
        out = Path(tmp) / "run"
        cmd = [str(exe), "simulate", "--clients", str(clients), "--rounds", str(ROUNDS)]
        cmd += ["--out", str(out), "--no-check-serving", "--set", "publish.enabled=false"]
        for setting in ("epochs=1", "batch_size=32", "lr=0.1"):
            cmd += ["--set", f"client.params.{setting}"]
        cmd += ["--set", f"backend.kind={backend}", "--set", f"backend.workers={WORKERS}"]
        cmd += ["--set", f"data.min_size={min_size}"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"fedlearn simulate failed:\n{(done.stdout + done.stderr)[-3000:]}")
        with (out / "rounds.csv").open() as f:
            rows = list(csv.DictReader(f))
    return {
        "wall_s": wall,
        "rounds_s": [float(r["duration_s"]) for r in rows],
        "accuracy": float(rows[-1]["accuracy_mean"]),
    }


def run_flower(python: Path, clients: int, min_size: int = MIN_SIZE) -> dict[str, Any]:
    """Flower's run of the same job (mnist_bench.py) in its own venv."""
    script = flower_peer_dir() / "mnist_bench.py"
    cmd = [str(python), str(script), "--clients", str(clients), "--rounds", str(ROUNDS)]
    out, err, wall, rc, _ = run_in_flower_env(cmd, 1800, "fl-mnist-flwr-", **peer_env(min_size))
    if rc != 0:
        raise SystemExit(f"Flower failed:\n{(out + err)[-3000:]}")
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    rounds = [
        float(v) for _, v in sorted(result["round_seconds"].items(), key=lambda kv: int(kv[0]))
    ]
    return {
        "wall_s": wall,
        "rounds_s": rounds,
        "accuracy": float(result["final_eval_aggregated"].get("eval_acc", float("nan"))),
    }


def run_bare(clients: int, min_size: int = MIN_SIZE) -> dict[str, Any]:
    """The bare torch loop, one process and one thread (imported as a module, so that
    ``--min-size`` reaches it, then its ``main()``)."""
    script = flower_peer_dir().parent / "limits" / "mnist_bare_loop.py"
    argv = [str(script), "--clients", str(clients), "--rounds", str(ROUNDS)]
    code = (
        f"import sys; sys.path.insert(0, {str(script.parent)!r}); sys.argv = {argv!r}; "
        "import mnist_bare_loop; mnist_bare_loop.main()"
    )
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, **peer_env(min_size)},
    )
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bare loop failed:\n{(done.stdout + done.stderr)[-3000:]}")
    rounds = [float(m) for m in re.findall(r"^round \d+: .*\(([\d.]+) s\)$", done.stdout, re.M)]
    acc = re.search(r"FINAL_EVAL_ACC ([\d.]+)", done.stdout)
    return {"wall_s": wall, "rounds_s": rounds, "accuracy": float(acc.group(1)) if acc else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, action="append", help="repeat: 100, 250")
    p.add_argument("--flower-python", type=Path, default=REPO / ".peer-venv-flower/bin/python")
    p.add_argument("--backends", default="pool,ray")
    p.add_argument("--min-size", type=int, default=MIN_SIZE, help="Dirichlet min per client")
    args = p.parse_args()
    sizes = args.clients or [100, 250]
    print(f"{os.cpu_count()} cores; load at start {load()}", flush=True)
    for n in sizes:
        got: dict[str, dict[str, Any]] = {}
        for backend in args.backends.split(","):
            got[backend] = run_fedlearn(n, backend, args.min_size)
        got["flower"] = run_flower(args.flower_python.absolute(), n, args.min_size)
        got["bare"] = run_bare(n, args.min_size)
        for name, r in got.items():
            print(
                f"clients={n} {name:>6}: wall {r['wall_s']:7.2f} s, steady round "
                f"{steady(r['rounds_s']):6.3f} s, rounds "
                f"{', '.join(f'{x:.2f}' for x in r['rounds_s'])}, accuracy {r['accuracy']}",
                flush=True,
            )
        flower, bare = got["flower"], got["bare"]
        floor = steady(bare["rounds_s"]) / WORKERS
        for backend in args.backends.split(","):
            r = got[backend]
            print(
                f"clients={n} fedlearn[{backend}]/flower = {r['wall_s'] / flower['wall_s']:.3f} "
                f"(whole run, target <= 0.2); steady round / (bare / {WORKERS} cores) = "
                f"{steady(r['rounds_s']) / floor:.3f} (target <= 1.1)",
                flush=True,
            )
    print(f"load at end {load()}")


if __name__ == "__main__":
    main()
