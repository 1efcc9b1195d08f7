"""FedAvg vs centralized training of the same CNN on MNIST-5k.

The 5000 digits are split among ``--clients`` clients with a Dirichlet(``--alpha``)
label skew, and every client holds out 20% of its samples. FedAvg trains over the
clients' train splits (worker-pool backend); the centralized baseline trains the same
CNN, from the same initial weights, on the union of those train splits for
``--central-epochs`` epochs (default ``rounds * epochs``: the same number of passes
over the data). Both final models are evaluated on the union of the clients' test
splits. Exits with status 1 if centralized beats FedAvg by more than ``--max-gap``
accuracy points.

Run from the repository root::

    python simulations/mnist_fedavg_vs_centralized.py --clients 20 --alpha 0.5 \
        --rounds 20 --epochs 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `fedlearn` and `clients` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from clients.mnist import build_model, make_app
from fedlearn.apps.torch_app import evaluate_arrays, train_centralized
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.simulation.engine import BackendName, run_simulation
from fedlearn.strategy import FedAvg


@dataclass(frozen=True)
class Comparison:
    """Test accuracies (fractions) of both models and what the run cost."""

    federated_accuracy: float
    federated_client_mean_accuracy: float
    centralized_accuracy: float
    federated_seconds: float
    centralized_seconds: float
    round_accuracies: list[float]

    @property
    def gap_points(self) -> float:
        """Centralized minus federated accuracy, in percentage points."""
        return 100 * (self.centralized_accuracy - self.federated_accuracy)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the old count.

    The pool's workers already run single-threaded. Doing the same here (centralized
    training, in-process runs) keeps the baseline fast (a small CNN gains little from
    a second thread, and OpenMP threads thrash badly when the cores are shared) and
    makes an in-process run bit-identical to a pool run (oneDNN's convolution weight
    gradients are summed in an order that depends on the thread count).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare(
    *,
    clients: int = 20,
    alpha: float = 0.5,
    rounds: int = 20,
    epochs: int = 2,
    lr: float = 0.1,
    momentum: float = 0.0,
    batch_size: int = 32,
    central_epochs: int | None = None,
    seed: int = 0,
    backend: BackendName = "pool",
    evaluate_every: int = 1,
) -> Comparison:
    """Train FedAvg and the centralized baseline; evaluate both on the pooled test set."""
    with torch_threads(1):  # like the pool's workers
        data = partition_dataset(load_dataset("mnist5k"), "dirichlet", clients, seed, alpha=alpha)
        pooled = data.centralized()

        start = time.perf_counter()
        result = run_simulation(
            partial(make_app, data, epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size),
            FedAvg(),
            num_clients=clients,
            rounds=rounds,
            seed=seed,
            backend=backend,
            evaluate_every=evaluate_every,
        )
        _, federated_accuracy = evaluate_arrays(build_model, result.arrays, pooled)
        federated_seconds = time.perf_counter() - start
        round_accuracies = [
            float(r.eval_metrics["accuracy"]) for r in result.rounds if "accuracy" in r.eval_metrics
        ]

        start = time.perf_counter()
        _, centralized_accuracy = train_centralized(
            build_model,
            pooled,
            epochs=rounds * epochs if central_epochs is None else central_epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            seed=seed,
        )
        centralized_seconds = time.perf_counter() - start
        return Comparison(
            federated_accuracy=federated_accuracy,
            federated_client_mean_accuracy=round_accuracies[-1] if round_accuracies else math.nan,
            centralized_accuracy=centralized_accuracy,
            federated_seconds=federated_seconds,
            centralized_seconds=centralized_seconds,
            round_accuracies=round_accuracies,
        )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the comparison, print it; 1 if the gap is too large."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.0, help="local SGD momentum")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--central-epochs", type=int, default=None, help="default: rounds * epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["pool", "inprocess"], default="pool")
    parser.add_argument("--max-gap", type=float, default=3.0, help="in accuracy points")
    args = parser.parse_args(argv)

    c = compare(
        clients=args.clients,
        alpha=args.alpha,
        rounds=args.rounds,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        batch_size=args.batch_size,
        central_epochs=args.central_epochs,
        seed=args.seed,
        backend=args.backend,
    )
    curve = " ".join(f"{100 * a:.1f}" for a in c.round_accuracies)
    print(f"FedAvg accuracy per round (client-weighted, %): {curve}")
    print(
        f"FedAvg      global model on pooled test set: {100 * c.federated_accuracy:6.2f}%  "
        f"(last-round client-weighted mean {100 * c.federated_client_mean_accuracy:.2f}%, "
        f"{c.federated_seconds:.1f} s)"
    )
    print(
        f"Centralized model on pooled test set:        {100 * c.centralized_accuracy:6.2f}%  "
        f"({c.centralized_seconds:.1f} s)"
    )
    print(f"Gap (centralized - FedAvg): {c.gap_points:+.2f} points (max {args.max_gap})")
    return 1 if c.gap_points > args.max_gap else 0


if __name__ == "__main__":
    sys.exit(main())
