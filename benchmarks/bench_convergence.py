"""Rounds to a target accuracy under strong label skew: FedAvg, FedProx, SCAFFOLD, FedNova.

MNIST-5k over ``--clients`` clients with a Dirichlet(``--alpha``) label skew (every client
at least ``--min-size`` samples, 20 % of them held out), the MNIST CNN of
``clients/mnist.py`` trained with the same local settings under every strategy. A run
stops at the first round whose weighted accuracy over the clients' test splits (the
round's evaluation ``accuracy``) reaches ``--target``, or after ``--max-rounds``. Prints
one row per strategy: mean and spread of the rounds over the seeds, and each seed's count
(``>N``: not reached in N rounds).

Run from the repository root::

    python benchmarks/bench_convergence.py --clients 50 --alpha 0.1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fedlearn` and `clients` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from clients.mnist import make_app
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.simulation import run_simulation
from fedlearn.strategy import Strategy, build_strategy

STRATEGIES: dict[str, tuple[str, dict[str, object]]] = {
    "FedAvg": ("fedavg", {}),
    "FedProx (mu=0.01)": ("fedprox", {"proximal_mu": 0.01}),
    "SCAFFOLD": ("scaffold", {}),
    "FedNova": ("fednova", {}),
}


class Accuracy:
    """Keeps each round's weighted evaluation accuracy (an Observer)."""

    def __init__(self) -> None:
        self.rounds: list[float] = []

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        pass

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        self.rounds.append(float(record.eval_metrics.get("accuracy", 0.0)))


def rounds_to_target(
    strategy: Strategy,
    *,
    clients: int,
    alpha: float,
    seed: int,
    target: float,
    max_rounds: int,
    epochs: int,
    lr: float,
    batch_size: int,
    workers: int | None,
    min_size: int,
) -> int | None:
    """The first round whose weighted accuracy reaches ``target`` (None: not reached)."""
    data = partition_dataset(
        load_dataset("mnist5k"), "dirichlet", clients, seed, alpha=alpha, min_size=min_size
    )
    seen = Accuracy()

    def stop(rnd: int) -> str | None:
        return "reached" if seen.rounds and seen.rounds[-1] >= target else None

    run_simulation(
        partial(make_app, data, epochs=epochs, lr=lr, batch_size=batch_size),
        strategy,
        num_clients=clients,
        rounds=max_rounds,
        seed=seed,
        backend="pool",
        workers=workers,
        observer=seen,
        stop_before=stop,
    )
    hit = [i for i, acc in enumerate(seen.rounds, start=1) if acc >= target]
    return hit[0] if hit else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--max-rounds", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--min-size", type=int, default=5, help="fewest samples per client")
    parser.add_argument("--only", nargs="*", default=None, help="strategy labels to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"MNIST-5k, {args.clients} clients, Dirichlet alpha={args.alpha}, "
        f"{args.epochs} local epochs, lr {args.lr}, batch {args.batch_size}: "
        f"rounds to {args.target:.0%} weighted accuracy (max {args.max_rounds})"
    )
    for label, (name, params) in STRATEGIES.items():
        if args.only and label not in args.only:
            continue
        start = time.perf_counter()
        counts = [
            rounds_to_target(
                build_strategy(name, params),
                clients=args.clients,
                alpha=args.alpha,
                seed=seed,
                target=args.target,
                max_rounds=args.max_rounds,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                workers=args.workers,
                min_size=args.min_size,
            )
            for seed in args.seeds
        ]
        shown = [str(c) if c is not None else f">{args.max_rounds}" for c in counts]
        reached = [c for c in counts if c is not None]
        summary = (
            f"{statistics.mean(reached):.1f} (min {min(reached)}, max {max(reached)})"
            if len(reached) == len(counts)
            else f"{len(reached)}/{len(counts)} seeds reached"
        )
        print(
            f"| {label} | {summary} | {', '.join(shown)} | {time.perf_counter() - start:.0f} s |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
