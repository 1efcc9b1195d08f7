"""Flower 1.42's differential-privacy wrappers on fedlearn's MNIST job (the Flower side of
``bench_dp.py``). Runs in the Flower peer venv, never in fedlearn's.

The workload is ``shared/peers/flower/mnist_bench.py`` unchanged (same data, Dirichlet 0.5
partition, CNN, initial weights, per-task seeds and SGD as ``fedlearn simulate``): this
script imports its ClientApp functions and its timed FedAvg and wraps them with Flower's
own DP mechanisms (Message API):

* ``none``: mnist_bench's FedAvg (example-weighted), plus the L2 norm of every client's
  update (``‖x_i - x‖``), the input for choosing the clip C;
* ``central-server``: ``DifferentialPrivacyServerSideFixedClipping`` (clip each update on
  the server, Gaussian noise ``σC/m`` on the mean of the m sampled clients);
* ``central-client``: ``DifferentialPrivacyClientSideFixedClipping`` with
  ``fixedclipping_mod`` on the ClientApp (the clients clip, the server adds the noise);
* ``local``: ``LocalDpMod`` (each client clips its update to C and adds Gaussian noise);
  its only knobs are ``(sensitivity, epsilon, delta)`` of the one-shot Gaussian mechanism,
  ``std = sensitivity·sqrt(2 ln(1.25/δ))/ε``, so they are set to give ``std = σC`` with
  sensitivity 2C (fedlearn's local mode: any two of a client's datasets move the clipped
  update by at most 2C). Flower does not compose local DP over rounds.

Under central DP every client reports weight 1 (``num-examples`` of its training reply):
DP-FedAvg's mean is unweighted (fedlearn's central mode sums clipped updates with equal
weights), and Flower's accountant refuses unequal weights. Evaluation stays
example-weighted. With ``--delta`` Flower's own RDP accountant (dp-accounting; no
amplification, add-or-remove-one, the only model its fixed-clipping wrappers accept) runs
beside the central wrappers and its ε is reported, to cross-check fedlearn's ledger.

Every client trains and evaluates every round (fraction 1.0), as in mnist_bench.py.
Prints ``BENCH_RESULT {json}`` (per-round accuracy and time, final accuracy, ε, norms).

Usage (``bench_dp.py`` runs it; by hand, from the repository root)::

    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\
    PYTHONPATH=benchmarks:../shared/peers/flower \\
    .peer-venv-flower/bin/python benchmarks/flower_dp.py --mode central-server \\
        --clients 100 --rounds 20 --noise-multiplier 2.85 --clip 0.4 --delta 1e-5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.simulation import run_simulation

HERE = Path(__file__).resolve().parent


def find_flower_dir() -> Path:
    """``$FLOWER_PEER_DIR``, else the nearest ``shared/peers/flower`` above this file."""
    if os.environ.get("FLOWER_PEER_DIR"):
        return Path(os.environ["FLOWER_PEER_DIR"])
    for parent in HERE.parents:
        if (parent / "shared" / "peers" / "flower" / "mnist_bench.py").exists():
            return parent / "shared" / "peers" / "flower"
    raise SystemExit("shared/peers/flower not found: set FLOWER_PEER_DIR")


FLOWER_DIR = find_flower_dir()
MODES = ("none", "central-server", "central-client", "local")

if str(FLOWER_DIR) not in sys.path:
    sys.path.insert(0, str(FLOWER_DIR))

import mnist_bench as bench  # noqa: E402  (the Ray actors import it too: see __main__)

ARGS: argparse.Namespace | None = None


def _args() -> argparse.Namespace:
    if ARGS is None:
        raise RuntimeError("flower_dp.ARGS is not set")
    return ARGS


# --------------------------------------------------------------------------- ClientApp
def unit_weight(reply: Message) -> Message:
    """``reply`` with ``num-examples`` = 1 in its metrics (DP-FedAvg's unweighted mean)."""
    if reply.has_error():
        return reply
    metrics = dict(reply.content["metrics"])
    metrics["num-examples"] = 1
    reply.content["metrics"] = MetricRecord(metrics)
    return reply


def train_unit_weight(msg: Message, context: Context) -> Message:
    """mnist_bench's training, reported with weight 1."""
    return unit_weight(bench.train(msg, context))


def local_dp_mod(clip: float, noise_multiplier: float, delta: float) -> LocalDpMod:
    """Flower's LocalDpMod set to add noise of std σC to an update clipped to C."""
    sensitivity = 2.0 * clip
    epsilon = sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / (noise_multiplier * clip)
    return LocalDpMod(clip, sensitivity, epsilon, delta)


def build_client_app(args: argparse.Namespace) -> ClientApp:
    """mnist_bench's train/evaluate under the client-side mods of ``args.mode``."""
    mods: list[Any] = []
    if args.mode == "central-client":
        mods = [fixedclipping_mod]
    elif args.mode == "local":
        mods = [local_dp_mod(args.clip, args.noise_multiplier, args.delta or 1e-5)]
    app = ClientApp()  # the mods wrap training only (LocalDpMod refuses evaluate replies)
    app.train(mods=mods)(train_unit_weight if args.mode.startswith("central") else bench.train)
    app.evaluate()(bench.evaluate)
    return app


# --------------------------------------------------------------------------- ServerApp
class NormFedAvg(bench.TimedFedAvg):  # type: ignore[misc]
    """mnist_bench's timed FedAvg that also records each client's update norm."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.norms: list[float] = []
        self._current: list[np.ndarray] = []

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self._current = arrays.to_numpy_ndarrays()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            new = reply.content["arrays"].to_numpy_ndarrays()
            sq = sum(
                float(np.sum((n.astype(np.float64) - c.astype(np.float64)) ** 2))
                for n, c in zip(new, self._current, strict=True)
            )
            self.norms.append(math.sqrt(sq))
        return super().aggregate_train(server_round, replies)


def make_strategy(mode: str, n: int) -> tuple[Strategy, Any, Any]:
    """The strategy to start, the inner timed FedAvg, and Flower's accountant (or None)."""
    a = _args()
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=n,
        min_evaluate_nodes=n,
        min_available_nodes=n,
    )
    if mode == "none":
        norm_avg = NormFedAvg(**common)
        return norm_avg, norm_avg, None
    # Flower's accountant accepts FedAvg's own aggregate_train only: no norm recording
    inner = bench.TimedFedAvg(**common)
    if mode == "local":
        return inner, inner, None
    accountant = None
    if a.delta > 0:
        try:
            from flwr.serverapp import (
                NeighboringRelation,
                PrivacyConfig,
                RdpAccountant,
                SamplingMethod,
            )

            accountant = RdpAccountant(
                PrivacyConfig(
                    target_delta=a.delta,
                    population_size=n,
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                )
            )
        except ImportError as exc:  # dp-accounting not installed in the Flower venv
            print(f"FLOWER_ACCOUNTANT_UNAVAILABLE {exc}", file=sys.stderr, flush=True)
    cls = (
        DifferentialPrivacyServerSideFixedClipping
        if mode == "central-server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    wrapped = cls(inner, a.noise_multiplier, a.clip, n, accountant=accountant)
    return wrapped, inner, accountant


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    a = _args()
    n = a.clients
    strategy, inner, accountant = make_strategy(a.mode, n)
    t0 = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(bench.initial_state_dict()),
        num_rounds=a.rounds,
        train_config=ConfigRecord(
            {
                "epochs": a.local_epochs,
                "batch-size": bench.BATCH_SIZE,
                "lr": bench.LR,
                "torch-optim": False,
            }
        ),
    )
    strategy_s = time.perf_counter() - t0
    acc = {int(r): float(m["eval_acc"]) for r, m in result.evaluate_metrics_clientapp.items()}
    norms = np.asarray(getattr(inner, "norms", []), np.float64)
    out: dict[str, Any] = {
        "mode": a.mode,
        "clients": n,
        "rounds": a.rounds,
        "local_epochs": a.local_epochs,
        "noise_multiplier": a.noise_multiplier,
        "clip": a.clip,
        "delta": a.delta,
        "strategy_start_seconds": strategy_s,
        "round_seconds": {int(k): v for k, v in inner.round_times.items()},
        "eval_acc_by_round": acc,
        "final_eval_acc": acc.get(a.rounds, float("nan")),
        "flower_epsilon": None if accountant is None else accountant.get_epsilon(a.delta),
    }
    if norms.size:
        out["update_norms"] = {
            "count": int(norms.size),
            "p10": float(np.percentile(norms, 10)),
            "p50": float(np.percentile(norms, 50)),
            "p90": float(np.percentile(norms, 90)),
            "max": float(norms.max()),
        }
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default="none")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5, help="0: no Flower accountant")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    args = parse()
    # Import this file as a module (as mnist_bench.py does), so the Ray actors unpickle
    # the apps by reference and keep mnist_bench's data cache between messages.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(FLOWER_DIR), os.environ.get("PYTHONPATH", "")]
    )
    sys.path[:0] = [str(HERE), str(FLOWER_DIR)]
    sys.dont_write_bytecode = True
    import flower_dp as driver

    driver.ARGS = args
    bench.ARGS = args
    ray_tmp = tempfile.mkdtemp(prefix="rayf-dp-", dir="/tmp")  # private Ray temp dir
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=driver.server_app,
            client_app=driver.build_client_app(args),
            num_supernodes=args.clients,
            backend_config={
                "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count(), "_temp_dir": ray_tmp},
            },
        )
    finally:
        total = time.perf_counter() - t0
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"BENCH_TOTAL_SECONDS {total:.3f}", file=sys.stderr)
