"""Distributed DP under SecAgg+ versus SecAgg+ alone, measured in the same run.

(a) ``--part mnist``: the MNIST CNN example on 20 clients (Dirichlet 0.5), one secure round
    with each client's Skellam share versus one secure round without: round 2 (workers
    warm), the two kinds alternating, medians -> ``dp+secagg / secagg round`` (target
    <= 1.1).
(b) ``--part peer``: bench_secagg's peer workload (no training: each client returns a
    fixed change), ``--clients`` x ``--params``, 2 rounds in one process; medians of the
    CPU seconds of whole runs -> the same ratio on a workload that is nothing but secure
    aggregation.
(b'') ``--part logreg``: the Flower peer workload of ``shared/peers/flower/sim_bench.py``
    (``benchmarks/peer_workload.py``: logistic regression, 21 parameters, every client
    trains 5 epochs and evaluates), ``--clients`` clients, 5 rounds in one process, CPU
    seconds of whole runs -> the ratio where the model is small and SecAgg+'s per-client
    key agreement is most of a round.
(b') ``--part cpu``: (a) in one process (in-process backend, one torch thread), CPU seconds
    of the whole 2-round run: the same ratio, robust to a busy shared machine.
(c) ``--part client``: one client's cost of its noise share for ``--params`` coordinates
    (L2 clip, conditional rounding, Skellam from the ChaCha20 keystream) next to its
    plain quantization, both without masks -> the added work per coordinate.

    python benchmarks/bench_distributed_dp.py --part mnist --part peer --part client
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks.bench_secagg import PeerApp  # noqa: E402
from fedlearn.privacy.distributed import DistributedNoise, noised_integers  # noqa: E402
from fedlearn.privacy.noise import secure_noise  # noqa: E402
from fedlearn.secagg import SecAggConfig  # noqa: E402
from fedlearn.secagg.quantize import quantize  # noqa: E402
from fedlearn.secagg.stages import SecureAggregation  # noqa: E402
from fedlearn.simulation import run_simulation  # noqa: E402
from fedlearn.strategy import FedAvg  # noqa: E402

SIGMA = 1.0


def _alternate(reps: int, run: Callable[[bool], float]) -> tuple[float, float]:
    """Medians of ``run(False)`` (SecAgg alone) and ``run(True)`` (with DP), alternated."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for dp in (False, True):
            times[dp].append(run(dp))
    return statistics.median(times[False]), statistics.median(times[True])


def _mnist_factory() -> Callable[[], Any]:
    """The MNIST CNN example on 20 clients (Dirichlet 0.5)."""
    from clients.mnist import make_app
    from fedlearn.data import load_dataset, partition_dataset

    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", 20, 0, alpha=0.5)
    return lambda: make_app(data, epochs=1, batch_size=32, lr=0.05)


def part_mnist(args: argparse.Namespace) -> None:
    factory = _mnist_factory()
    base = SecureAggregation(clip=1.0, max_weight=4096)
    noised = base.with_noise(DistributedNoise(SIGMA), clip=1.0)

    def run(dp: bool) -> float:
        result = run_simulation(
            factory,
            FedAvg(),
            num_clients=20,
            rounds=2,
            backend="pool",
            evaluate_every=0,
            secure=noised if dp else base,
        )
        return result.rounds[-1].duration_s

    plain, dp = _alternate(args.reps, run)
    print(
        f"MNIST CNN, 20 clients: SecAgg+ round {plain:.3f} s, with distributed DP "
        f"{dp:.3f} s (medians of {args.reps}, round 2)"
    )
    print(f"dp+secagg / secagg round (mnist) = {dp / plain:.3f} (target <= 1.1)")


def part_cpu(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    base = SecureAggregation(clip=1.0, max_weight=4096)
    plain, dp = _cpu_medians(args.reps, _mnist_factory(), 20, 2, base, evaluate_every=0)
    print(
        f"MNIST CNN, 20 clients, 2 rounds in one process (1 torch thread): CPU {plain:.3f} s "
        f"with SecAgg+, {dp:.3f} s with distributed DP (medians of {args.reps})"
    )
    print(f"dp+secagg / secagg CPU (mnist) = {dp / plain:.3f} (target <= 1.1)")


def _cpu_medians(
    reps: int, factory: Callable[[], Any], clients: int, rounds: int, base: Any, **kw: Any
) -> tuple[float, float]:
    """Medians of the CPU seconds of whole in-process runs with ``base`` (SecAgg+ alone)
    and with distributed DP added to it, the two alternating."""
    noised = base.with_noise(DistributedNoise(SIGMA), clip=1.0)

    def run(dp: bool) -> float:
        t0 = time.process_time()
        run_simulation(
            factory,
            FedAvg(),
            num_clients=clients,
            rounds=rounds,
            backend="inprocess",
            secure=noised if dp else base,
            **kw,
        )
        return time.process_time() - t0

    return _alternate(reps, run)


def part_peer(args: argparse.Namespace) -> None:
    base = SecureAggregation(clip=0.1, max_weight=2048, neighbours=4, threshold=3)
    factory = lambda: PeerApp(args.params)  # noqa: E731
    plain, dp = _cpu_medians(args.reps, factory, args.clients, 2, base, evaluate_every=0)
    print(
        f"peer workload {args.clients} clients x {args.params:,} params x 2 rounds in one "
        f"process: CPU {plain:.2f} s with SecAgg+, {dp:.2f} s with distributed DP (medians "
        f"of {args.reps})"
    )
    print(f"dp+secagg / secagg CPU (peer) = {dp / plain:.3f}")


def part_logreg(args: argparse.Namespace) -> None:
    from benchmarks.peer_workload import PeerLogReg

    base = SecureAggregation(clip=10.0, max_weight=4096)
    plain, dp = _cpu_medians(args.reps, PeerLogReg, args.clients, 5, base)
    print(
        f"Flower peer workload (logistic regression), {args.clients} clients x 5 rounds in "
        f"one process: CPU {plain:.2f} s with SecAgg+, {dp:.2f} s with distributed DP "
        f"(medians of {args.reps})"
    )
    print(f"dp+secagg / secagg CPU (logreg) = {dp / plain:.3f} (target <= 1.1)")


def part_client(args: argparse.Namespace) -> None:
    d = args.params
    cfg = SecAggConfig.create(range(100), d, max_weight=1, clip=1.0, noise=DistributedNoise(SIGMA))
    noise = cfg.round_noise
    assert noise is not None
    x = np.random.default_rng(0).normal(size=d).astype(np.float32)
    source = secure_noise()

    def best(fn: Callable[[], object]) -> float:
        fn()
        return min(_time(fn) for _ in range(args.reps))

    noised = best(lambda: noised_integers(x, noise, source))
    plain = best(lambda: quantize(x, 1, clip=1.0, scale_bits=cfg.scale_bits, modulus_bits=32))
    print(
        f"client, {d:,} coordinates, n = 100, scale_bits {cfg.scale_bits}: quantize "
        f"{plain * 1e3:.1f} ms, clip + conditional rounding + Skellam share "
        f"{noised * 1e3:.1f} ms ({noised / d * 1e9:.0f} ns per coordinate; mins of "
        f"{args.reps})"
    )


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--part", action="append", choices=["mnist", "cpu", "peer", "logreg", "client"]
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    parts = {
        "mnist": part_mnist,
        "cpu": part_cpu,
        "peer": part_peer,
        "logreg": part_logreg,
        "client": part_client,
    }
    for part in args.part or list(parts):
        parts[part](args)


if __name__ == "__main__":
    main()
