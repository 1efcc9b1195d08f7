"""Secure aggregation benchmarks, each printing a ratio measured in the same run.

(a) ``--part flower``: the workload of shared/peers/flower/secagg_bench.py (each client
    returns params + 0.01 * delta(pid), num_examples = 50 + 10 pid; 100 clients x 1M
    parameters, 3 rounds, 5 share holders = 4 neighbours + self, threshold 3) in fedlearn
    and in Flower's SecAgg+ (its peer venv) -> ``secagg fedlearn/flower``.
(c) ``--part mnist``: the MNIST CNN example on 20 clients, one secure round versus one plain
    round -> ``secure/plain round`` (target <= 1.3).
(d) ``--part scale``: 1000 clients x 100k parameters with neighbour degree O(log n) on both
    cores: wall time per round and peak memory (ru_maxrss of this process and its workers).

    python benchmarks/bench_secagg.py --part flower --part mnist --part scale
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult  # noqa: E402
from fedlearn.engine.records import Arrays, Config  # noqa: E402
from fedlearn.secagg.stages import SecureAggregation  # noqa: E402
from fedlearn.simulation import run_simulation  # noqa: E402
from fedlearn.strategy import FedAvg  # noqa: E402

PEER = ROOT.parent / "shared" / "peers" / "flower" / "secagg_bench.py"


def delta(pid: int, n: int) -> np.ndarray:
    """The peer's deterministic per-client change."""
    return np.random.default_rng(pid).normal(size=n).astype(np.float32)


def num_examples(pid: int) -> int:
    return 50 + 10 * pid


class PeerApp:
    """The peer workload as a fedlearn ClientApp (deltas cached per client)."""

    def __init__(self, params: int) -> None:
        self.params = params
        self._deltas: dict[int, np.ndarray] = {}

    def initial_arrays(self, seed: int) -> Arrays:
        return {"p": np.zeros(self.params, np.float32)}

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        d = self._deltas.get(ctx.client_id)
        if d is None:
            d = self._deltas[ctx.client_id] = delta(ctx.client_id, self.params)
        return TrainResult({"p": arrays["p"] + np.float32(0.01) * d}, num_examples(ctx.client_id))

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        return EvaluateResult(1, 0.0)


def fedlearn_peer(clients: int, params: int, rounds: int, secure: bool) -> tuple[float, float]:
    """Wall seconds and max error against the exact FedAvg result."""
    setting = SecureAggregation(clip=0.1, max_weight=2048, neighbours=4, threshold=3)
    t0 = time.perf_counter()
    result = run_simulation(
        lambda: PeerApp(params),
        FedAvg(),
        num_clients=clients,
        rounds=rounds,
        backend="pool",
        evaluate_every=0,
        secure=setting if secure else None,
    )
    wall = time.perf_counter() - t0
    weights = np.array([num_examples(i) for i in range(clients)], dtype=np.float64)
    mean = sum(w * delta(i, params).astype(np.float64) for i, w in enumerate(weights))
    expected = rounds * 0.01 * mean / weights.sum()
    return wall, float(np.max(np.abs(result.arrays["p"] - expected)))


def flower_peer(venv: Path, clients: int, params: int, rounds: int) -> float:
    """Wall seconds of Flower's SecAgg+ on the same workload (its own process)."""
    env = dict(
        os.environ,
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray-"),
    )
    cmd = [
        str(venv / "bin" / "python"),
        str(PEER),
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--params",
        str(params),
        "--secagg",
        "1",
        "--num-shares",
        "5",
        "--threshold",
        "3",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"Flower failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def part_flower(args: argparse.Namespace) -> None:
    venv = ROOT / ".peer-venv-flower"
    ours = [fedlearn_peer(args.clients, args.params, 3, True) for _ in range(args.reps)]
    wall = statistics.median(w for w, _ in ours)
    print(
        f"fedlearn SecAgg+ {args.clients} clients x {args.params:,} params x 3 rounds: "
        f"{wall:.2f} s (median of {args.reps}); max error vs exact {ours[0][1]:.2e}"
    )
    plain = statistics.median(
        fedlearn_peer(args.clients, args.params, 3, False)[0] for _ in range(args.reps)
    )
    print(f"fedlearn plain FedAvg, same workload: {plain:.2f} s")
    if not venv.exists():
        print(f"no Flower venv at {venv}: run shared/peers/flower/setup.sh .peer-venv-flower")
        return
    theirs = flower_peer(venv, args.clients, args.params, 3)
    print(f"Flower SecAgg+ (same run): {theirs:.2f} s")
    print(f"secagg fedlearn/flower = {wall / theirs:.3f} ({theirs / wall:.1f}x faster)")


def part_mnist(args: argparse.Namespace) -> None:
    from clients.mnist import make_app
    from fedlearn.data import load_dataset, partition_dataset

    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", 20, 0, alpha=0.5)
    factory = lambda: make_app(data, epochs=1, batch_size=32, lr=0.05)  # noqa: E731
    secure = SecureAggregation(clip=1.0, max_weight=4096)
    times: dict[str, list[float]] = {"plain": [], "secure": []}
    for _ in range(args.reps):
        for kind in ("plain", "secure"):
            result = run_simulation(
                factory,
                FedAvg(),
                num_clients=20,
                rounds=2,
                backend="pool",
                evaluate_every=0,
                secure=secure if kind == "secure" else None,
            )
            times[kind].append(result.rounds[-1].duration_s)  # round 2: workers warm
    plain, sec = statistics.median(times["plain"]), statistics.median(times["secure"])
    print(
        f"MNIST CNN, 20 clients: plain round {plain:.2f} s, secure round {sec:.2f} s "
        f"(medians of {args.reps}, round 2)"
    )
    print(f"secure/plain round = {sec / plain:.2f} (target <= 1.3)")


def part_scale(args: argparse.Namespace) -> None:
    secure = SecureAggregation(clip=0.1, max_weight=16384)
    t0 = time.perf_counter()
    result = run_simulation(
        lambda: PeerApp(100_000),
        FedAvg(),
        num_clients=1000,
        rounds=2,
        backend="pool",
        evaluate_every=0,
        secure=secure,
    )
    wall = time.perf_counter() - t0
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    cfg = secure.round_config(list(range(1000)), 100_000, 0, 1)
    print(
        f"scale: 1000 clients x 100,000 params, k={cfg.num_neighbours}, t={cfg.threshold}: "
        f"{wall:.1f} s for 2 rounds ({[round(r.duration_s, 1) for r in result.rounds]} s "
        f"per round); peak RSS coordinator {own:.0f} MiB, largest worker {kids:.0f} MiB; "
        f"rounds ok: {[r.ok for r in result.rounds]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", action="append", choices=["flower", "mnist", "scale"])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    for part in args.part or ["flower", "mnist", "scale"]:
        {"flower": part_flower, "mnist": part_mnist, "scale": part_scale}[part](args)
    if args.json:
        Path(args.json).write_text(json.dumps(vars(args)))


if __name__ == "__main__":
    main()
