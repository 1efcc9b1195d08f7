"""Serving throughput with a shadow policy on, against plain serving in the same run.

What runs (all on 127.0.0.1; the endpoint process is stopped by its pid):

* ``fedlearn serve`` in its own process (``python -m fedlearn.cli.main serve --poll 0.05
  --path .``) over a temp registry holding three seeded versions of the MNIST CNN
  (``clients.mnist``): v2 is production, v1 the shadow candidate.
* The closed-loop load generator of ``bench_serving.py`` (C client threads, each sending
  its next request when the previous one is answered; REST binary tensors both ways, or
  gRPC ``raw_input_contents``; every answer decoded), per cell and repetition twice:
  **plain** (no traffic policy) and **shadow** (``Shadow(candidate=1)``: every request
  mirrored to v1 off the request path, compared, never answered). The policy is set and
  cleared through the registry while the endpoint runs, as an operator would (``fedlearn
  models route``); each measurement starts once ``/v2/models/mnist`` shows the policy (or
  its absence). The order of the two alternates between repetitions, and the windows are
  short (0.75 s) and many (15 pairs), so that each ratio compares two neighbouring
  windows: the machine is shared, and its load moves on a scale of seconds.
* Per repetition: ``shadow req/s / plain req/s`` (goal >= 0.9) and the p50 ratio; the
  medians over ``--reps`` are printed. Also the shadow's coverage in the measured window:
  mirrors compared / requests answered, and mirrors dropped because the shadow queue was
  full (``fedlearn_serving_shadow_*`` in ``/metrics``). Every shadowed answer must carry
  ``model_version`` 2 and equal v2's in-process logits; the exit status is 1 otherwise.

Usage (from the repo root)::

    python benchmarks/bench_serving_traffic.py --torch-threads 1          # ~2.5 min
    python benchmarks/bench_serving_traffic.py --reps 3 --cells rest:1:1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks import bench_serving as bs  # noqa: E402  (after the path setup)

MODEL = "mnist"


def parse_cells(text: str) -> list[tuple[str, int, int]]:
    """``rest:1:1,grpc:32:8`` -> ``[(mode, batch, clients), ...]``."""
    cells = []
    for part in text.split(","):
        mode, batch, clients = part.strip().split(":")
        if mode not in ("rest", "grpc"):
            raise SystemExit(f"--cells: mode must be rest or grpc, got {mode!r}")
        cells.append((mode, int(batch), int(clients)))
    return cells


def metric(text: str, name: str, labels: str = "") -> float:
    """The sum of ``name``'s samples whose label text contains ``labels``."""
    total = 0.0
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if labels in match.group(1):
            total += float(match.group(2))
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def shadow_counts(url: str, pid: int) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        "cpu_s": cpu_seconds(pid),
        "compared": metric(text, "fedlearn_serving_shadow_requests_total"),
        "dropped": metric(text, "fedlearn_serving_shadow_dropped_total"),
        "answered": metric(text, "fedlearn_serving_requests_total", 'outcome="ok"'),
    }


def wait_for_policy(url: str, kind: str | None) -> None:
    """Until ``/v2/models/mnist`` shows a policy of ``kind`` (None: no policy)."""
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        meta = httpx.get(f"{url}/v2/models/{MODEL}", timeout=10).json()
        policy = (meta.get("traffic") or {}).get("policy")
        if (policy is None and kind is None) or (policy and policy["kind"] == kind):
            return
        time.sleep(0.02)
    raise SystemExit(f"the endpoint did not pick up policy {kind!r} within 30 s")


def measure(
    mode: str, batch: int, clients: int, x: np.ndarray, urls: dict[str, str], args: Any
) -> bs.Stats:
    if mode == "rest":
        body, headers = bs.rest_binary_body(x)
        factory = bs.rest_factory(urls["rest"], bs.INFER_PATH, body, headers)
        return bs.closed_loop(factory, clients, args.warmup, args.duration)
    with bs.grpc_channel(urls["grpc"]) as channel:
        factory = bs.grpc_factory(bs.grpc_methods(channel, None), bs.grpc_request(x))
        return bs.closed_loop(factory, clients, args.warmup, args.duration)


def check_answers(urls: dict[str, str], x: np.ndarray, expected: np.ndarray) -> int:
    """Send 20 requests under the shadow policy; count answers not v2's bit for bit."""
    import httpx

    body, headers = bs.rest_binary_body(x)
    wrong = 0
    with httpx.Client(base_url=urls["rest"], timeout=30) as client:
        for _ in range(20):
            r = client.post(bs.INFER_PATH, content=body, headers=headers)
            version, logits = bs.decode_rest(
                r.status_code, r.content, r.headers.get(bs.HEADER_LENGTH)
            )
            wrong += int(version != "2" or not np.array_equal(logits, expected))
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--cells", default="rest:1:1,rest:1:8,rest:32:1,grpc:1:8", help="mode:batch:clients,..."
    )
    parser.add_argument("--duration", type=float, default=0.75, help="seconds measured per run")
    parser.add_argument("--warmup", type=float, default=0.25, help="seconds before measuring")
    parser.add_argument("--reps", type=int, default=15, help="repetitions (medians reported)")
    parser.add_argument("--poll", type=float, default=0.05, help="endpoint registry poll (s)")
    parser.add_argument(
        "--torch-threads", type=int, default=0, help="OMP_NUM_THREADS (0: torch's default)"
    )
    parser.add_argument(
        "--shadow-nice", type=int, default=0, help="fedlearn serve --shadow-nice (Linux)"
    )
    parser.add_argument(
        "--shadow-budget", type=float, default=0.05, help="fedlearn serve --shadow-budget"
    )
    parser.add_argument(
        "--shadow-queue", type=int, default=64, help="fedlearn serve --shadow-queue"
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)

    import httpx

    from fedlearn.registry.model_registry import ModelRegistry
    from fedlearn.registry.traffic import Shadow

    fx = bs.fixtures()
    cells = parse_cells(args.cells)
    info = bs.machine()
    print(json.dumps(info))
    rows: list[dict[str, Any]] = []
    wrong = 0
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as tmp_name:
        tmp = Path(tmp_name)
        registry = tmp / "registry"
        # v3's accuracy fails the gate: v2 stays production, v1 and v3 are candidates
        modules = fx.publish_mnist(registry, seeds=(0, 1, 2), accuracy=(0.5, 0.6, 0.55))
        ports = {"rest": bs.free_port(), "grpc": bs.free_port()}
        urls = {"rest": f"http://127.0.0.1:{ports['rest']}", "grpc": f"127.0.0.1:{ports['grpc']}"}
        serve = [sys.executable, "-m", "fedlearn.cli.main", "serve", "--registry", str(registry)]
        serve += ["--path", str(ROOT), "--poll", str(args.poll)]
        serve += ["--shadow-budget", str(args.shadow_budget)]
        serve += ["--shadow-nice", str(args.shadow_nice), "--shadow-queue", str(args.shadow_queue)]
        serve += ["--http-port", str(ports["rest"]), "--grpc-port", str(ports["grpc"])]
        proc = bs.start(serve, tmp / "serve.log")
        reg = ModelRegistry(registry)
        try:
            ready = lambda: httpx.get(urls["rest"] + "/v2/health/ready").status_code == 200  # noqa: E731
            bs.wait_until(ready, proc, "fedlearn serve")
            for mode, batch, clients in cells:
                x = fx.digits(batch, seed=batch)
                expected = fx.predict(modules[1], x)
                runs: dict[str, list[dict[str, Any]]] = {"plain": [], "shadow": []}
                for rep in range(args.reps):
                    order = ("plain", "shadow") if rep % 2 == 0 else ("shadow", "plain")
                    for target in order:
                        if target == "shadow":
                            reg.set_traffic(MODEL, Shadow(1), "bench_serving_traffic")
                            wait_for_policy(urls["rest"], "shadow")
                            wrong += check_answers(urls, x, expected)
                        else:
                            reg.clear_traffic(MODEL, "bench_serving_traffic")
                            wait_for_policy(urls["rest"], None)
                        before = shadow_counts(urls["rest"], proc.pid)
                        stats = measure(mode, batch, clients, x, urls, args)
                        after = shadow_counts(urls["rest"], proc.pid)
                        delta = {k: after[k] - before[k] for k in after}
                        delta["cpu_ms"] = 1e3 * delta["cpu_s"] / max(delta["answered"], 1.0)
                        run = {**stats.__dict__, **delta}
                        runs[target].append(run)
                        print(
                            f"{mode} b={batch} C={clients} rep {rep + 1} {target}: "
                            f"{stats.rps:.0f} req/s p50 {stats.p50_ms:.2f} ms errors "
                            f"{stats.errors} mirrors {delta['compared']:.0f} compared "
                            f"{delta['dropped']:.0f} dropped of {delta['answered']:.0f}; "
                            f"endpoint CPU {delta['cpu_ms']:.2f} ms/request"
                        )
                plain, shadow = runs["plain"], runs["shadow"]
                # a window with no answer at all (the machine stalled) has no ratio
                reps = [i for i in range(args.reps) if plain[i]["rps"] and shadow[i]["rps"]]
                rows.append(
                    {
                        "cell": f"{mode} b={batch} C={clients}",
                        "plain_rps": statistics.median(r["rps"] for r in plain),
                        "shadow_rps": statistics.median(r["rps"] for r in shadow),
                        "plain_p50": statistics.median(r["p50_ms"] for r in plain),
                        "shadow_p50": statistics.median(r["p50_ms"] for r in shadow),
                        "rps_ratio": statistics.median(
                            shadow[i]["rps"] / plain[i]["rps"] for i in reps
                        ),
                        "p50_ratio": statistics.median(
                            shadow[i]["p50_ms"] / plain[i]["p50_ms"] for i in reps
                        ),
                        "plain_cpu_ms": statistics.median(r["cpu_ms"] for r in plain),
                        "shadow_cpu_ms": statistics.median(r["cpu_ms"] for r in shadow),
                        "cpu_ratio": statistics.median(
                            plain[i]["cpu_ms"] / shadow[i]["cpu_ms"]
                            for i in range(args.reps)
                            if shadow[i]["cpu_ms"] > 0
                        ),
                        "coverage": statistics.median(
                            r["compared"] / max(r["answered"], 1.0) for r in shadow
                        ),
                        "dropped": statistics.median(
                            r["dropped"] / max(r["answered"], 1.0) for r in shadow
                        ),
                        "errors": sum(r["errors"] for r in plain + shadow),
                        "runs": runs,
                    }
                )
            reg.clear_traffic(MODEL, "bench_serving_traffic")
        finally:
            reg.close()
            bs.stop(proc)
    load = os.getloadavg()
    head = (
        f"{'cell':<18}{'plain req/s':>12}{'p50':>7}{'shadow req/s':>13}{'p50':>7}"
        f"{'req/s ratio':>12}{'p50 ratio':>10}{'CPU ms/req':>11}{'shadow':>7}{'ratio':>6}"
        f"{'mirrored':>9}{'dropped':>8}{'err':>5}"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(
            f"{r['cell']:<18}{r['plain_rps']:>12.0f}{r['plain_p50']:>7.2f}{r['shadow_rps']:>13.0f}"
            f"{r['shadow_p50']:>7.2f}{r['rps_ratio']:>12.2f}{r['p50_ratio']:>10.2f}"
            f"{r['plain_cpu_ms']:>11.2f}{r['shadow_cpu_ms']:>7.2f}{r['cpu_ratio']:>6.2f}"
            f"{r['coverage']:>9.0%}{r['dropped']:>8.0%}{r['errors']:>5d}"
        )
    print(
        f"\nmedians over {args.reps} repetitions (ratios per repetition: shadow / plain, "
        f"same endpoint, same run); mirrored / dropped: share of the answered requests.\n"
        f"CPU ms/req: the endpoint process's CPU time (all threads) per answered request; "
        f"its ratio is plain / shadow, the throughput ratio of a CPU-bound endpoint.\n"
        f"load average at the start {info['loadavg_start']}, at the end {load}; "
        f"shadowed answers not v2's: {wrong}"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "loadavg_end": load}))
    errors = sum(r["errors"] for r in rows)
    if errors or wrong:
        print(f"FAILED: {errors} request errors, {wrong} shadowed answers not v2's")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
