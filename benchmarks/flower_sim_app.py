"""Flower's own run of the peer workload ``shared/peers/flower/sim_bench.py``, keeping its
final model (the Flower side of ``bench_flower_app.py``). Runs in the Flower peer venv,
never in fedlearn's.

sim_bench.py is imported, not copied, and run as its ``__main__`` runs it: its
``server_app`` (``main``: ``PerClientFedAvg``, fraction 1.0, ``min_*_nodes`` = N, initial
arrays zeros, ``train_config={"lr": LR}``) and its ``client_app`` under Flower's
``run_simulation`` (Ray backend, ``num_cpus`` per client as ``--cpus-per-client``), with
its global ``ARGS`` set as its ``__main__`` sets it. The one addition: ``main`` builds its
strategy by the module-global name ``PerClientFedAvg``, which is replaced here by a
subclass whose ``start`` keeps the returned ``Result`` so that the final arrays can be
saved. Nothing in the strategy's computation changes.

Writes ``--out`` (``.npz``: the final ArrayRecord's arrays under their Flower keys, float64
as sent) and prints sim_bench's own ``BENCH_RESULT {json}`` line on stdout and
``BENCH_TOTAL_SECONDS s`` (the ``run_simulation`` call) on stderr.

Usage (``bench_flower_app.py`` runs it with telemetry off and Ray in a private temp dir;
by hand, without ``RAY_TMPDIR``, it makes and removes its own)::

    FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \\
    .peer-venv-flower/bin/python benchmarks/flower_sim_app.py --clients 10 --rounds 5 \\
        --out /tmp/flower-final.npz
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def find_flower_dir() -> Path:
    """``$FLOWER_PEER_DIR``, else the nearest ``shared/peers/flower`` above this file."""
    if os.environ.get("FLOWER_PEER_DIR"):
        return Path(os.environ["FLOWER_PEER_DIR"])
    for parent in HERE.parents:
        if (parent / "shared" / "peers" / "flower" / "sim_bench.py").exists():
            return parent / "shared" / "peers" / "flower"
    raise SystemExit("shared/peers/flower not found: set FLOWER_PEER_DIR")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--out", type=Path, required=True, help="the final model (.npz)")
    return p.parse_args(argv)


def main() -> None:
    args = parse()
    flower_dir = find_flower_dir()
    # The Ray actors unpickle sim_bench's ClientApp by reference: they import sim_bench.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(flower_dir), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(flower_dir))
    sys.dont_write_bytecode = True
    import sim_bench
    from flwr.simulation import run_simulation

    final: dict[str, Any] = {}

    class KeepResult(sim_bench.PerClientFedAvg):  # type: ignore[misc, name-defined]
        """sim_bench's strategy; ``start`` also keeps its Result (the final arrays)."""

        def start(self, *a: Any, **kw: Any) -> Any:
            result = super().start(*a, **kw)
            final["arrays"] = result.arrays
            return result

    sim_bench.PerClientFedAvg = KeepResult
    # as sim_bench's __main__ does: main() reads ARGS.clients / rounds / cpus_per_client / out
    sim_bench.ARGS = argparse.Namespace(
        clients=args.clients, rounds=args.rounds, cpus_per_client=args.cpus_per_client, out=""
    )
    # Ray's temp dir: $RAY_TMPDIR when the caller made a private one (it removes it), else
    # a private one made and removed here. Never the machine's shared /tmp/ray.
    own_tmp = not os.environ.get("RAY_TMPDIR")
    ray_tmp = tempfile.mkdtemp(prefix="rayf-app-") if own_tmp else os.environ["RAY_TMPDIR"]
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=sim_bench.server_app,
            client_app=sim_bench.client_app,
            num_supernodes=args.clients,
            backend_config={
                "client_resources": {"num_cpus": args.cpus_per_client, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count(), "_temp_dir": ray_tmp},
            },
        )
    finally:
        total = time.perf_counter() - t0
        if own_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if "arrays" not in final:
        raise SystemExit("sim_bench's strategy never returned: no final model")
    record = final["arrays"]
    np.savez(args.out, **{key: record[key].numpy() for key in record})
    print(f"BENCH_TOTAL_SECONDS {total:.3f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
