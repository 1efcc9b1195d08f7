"""RELIABILITY.md (d): the serving endpoint under load, hot swaps, oversized and slow bodies.

What runs (all on 127.0.0.1; every process started here is stopped by its pid):

* ``fedlearn serve`` in its own process with its default settings (64 MiB requests, 30 s
  body timeout, 8 gRPC workers, one torch thread) but ``--poll 0.05``, over a temp registry
  holding two seeded versions of the MNIST CNN (``clients.mnist``, v2 production).
* **Swaps**: ``--requests`` infer requests (default 2000) from ``--concurrency`` clients at
  once (default 200: half REST with binary tensors, each on its own keep-alive connection,
  half gRPC over 4 shared channels), each client sending its share back to back, while
  ``production`` flips between v1 and v2 ``--swaps`` times (default 10): flip k when
  3k/(4 swaps) of the requests are answered, then wait until a request that began after
  the flip is answered by the new version (the swap, made under load). Every answer must
  succeed and equal the in-process logits of the version it names. Reported: failed,
  mismatched, p50/p99 latency, swaps seen by clients, swaps in the endpoint's
  ``fedlearn_serving_swaps_total``.
* **Hostile bodies**: ``--others`` clients (default 16, half REST, half gRPC) in a closed
  loop for ``--duration`` s (default 40, longer than the 30 s body timeout), twice: alone,
  then with four hostile clients started as the window opens: a ``--big-mb`` (200) REST body
  with its Content-Length declared, the same body chunked (no length), a gRPC message of that
  size, and a slow-body client declaring 1000 bytes and sending one every 100 ms. Reported:
  the others' p50/p99 both times and failures, and each hostile client's answer (status,
  seconds until answered, bytes the server took before it stopped reading).

The exit status is 1 if any request of the swap run failed or mismatched, if any other
client's request failed, or if a hostile client was not refused.

Usage (from the repo root)::

    python benchmarks/reliability/serving.py --json /tmp/reliability-serving.json  # ~2 min

``tests/test_serving_reliability.py`` runs the same functions small, in-process (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# run as a script, this directory comes first on sys.path and its name (serving) would
# shadow tests/serving.py, the fixtures this script uses
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from benchmarks.bench_serving import (  # noqa: E402 - after the path set-up above
    HEADER_LENGTH,
    INFER_PATH,
    MODEL,
    decode_grpc,
    decode_rest,
    fixtures,
    free_port,
    grpc_request,
    rest_binary_body,
    start,
    stop,
    swaps_total,
    wait_until,
)

SLOW_BODY_BYTES = 1000
SLOW_BODY_PAUSE_S = 0.1


# -- clients ------------------------------------------------------------------------------


def rest_client(
    url: str, x: np.ndarray
) -> tuple[Callable[[], tuple[str, Any]], Callable[[], None]]:
    """A REST infer call with its own keep-alive connection; returns (call, close)."""
    import httpx

    http = httpx.Client(base_url=url, timeout=120.0)
    body, headers = rest_binary_body(x)

    def call() -> tuple[str, Any]:
        r = http.post(INFER_PATH, content=body, headers=headers)
        return decode_rest(r.status_code, r.content, r.headers.get(HEADER_LENGTH))

    return call, http.close


def grpc_channels(address: str, count: int) -> list[Any]:
    import grpc

    options = [("grpc.max_receive_message_length", 64 << 20)]
    return [grpc.insecure_channel(address, options=options) for _ in range(count)]


def grpc_client(channel: Any, x: np.ndarray) -> Callable[[], tuple[str, Any]]:
    from fedlearn.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    request = grpc_request(x)

    def call() -> tuple[str, Any]:
        return decode_grpc(stub.ModelInfer(request, timeout=120.0))

    return call


def percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    values = np.asarray(latencies) * 1e3
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


# -- part 1: many clients across hot swaps -------------------------------------------------


@dataclass
class SwapRun:
    requests: int
    concurrency: int
    answered: int = 0
    failed: int = 0
    mismatched: int = 0
    bit_exact: int = 0
    by_version: dict[str, int] = field(default_factory=dict)
    flips: int = 0
    swaps_seen_under_load: int = 0
    swaps_in_metrics: float = 0.0
    seconds: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.failed == 0 and self.mismatched == 0 and self.answered == self.requests


def swap_load(
    url: str,
    grpc_address: str,
    registry_root: Path,
    modules: list[Any],
    *,
    requests: int = 2000,
    concurrency: int = 200,
    swaps: int = 10,
    swap_wait_s: float = 10.0,
) -> SwapRun:
    """``requests`` infer requests from ``concurrency`` clients while production flips
    ``swaps`` times (module docstring); every answer checked against its version."""
    from fedlearn.registry.model_registry import ModelRegistry

    fx = fixtures()
    inputs = [fx.digits(1, seed=1000 + i) for i in range(16)]
    expected = [{str(v + 1): fx.predict(m, x) for v, m in enumerate(modules)} for x in inputs]
    run = SwapRun(requests, concurrency)
    per_client = [
        requests // concurrency + (i < requests % concurrency) for i in range(concurrency)
    ]
    lock = threading.Lock()
    progress = threading.Condition(lock)
    latencies: list[float] = []
    # version -> the latest start time of a request it answered: a request that began
    # after a flip and got the new version shows the endpoint swapped under load
    latest_start: dict[str, float] = {}
    channels = grpc_channels(grpc_address, 4)
    start_gate = threading.Barrier(concurrency + 1)

    def client(index: int) -> None:
        x, want = inputs[index % len(inputs)], expected[index % len(inputs)]
        if index % 2 == 0:
            call, close = rest_client(url, x)
        else:
            call, close = grpc_client(channels[index % len(channels)], x), (lambda: None)
        mine: list[float] = []
        try:
            start_gate.wait()
            for _ in range(per_client[index]):
                t0 = time.perf_counter()
                try:
                    version, logits = call()
                except Exception as exc:  # every failure counts; the first few are kept
                    with progress:
                        run.failed += 1
                        if len(run.failures) < 10:
                            run.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                        progress.notify_all()
                    continue
                mine.append(time.perf_counter() - t0)
                reference = want.get(version)
                ok = reference is not None and np.allclose(logits, reference, 1e-5, 1e-6)
                with progress:
                    run.answered += 1
                    if ok:
                        run.by_version[version] = run.by_version.get(version, 0) + 1
                        run.bit_exact += int(np.array_equal(logits, reference))
                        latest_start[version] = max(t0, latest_start.get(version, t0))
                    else:
                        run.mismatched += 1
                        if len(run.failures) < 10:
                            run.failures.append(f"v{version!r}: answer does not match")
                    progress.notify_all()
        finally:
            close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    registry = ModelRegistry(registry_root)
    try:
        current = registry.aliases(MODEL)["production"]
        before = swaps_total(url)
        start_gate.wait()
        t0 = time.perf_counter()
        for k in range(1, swaps + 1):
            threshold = requests * 3 * k // (4 * swaps)  # the last with a quarter to come
            with progress:
                progress.wait_for(lambda t=threshold: run.answered + run.failed >= t)
            if current == 2:
                current = registry.rollback(MODEL).version
            else:
                registry.promote(MODEL, 2, None)
                current = 2
            flipped = time.perf_counter()
            run.flips += 1
            wanted = str(current)

            def seen(v: str = wanted, t: float = flipped) -> bool:
                return latest_start.get(v, 0.0) > t or run.answered + run.failed >= requests

            with progress:  # versions alternate: the first such answer is the swap
                progress.wait_for(seen, swap_wait_s)
                run.swaps_seen_under_load += int(latest_start.get(wanted, 0.0) > flipped)
        for thread in threads:
            thread.join()
        run.seconds = round(time.perf_counter() - t0, 2)
        run.swaps_in_metrics = swaps_total(url) - before
    finally:
        registry.close()
        for channel in channels:
            channel.close()
    run.latency = percentiles(latencies)
    return run


# -- part 2: hostile bodies next to ordinary clients ----------------------------------------


@dataclass
class Hostile:
    """What one hostile client got: the status (HTTP code or gRPC code name) and when."""

    kind: str
    status: str = ""
    answered_s: float = float("nan")
    bytes_sent: int = 0
    """REST: what the client had sent when the answer came (it stops then)."""
    size: int = 0
    """REST: the whole body it meant to send."""
    error: str = ""


def raw_http(
    host: str, port: int, head: bytes, chunks: Iterator[bytes], pause_s: float = 0.0
) -> Hostile:
    """Send ``head`` then ``chunks`` on one socket while another thread reads the answer."""
    sock = socket.create_connection((host, port), timeout=120)
    result = Hostile("")
    t0 = time.monotonic()
    answer = bytearray()

    def read() -> None:
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not answer:
                result.answered_s = round(time.monotonic() - t0, 3)
            answer.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(head)
        for chunk in chunks:
            if answer:  # answered: a real client stops sending
                break
            sock.sendall(chunk)
            result.bytes_sent += len(chunk)
            if pause_s:
                time.sleep(pause_s)
    except OSError as exc:  # the server closed the connection on us
        result.error = type(exc).__name__
    reader.join(30)
    sock.close()
    first = bytes(answer).split(b"\r\n", 1)[0].split()
    result.status = first[1].decode() if len(first) > 1 else "no answer"
    return result


def big_declared(host: str, port: int, size: int) -> Hostile:
    head = (
        f"POST {INFER_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    block = bytes(1 << 16)
    result = raw_http(host, port, head, (block for _ in range(size >> 16)))
    result.kind = f"REST body of {size >> 20} MB, Content-Length declared"
    result.size = size >> 16 << 16
    return result


def big_chunked(host: str, port: int, size: int) -> Hostile:
    head = (
        f"POST {INFER_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    block = b"10000\r\n" + bytes(1 << 16) + b"\r\n"
    result = raw_http(host, port, head, (block for _ in range(size >> 16)))
    result.kind = f"REST body of {size >> 20} MB, chunked (no length)"
    result.size = (size >> 16) * len(block)
    return result


def slow_body(host: str, port: int) -> Hostile:
    head = (
        f"POST {INFER_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {SLOW_BODY_BYTES}\r\n\r\n"
    ).encode()
    result = raw_http(host, port, head, (b" " for _ in range(SLOW_BODY_BYTES)), SLOW_BODY_PAUSE_S)
    result.kind = f"slow body: 1 byte per {SLOW_BODY_PAUSE_S * 1e3:g} ms"
    result.size = SLOW_BODY_BYTES
    return result


def big_grpc(address: str, size: int) -> Hostile:
    import grpc

    from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
    from fedlearn.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    result = Hostile(f"gRPC message of {size >> 20} MB")
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=[size // (4 * 784), 1, 28, 28])
    request.raw_input_contents.append(bytes(size))
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        t0 = time.monotonic()
        try:
            stub.ModelInfer(request, timeout=120)
            result.status = "OK"
        except grpc.RpcError as exc:
            result.status = exc.code().name
            result.error = (exc.details() or "")[:120]
        result.answered_s = round(time.monotonic() - t0, 3)
    return result


@dataclass
class Window:
    clients: int
    seconds: float
    answered: int = 0
    failed: int = 0
    latency: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    hostile: list[Hostile] = field(default_factory=list)


def others_window(
    url: str,
    grpc_address: str,
    *,
    clients: int = 16,
    duration_s: float = 40.0,
    hostile: list[Callable[[], Hostile]] | None = None,
) -> Window:
    """``clients`` ordinary clients in a closed loop for ``duration_s``, with the
    ``hostile`` calls (each in its own thread) started as the window opens."""
    fx = fixtures()
    x = fx.digits(1, seed=7)
    window = Window(clients, duration_s)
    lock = threading.Lock()
    latencies: list[float] = []
    channels = grpc_channels(grpc_address, 2)
    gate = threading.Barrier(clients + 1)
    end = [0.0]

    def client(index: int) -> None:
        if index % 2 == 0:
            call, close = rest_client(url, x)
        else:
            call, close = grpc_client(channels[index % 2], x), (lambda: None)
        mine: list[float] = []
        try:
            gate.wait()
            while time.perf_counter() < end[0]:
                t0 = time.perf_counter()
                try:
                    call()
                except Exception as exc:
                    with lock:
                        window.failed += 1
                        if len(window.failures) < 10:
                            window.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                mine.append(time.perf_counter() - t0)
        finally:
            close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    outcomes: list[Hostile] = []
    hostile_threads = [
        threading.Thread(target=lambda h=h: outcomes.append(h()), daemon=True)
        for h in hostile or []
    ]
    end[0] = time.perf_counter() + duration_s
    gate.wait()
    for thread in hostile_threads:
        thread.start()
    for thread in threads:
        thread.join()
    for thread in hostile_threads:
        thread.join(120)
    for channel in channels:
        channel.close()
    window.answered = len(latencies)
    window.latency = percentiles(latencies)
    window.hostile = sorted(outcomes, key=lambda h: h.kind)
    return window


def refused(outcome: Hostile) -> bool:
    """Whether a hostile client was turned away as it should be: the gRPC message with
    RESOURCE_EXHAUSTED; a REST body with 413 (408 for the slow one) before the client had
    sent all of it, so the server did not wait for the rest."""
    if outcome.kind.startswith("gRPC"):
        return outcome.status == "RESOURCE_EXHAUSTED"
    status = "408" if outcome.kind.startswith("slow") else "413"
    return outcome.status == status and outcome.bytes_sent < outcome.size


def hostile_clients(host: str, http_port: int, grpc_address: str, size: int) -> list[Any]:
    return [
        lambda: big_declared(host, http_port, size),
        lambda: big_chunked(host, http_port, size),
        lambda: big_grpc(grpc_address, size),
        lambda: slow_body(host, http_port),
    ]


# -- the script ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "loadavg_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests across swaps")
    parser.add_argument("--concurrency", type=int, default=200, help="clients at once")
    parser.add_argument("--swaps", type=int, default=10, help="production flips")
    parser.add_argument("--others", type=int, default=16, help="ordinary clients, part 2")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per window")
    parser.add_argument("--big-mb", type=int, default=200, help="hostile body size (MB)")
    parser.add_argument("--poll", type=float, default=0.05, help="endpoint registry poll (s)")
    parser.add_argument(
        "--body-timeout", type=float, default=None, help="serve's --body-timeout (its default)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    args = parser.parse_args(argv)

    import httpx

    fx = fixtures()
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": str(args.json)}}
    print(json.dumps(results["machine"]))
    with tempfile.TemporaryDirectory(prefix="reliability-serving-") as tmp_name:
        tmp = Path(tmp_name)
        registry = tmp / "registry"
        modules = fx.publish_mnist(registry, seeds=(0, 1))
        http_port, grpc_port = free_port(), free_port()
        url, grpc_address = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        serve = [sys.executable, "-m", "fedlearn.cli.main", "serve", "--registry", str(registry)]
        serve += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
        serve += ["--poll", str(args.poll), "--path", str(ROOT)]
        if args.body_timeout is not None:
            serve += ["--body-timeout", str(args.body_timeout)]
        proc: subprocess.Popen[bytes] = start(serve, tmp / "serve.log")
        try:
            ready = lambda: httpx.get(url + "/v2/health/ready").status_code == 200  # noqa: E731
            wait_until(ready, proc, "fedlearn serve")
            print(
                f"swaps: {args.requests} requests, {args.concurrency} clients, {args.swaps} flips"
            )
            swap = swap_load(
                url,
                grpc_address,
                registry,
                modules,
                requests=args.requests,
                concurrency=args.concurrency,
                swaps=args.swaps,
            )
            results["swaps"] = asdict(swap) | {"passed": swap.passed}
            print(json.dumps(results["swaps"]))
            windows = {}
            for name, hostile in (
                ("alone", None),
                (
                    "with hostile",
                    hostile_clients("127.0.0.1", http_port, grpc_address, args.big_mb << 20),
                ),
            ):
                print(f"others {name}: {args.others} clients for {args.duration:g} s")
                window = others_window(
                    url,
                    grpc_address,
                    clients=args.others,
                    duration_s=args.duration,
                    hostile=hostile,
                )
                windows[name] = window
                print(json.dumps(asdict(window)))
            results["others"] = {name: asdict(w) for name, w in windows.items()}
            results["loadavg_end"] = os.getloadavg()
            alive = proc.poll() is None
        finally:
            stop(proc)
        print((tmp / "serve.log").read_text()[-2000:])
    hostile_ok = all(refused(h) for h in windows["with hostile"].hostile)
    others_ok = all(w.failed == 0 for w in windows.values())
    results["passed"] = swap.passed and hostile_ok and others_ok and alive
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    summary = {
        "swap run": f"{swap.answered}/{swap.requests} answered, {swap.failed} failed, "
        f"{swap.mismatched} mismatched, {swap.swaps_seen_under_load}/{swap.flips} flips seen "
        f"by clients under load, swaps in /metrics {swap.swaps_in_metrics:g}, p50 "
        f"{swap.latency['p50_ms']} ms, p99 {swap.latency['p99_ms']} ms, {swap.seconds} s",
        **{
            f"others {name}": f"{w.answered} answered, {w.failed} failed, p50 "
            f"{w.latency['p50_ms']} ms, p99 {w.latency['p99_ms']} ms"
            for name, w in windows.items()
        },
        **{
            h.kind: f"{h.status} after {h.answered_s} s"
            + (f" ({h.bytes_sent} bytes sent)" if h.kind.startswith("REST") else "")
            for h in windows["with hostile"].hostile
        },
        "passed": results["passed"],
    }
    print(json.dumps(summary, indent=2))
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
