"""Virtual wall-clock time to a target accuracy: FedBuff versus synchronous FedAvg.

MNIST-5k over ``--clients`` clients with a Dirichlet(``--alpha``) label skew (as
``bench_convergence.py``: every client at least ``--min-size`` samples, 20 % held out),
the MNIST CNN of ``clients/mnist.py``, the same local settings under every strategy. Each
training task takes a simulated time drawn from a log-normal latency (median 1, ``--sigma``)
on the virtual clock (:mod:`fedlearn.engine.clock`):

* synchronous FedAvg waits for its slowest sampled client: a round lasts the largest
  latency among the clients it selected;
* FedBuff keeps ``M`` clients training and aggregates every ``K`` replies with staleness
  weight ``1/sqrt(1 + tau)``; its rounds end at the virtual time of their K-th reply.

Every round (aggregation) is evaluated on every client; a run stops at the first round
whose weighted accuracy reaches ``--target``. Prints per strategy the virtual time to the
target (mean and spread over the seeds, and each seed's), the rounds it took and how many
client trainings that cost, and the ratio of each mean time to synchronous FedAvg's
(the first row) measured in the same invocation.

Run from the repository root::

    python benchmarks/bench_fedbuff.py --clients 50 --alpha 0.1 --sigma 1 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fedlearn` and `clients` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from clients.mnist import make_app
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.engine.clock import Latency
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.simulation import run_simulation
from fedlearn.strategy import Strategy, build_strategy


class Progress:
    """Keeps each round's weighted accuracy and virtual time (an Observer)."""

    def __init__(self) -> None:
        self.rounds: list[tuple[float, float]] = []
        self.trainings = 0

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        if stage is Stage.TRAIN:
            self.trainings += num_tasks

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        accuracy = float(record.eval_metrics.get("accuracy", 0.0))
        self.rounds.append((accuracy, float(record.virtual_time or 0.0)))


@dataclass(frozen=True)
class Reached:
    """Where a run reached the target (None fields: it did not)."""

    time: float | None
    rounds: int | None
    trainings: int
    last_time: float


def time_to_target(
    strategy: Strategy,
    *,
    latency: Latency,
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
) -> Reached:
    """The virtual time of the first round whose weighted accuracy reaches ``target``."""
    data = partition_dataset(
        load_dataset("mnist5k"), "dirichlet", clients, seed, alpha=alpha, min_size=min_size
    )
    seen = Progress()

    def stop(rnd: int) -> str | None:
        return "reached" if seen.rounds and seen.rounds[-1][0] >= target else None

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
        latency=latency,
    )
    last = seen.rounds[-1][1] if seen.rounds else 0.0
    for i, (accuracy, at) in enumerate(seen.rounds, start=1):
        if accuracy >= target:
            return Reached(at, i, seen.trainings, last)
    return Reached(None, None, seen.trainings, last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal latency sigma")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument(
        "--sync-fractions",
        type=float,
        nargs="+",
        default=[0.4, 1.0],
        help="FedAvg's share of clients per round, one row each (the first is the baseline)",
    )
    parser.add_argument("--buffer-size", type=int, default=10, help="FedBuff's K")
    parser.add_argument("--concurrency", type=int, default=20, help="FedBuff's M")
    parser.add_argument("--server-lr", type=float, default=1.0, help="FedBuff's eta_g")
    parser.add_argument("--max-rounds", type=int, default=60, help="synchronous rounds")
    parser.add_argument("--max-aggregations", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--min-size", type=int, default=5, help="fewest samples per client")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    latency = Latency("lognormal", median=1.0, sigma=args.sigma)
    runs: list[tuple[str, Strategy, int]] = [
        (
            f"FedAvg, {max(int(f * args.clients), 1)} clients a round (synchronous)",
            build_strategy("fedavg", {"fraction_train": f}),
            args.max_rounds,
        )
        for f in args.sync_fractions
    ]
    runs.append(
        (
            f"FedBuff, K = {args.buffer_size}, M = {args.concurrency}, eta_g = {args.server_lr:g}",
            build_strategy(
                "fedbuff",
                {
                    "buffer_size": args.buffer_size,
                    "concurrency": args.concurrency,
                    "server_learning_rate": args.server_lr,
                },
            ),
            args.max_aggregations,
        )
    )
    print(
        f"MNIST-5k, {args.clients} clients, Dirichlet alpha={args.alpha}, {args.epochs} local "
        f"epochs, lr {args.lr}, batch {args.batch_size}; log-normal latency (median 1, "
        f"sigma {args.sigma:g}); virtual time to {args.target:.0%} weighted accuracy; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        "| strategy | virtual time to target, mean (min, max) | per seed | rounds per seed "
        "| client trainings per seed | time vs FedAvg | wall, all seeds |"
    )
    print("|---|---|---|---|---|---|---|")
    baseline: float | None = None
    for label, strategy, max_rounds in runs:
        start = time.perf_counter()
        results = [
            time_to_target(
                strategy,
                latency=latency,
                clients=args.clients,
                alpha=args.alpha,
                seed=seed,
                target=args.target,
                max_rounds=max_rounds,
                epochs=args.epochs,
                lr=args.lr,
                batch_size=args.batch_size,
                workers=args.workers,
                min_size=args.min_size,
            )
            for seed in args.seeds
        ]
        times = [r.time for r in results if r.time is not None]
        shown = [f"{r.time:.1f}" if r.time is not None else f">{r.last_time:.1f}" for r in results]
        rounds = [str(r.rounds) if r.rounds is not None else f">{max_rounds}" for r in results]
        if len(times) == len(results):
            mean = statistics.mean(times)
            summary = f"{mean:.1f} ({min(times):.1f}, {max(times):.1f})"
            baseline = mean if baseline is None else baseline
            ratio = f"{mean / baseline:.2f}x"
        else:
            summary = f"{len(times)}/{len(results)} seeds reached"
            ratio = "-"
        print(
            f"| {label} | {summary} | {', '.join(shown)} | {', '.join(rounds)} | "
            f"{', '.join(str(r.trainings) for r in results)} | {ratio} | "
            f"{time.perf_counter() - start:.0f} s |",
            flush=True,
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
