"""Serving throughput with drift statistics on vs off, in the same run.

Two ``fedlearn serve`` processes over one temp registry of the MNIST CNN (the versions of
``benchmarks/bench_serving.py``), each version with a training reference distribution
(MNIST-5k's training rows over 10 bins in [0, 1]: 784 features): one with drift
statistics on (the default), one with ``--no-drift``. The closed-loop load generator of
``bench_serving.py`` drives each in turn, REST binary and gRPC ``raw_input_contents``, per
batch size and client count; the order of the two endpoints alternates between
repetitions, so load on the machine hits both alike. Reported per cell: the median req/s
of each and the median of the per-repetition ratios ``on / off`` (goal: >= 0.9), and each
endpoint's own CPU time per request (from ``/proc/<pid>/stat``; its ratio ``off / on`` is
the throughput ratio a CPU-bound endpoint would see, and is far less disturbed than req/s
when other work shares the machine). At the end the drift endpoint's ``/metrics`` must
show the rows it counted (so "on" did count) and the other none. Last, in this process,
the CPU time per request of ``ServedModel.infer`` alone and followed by the monitor's
``observe`` (its binning included): the statistics' own cost, in CPU seconds.

Usage (from the repo root)::

    python benchmarks/bench_serving_drift.py                    # ~2 min on 2 cores
    python benchmarks/bench_serving_drift.py --reps 7 --duration 3 --json /tmp/drift.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_spec = importlib.util.spec_from_file_location("bench_serving", HERE / "bench_serving.py")
assert _spec is not None and _spec.loader is not None
bs = importlib.util.module_from_spec(_spec)
sys.modules["bench_serving"] = bs
_spec.loader.exec_module(bs)  # also puts the repo root and tests/ on sys.path


def add_references(registry: Path) -> int:
    """Give every version a reference sidecar from MNIST-5k's training rows; returns F."""
    from fedlearn.data import load_dataset, partition_dataset
    from fedlearn.drift.reference import Reference, save_reference
    from fedlearn.drift.stats import SummarySpec, summarize
    from fedlearn.registry.model_registry import ModelRegistry

    data = partition_dataset(load_dataset("mnist5k"), "iid", 1, seed=0).centralized()
    spec = SummarySpec(bins=10, low=0.0, high=1.0, features=784, classes=10)
    reference = Reference(spec, summarize(data.x_train, data.y_train, spec))
    with ModelRegistry(registry) as reg:
        for version in reg.versions(bs.MODEL):
            save_reference(version.path, reference)
    return spec.features


def counted_rows(url: str) -> float:
    """``fedlearn_serving_drift_window_rows`` summed over versions (0 if absent)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(r"^fedlearn_serving_drift_window_rows\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(v) for v in found)


def in_process(
    registry: Path, inputs: dict[int, np.ndarray], seconds: float, pairs: int
) -> list[dict[str, Any]]:
    """CPU time per request of ``ServedModel.infer`` alone and followed by the drift
    monitor's ``observe`` (its binning included), in this process, in ``pairs``
    alternating off/on measurements of ``seconds`` each: what the statistics cost a
    request. Medians of the per-pair ratios."""
    import time

    from fedlearn.registry.model_registry import ModelRegistry
    from fedlearn.serving.drift import DriftMonitor
    from fedlearn.serving.models import ServedModel

    with ModelRegistry(registry) as reg:
        model = ServedModel.from_registry(reg, bs.MODEL, 2)
    monitor = DriftMonitor()
    out = []
    for batch, x in inputs.items():
        feeds = {"input": x}
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(pairs + 1):  # the first pair warms up and is dropped
            for mode in ("off", "on"):
                count = 0
                start = time.process_time()
                while time.process_time() - start < seconds:
                    result = model.infer(feeds)
                    if mode == "on":
                        monitor.observe(model, feeds, result)
                    count += 1
                if mode == "on":
                    monitor.flush()  # bins what is still pending (no scoring)
                cpu[mode].append((time.process_time() - start) / count)
        ratios = [a / b for a, b in zip(cpu["off"][1:], cpu["on"][1:], strict=True)]
        row = {
            "batch": batch,
            "infer_ms": 1e3 * statistics.median(cpu["off"][1:]),
            "infer_and_drift_ms": 1e3 * statistics.median(cpu["on"][1:]),
            "ratio": statistics.median(ratios),
        }
        out.append(row)
        print(
            f"in process, batch {batch:>3}: infer {row['infer_ms']:.3f} ms CPU, with drift "
            f"{row['infer_and_drift_ms']:.3f} ms; off/on {row['ratio']:.3f}",
            flush=True,
        )
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    parser.add_argument("--clients", default="1,8", help="concurrent clients (comma-separated)")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=0.4, help="seconds before measuring")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (medians reported)")
    parser.add_argument("--torch-threads", type=int, default=1, help="OMP_NUM_THREADS everywhere")
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument(
        "--in-process-only", action="store_true", help="only the in-process CPU cost"
    )
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)

    fx = bs.fixtures()
    machine = bs.machine()
    print(json.dumps(machine))
    batches = bs.parse_ints(args.batches)
    clients = bs.parse_ints(args.clients)
    inputs = {b: fx.digits(b, seed=b) for b in batches}
    rows: list[dict[str, Any]] = []
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-drift-") as tmp_name:
        tmp = Path(tmp_name)
        registry = tmp / "registry"
        fx.publish_mnist(registry, seeds=(0, 1))
        add_references(registry)
        if args.in_process_only:
            for row in in_process(registry, inputs, 0.25, pairs=4 * args.reps):
                print(json.dumps(row))
            return 0
        ports = {name: (bs.free_port(), bs.free_port()) for name in ("on", "off")}
        try:
            for name, (http, grpc_port) in ports.items():
                command = [
                    sys.executable,
                    "-m",
                    "fedlearn.cli.main",
                    "serve",
                    "--registry",
                    str(registry),
                    "--path",
                    ".",
                    "--http-port",
                    str(http),
                    "--grpc-port",
                    str(grpc_port),
                    "--poll",
                    "60",
                    "--torch-threads",
                    str(args.torch_threads),
                    "--no-verbose",
                ]
                if name == "off":
                    command.append("--no-drift")
                proc = bs.start(command, tmp / f"serve-{name}.log")
                procs.append(proc)
                bs.wait_until(lambda port=http: bs.listening(port), proc, f"serve ({name})")
                bs.wait_until(lambda port=grpc_port: bs.listening(port), proc, f"serve ({name})")
            pids = {name: proc.pid for name, proc in zip(ports, procs, strict=True)}
            urls = {n: f"http://127.0.0.1:{p[0]}" for n, p in ports.items()}
            addresses = {n: f"127.0.0.1:{p[1]}" for n, p in ports.items()}
            channels = {n: bs.grpc_channel(a) for n, a in addresses.items()}
            opened = {n: c.__enter__() for n, c in channels.items()}
            try:
                for protocol in ("rest", "grpc"):
                    for batch in batches:
                        for c in clients:
                            rows.append(
                                measure(args, protocol, batch, c, inputs[batch], urls, opened, pids)
                            )
                            print_row(rows[-1])
            finally:
                for channel in channels.values():
                    channel.__exit__(None, None, None)
            counted = counted_rows(urls["on"])
            uncounted = counted_rows(urls["off"])
        finally:
            for proc in procs:
                bs.stop(proc)
        local = in_process(registry, inputs, 0.25, pairs=4 * args.reps)
    machine["loadavg_end"] = os.getloadavg()
    ratios = [r["ratio_median"] for r in rows]
    cpu_ratios = [r["cpu_ratio"] for r in rows]
    print(
        f"drift on/off req/s, median over cells: {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}); server CPU per request off/on: "
        f"{statistics.median(cpu_ratios):.3f} (min {min(cpu_ratios):.3f}); "
        f"rows in the drift window at the end: {counted:.0f} "
        f"(endpoint without drift: {uncounted:.0f}); in process, infer CPU off/on: "
        + ", ".join(f"batch {r['batch']} {r['ratio']:.3f}" for r in local)
        + f"; load average {machine['loadavg_end']}"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"machine": machine, "rows": rows, "in_process": local}, indent=2)
        )
    return 0 if counted > 0 and uncounted == 0 else 1


def measure(
    args: argparse.Namespace,
    protocol: str,
    batch: int,
    clients: int,
    x: np.ndarray,
    urls: dict[str, str],
    channels: dict[str, Any],
    pids: dict[str, int],
) -> dict[str, Any]:
    """Interleaved repetitions of one cell on both endpoints: req/s, and the endpoint's
    own CPU time per request (far less disturbed by other load on the machine)."""
    rps: dict[str, list[float]] = {"on": [], "off": []}
    cpu_ms: dict[str, list[float]] = {"on": [], "off": []}
    errors = 0
    for rep in range(args.reps):
        order = ("on", "off") if rep % 2 == 0 else ("off", "on")
        for name in order:
            if protocol == "rest":
                body, headers = bs.rest_binary_body(x)
                factory = bs.rest_factory(urls[name], bs.INFER_PATH, body, headers)
            else:
                method = bs.grpc_methods(channels[name], None)
                factory = bs.grpc_factory(method, bs.grpc_request(x))
            cpu0 = cpu_seconds(pids[name])
            stats = bs.closed_loop(factory, clients, args.warmup, args.duration)
            cpu = cpu_seconds(pids[name]) - cpu0  # warmup requests included in both
            errors += stats.errors
            rps[name].append(stats.rps)
            total = stats.rps * (args.warmup + args.duration)  # about: warmup at the same rate
            cpu_ms[name].append(1e3 * cpu / max(total, 1.0))
    per_rep = [on / off for on, off in zip(rps["on"], rps["off"], strict=True) if off > 0]
    return {
        "protocol": protocol,
        "batch": batch,
        "clients": clients,
        "rps_on": statistics.median(rps["on"]),
        "rps_off": statistics.median(rps["off"]),
        "ratio_median": statistics.median(per_rep),
        "ratios": per_rep,
        "cpu_ms_on": statistics.median(cpu_ms["on"]),
        "cpu_ms_off": statistics.median(cpu_ms["off"]),
        "cpu_ratio": statistics.median(cpu_ms["off"]) / statistics.median(cpu_ms["on"]),
        "errors": errors,
    }


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['protocol']:>4} batch {row['batch']:>3} C={row['clients']:<2} "
        f"on {row['rps_on']:8.1f} req/s  off {row['rps_off']:8.1f} req/s  "
        f"on/off {row['ratio_median']:.3f}  server CPU/request on {row['cpu_ms_on']:.3f} ms "
        f"off {row['cpu_ms_off']:.3f} ms (off/on {row['cpu_ratio']:.3f})  errors {row['errors']}",
        flush=True,
    )


if __name__ == "__main__":
    raise SystemExit(main())
