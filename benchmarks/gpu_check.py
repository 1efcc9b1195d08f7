"""Client training on a GPU versus the CPU: the same federated MNIST run on both devices.

Runs FedAvg over MNIST-5k (Dirichlet 0.5) with the clients' TorchClientApp on ``cpu`` and
on ``cuda``, in the same process, and prints each round's accuracy, the final accuracy
gap, the largest weight difference after the first round and the time ratio. Needs a
CUDA device (run on the device machine); ``--devices cpu`` runs the CPU half alone.
``--backends inprocess,pool,ray`` runs each backend in turn in one process: the
in-process run touches CUDA (and trains) in the parent before the pool starts its workers,
which the pool's default start method (``forkserver`` with a CUDA build) must survive;
Ray's actors each reserve half a GPU.

    python benchmarks/gpu_check.py --clients 20 --rounds 5 --epochs 2
    python benchmarks/gpu_check.py --backends inprocess,pool,ray --devices cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(REPO))

from clients import mnist  # noqa: E402
from fedlearn.data import load_dataset, partition_dataset  # noqa: E402
from fedlearn.simulation import run_simulation  # noqa: E402
from fedlearn.simulation.engine import make_transport  # noqa: E402
from fedlearn.strategy import FedAvg  # noqa: E402


def run(device: str, backend: str, args: argparse.Namespace) -> dict[str, object]:
    """One seeded federated run with the clients training on ``device`` in ``backend``."""
    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", args.clients, 0, alpha=0.5)
    factory = functools.partial(
        mnist.make_app, data, epochs=args.epochs, batch_size=32, lr=0.1, device=device
    )
    strategy = FedAvg(min_train_clients=args.clients // 2)
    start = time.perf_counter()
    # one in-process round for the weight comparison
    first = (
        run_simulation(factory, strategy, num_clients=args.clients, rounds=1, seed=0)
        if backend == "inprocess"
        else None
    )
    gpus = 0.5 if backend == "ray" and device == "cuda" else 0.0
    transport = make_transport(backend, factory, workers=2, num_gpus=gpus)  # type: ignore[arg-type]
    try:
        result = run_simulation(
            factory,
            strategy,
            num_clients=args.clients,
            rounds=args.rounds,
            seed=0,
            backend=transport,
        )
    finally:
        transport.close()
    seconds = time.perf_counter() - start
    accuracy = [float(r.eval_metrics.get("accuracy", float("nan"))) for r in result.rounds]
    failures = [c.error for c in result.clients if not c.ok]
    if failures:
        print(f"{device}: {len(failures)} failed tasks, e.g. {failures[0]}", flush=True)
    return {
        "failed_tasks": len(failures),
        "device": device,
        "backend": backend,
        "seconds": seconds,
        "accuracy": accuracy,
        "round1": {} if first is None else {k: np.asarray(v) for k, v in first.arrays.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--backends", default="inprocess", help="inprocess,pool,ray")
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    devices = args.devices.split(",")
    summary: dict[str, object] = {}
    for backend in args.backends.split(","):
        results = {d: run(d, backend, args) for d in devices}
        if "cuda" in devices:
            print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
        for d, r in results.items():
            acc = " ".join(f"{a:.4f}" for a in r["accuracy"])  # type: ignore[attr-defined]
            print(
                f"{backend:9s} {d:5s} {r['seconds']:.2f} s  failed {r['failed_tasks']}  "
                f"accuracy per round: {acc}",
                flush=True,
            )
        part: dict[str, object] = {
            d: {"seconds": r["seconds"], "accuracy": r["accuracy"], "failed": r["failed_tasks"]}
            for d, r in results.items()
        }
        if {"cpu", "cuda"} <= results.keys():
            cpu, gpu = results["cpu"], results["cuda"]
            gap = abs(gpu["accuracy"][-1] - cpu["accuracy"][-1])  # type: ignore[index]
            diff = max(
                (
                    float(np.abs(gpu["round1"][k] - cpu["round1"][k]).max())  # type: ignore[index]
                    for k in cpu["round1"]  # type: ignore[attr-defined]
                ),
                default=float("nan"),
            )
            ratio = float(gpu["seconds"]) / float(cpu["seconds"])  # type: ignore[arg-type]
            print(f"{backend}: final accuracy gap |cuda - cpu| = {gap:.4f}")
            if backend == "inprocess":
                print(f"{backend}: max |w_cuda - w_cpu| after round 1 = {diff:.2e}")
            print(f"{backend}: time cuda/cpu = {ratio:.2f}")
            part.update(accuracy_gap=gap, round1_max_weight_diff=diff, time_ratio=ratio)
        summary[backend] = part
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
