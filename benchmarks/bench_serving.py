"""Serving benchmark: the MNIST CNN over OIP v2 REST and gRPC on loopback, with floors.

What runs (all on 127.0.0.1, every process started here is stopped by its pid):

* ``fedlearn serve`` in its own process (``python -m fedlearn.cli.main serve --poll 0.05
  --path .``) over a temp registry holding two seeded versions of the MNIST CNN
  (``clients.mnist``, whose builder ``--path`` makes importable).
* A closed-loop load generator in this process: C client threads, each sending its next
  request when the previous one is answered, for ``--duration`` seconds after
  ``--warmup``. REST: one ``httpx.Client`` (keep-alive connection) per thread, binary
  tensors both ways (``Inference-Header-Content-Length``), plus JSON-mode rows. gRPC: one
  channel shared by the threads, the generated ``GRPCInferenceServiceStub`` with
  ``raw_input_contents``. Every answer is decoded (JSON head, logits array).
* Floors, measured in the same run by the same load generator:
  - ``model``: ``ServedModel.infer`` in this process (no server), per batch size and C;
  - ``floor``: a bare Starlette app under uvicorn (same uvicorn settings as fedlearn) in
    its own process whose POST route reads the body and answers the exact bytes and
    headers fedlearn answered for that request (captured first), no model; and a bare
    grpcio server (same options, 8 worker threads) whose generic unary handler answers
    fedlearn's captured response bytes, request not parsed, no model;
  - ``floor+model``: the same bare servers also running ``ServedModel.infer`` on the
    request's (pre-decoded) input before answering (REST: one thread-pool hop): the
    least a Python server of this model can do, with no protocol handling.

Ratios (per repetition, then the median over ``--reps``):

* ``fedlearn / floor+model`` (req/s and p50): what fedlearn's protocol handling, model
  lookup and metrics cost over a server that only moves bytes and runs the model.
* ``fedlearn req/s / (1 / (1/floor req/s + 1/model req/s))``: the floor and the
  in-process compute each cost their time per request (1.0 = as fast as both added);
  at C=1 also ``fedlearn p50 / (floor p50 + model p50)``.

Then a hot swap under load: ``--swap-clients`` REST and as many gRPC threads send
unversioned requests while ``production`` flips between v1 and v2 ``--swaps`` times
(``ModelRegistry.rollback`` / ``promote(name, 2, None)``, every ``--swap-every`` s). Every
answer must succeed and its logits must equal the in-process logits of the version it
names (``model_version``); the swaps the endpoint made are read from ``/metrics``. The exit
status is 1 if any request failed or any answer did not match.

Usage (from the repo root)::

    python benchmarks/bench_serving.py --torch-threads 1 --json /tmp/serving.json  # ~3.5 min
    python benchmarks/bench_serving.py            # torch's default threads, as `fedlearn serve`
    python benchmarks/bench_serving.py --reps 5 --duration 3 --skip-swap

``--torch-threads N`` sets ``OMP_NUM_THREADS`` for this process, the endpoint and the floor
servers alike. With torch's default (one thread per CPU, 2 here) on a busy 2-vCPU machine,
torch's OpenMP threads can spin against each other and a request then takes ~50-80 ms of
CPU instead of ~0.3 ms, in fedlearn and in the floor+model server alike, for seconds at a
time; 1 thread avoids that (see BENCHMARKS.md section 5).
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL = "mnist"
INFER_PATH = f"/v2/models/{MODEL}/infer"
FLOOR_SERVICE = "floor"
#: What each cell is measured against, in this order every repetition.
TARGETS = ("fedlearn", "floor", "floor+model")

Call = Callable[[], tuple[str, np.ndarray]]
#: Builds one client's request function (and its cleanup) inside that client's thread.
Factory = Callable[[], tuple[Call, Callable[[], None]]]


def fixtures() -> Any:
    """``tests/serving.py``: publish_mnist, predict, digits (imported when needed)."""
    return importlib.import_module("serving")


# -- load generator --------------------------------------------------------------------


@dataclass
class Stats:
    """One closed-loop measurement."""

    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    first_error: str = ""


def closed_loop(factory: Factory, clients: int, warmup_s: float, duration_s: float) -> Stats:
    """``clients`` threads, each calling its request function back to back; counts the
    requests that finish within ``duration_s`` after ``warmup_s``."""
    barrier = threading.Barrier(clients + 1)
    spans: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    errors: list[str] = []
    clock: dict[str, float] = {}

    def client(index: int) -> None:
        call, close = factory()
        try:
            barrier.wait()
            end = clock["end"]
            out = spans[index]
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    break
                try:
                    call()
                except Exception as exc:  # any failure counts; the first is reported
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                out.append((t0, time.perf_counter()))
        finally:
            close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    clock["begin"] = start + warmup_s
    clock["end"] = start + warmup_s + duration_s
    barrier.wait()
    for thread in threads:
        thread.join()
    begin, end = clock["begin"], clock["end"]
    latencies = np.array([t1 - t0 for s in spans for t0, t1 in s if begin <= t1 <= end])
    if latencies.size == 0:
        latencies = np.array([np.nan])
    count = int(np.isfinite(latencies).sum())
    return Stats(
        requests=count,
        errors=len(errors),
        seconds=duration_s,
        rps=count / duration_s,
        p50_ms=float(np.percentile(latencies, 50) * 1e3),
        p99_ms=float(np.percentile(latencies, 99) * 1e3),
        first_error=errors[0] if errors else "",
    )


# -- requests and answers --------------------------------------------------------------


def rest_binary_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An infer body with the input as binary data and binary output asked for."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        },
        separators=(",", ":"),
    ).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + np.ascontiguousarray(x, "<f4").tobytes(), headers


def rest_json_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """An infer body with the input as a flat JSON list (JSON output)."""
    body = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(x.shape),
                "data": x.ravel().tolist(),
            }
        ]
    }
    return json.dumps(body, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def decode_rest(status: int, data: bytes, header_length: str | None) -> tuple[str, np.ndarray]:
    """``(model_version, logits)`` of a REST answer; RuntimeError unless 200."""
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
    if header_length is None:
        answer = json.loads(data)
        out = answer["outputs"][0]
        logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    else:
        split = int(header_length)
        answer = json.loads(data[:split])
        out = answer["outputs"][0]
        logits = np.frombuffer(data, dtype="<f4", offset=split).reshape(out["shape"])
    return str(answer.get("model_version", "")), logits


def rest_factory(url: str, path: str, body: bytes, headers: dict[str, str]) -> Factory:
    """Per thread: a keep-alive httpx client POSTing ``body`` to ``path``."""
    import httpx

    def make() -> tuple[Call, Callable[[], None]]:
        client = httpx.Client(base_url=url, timeout=30.0)

        def call() -> tuple[str, np.ndarray]:
            r = client.post(path, content=body, headers=headers)
            return decode_rest(r.status_code, r.content, r.headers.get(HEADER_LENGTH))

        return call, client.close

    return make


def grpc_request(x: np.ndarray) -> Any:
    """A ModelInfer request with the input in ``raw_input_contents``."""
    from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    return request


def decode_grpc(response: Any) -> tuple[str, np.ndarray]:
    """``(model_version, logits)`` of a ModelInfer response."""
    shape = list(response.outputs[0].shape)
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)
    return str(response.model_version), logits


@contextmanager
def grpc_channel(address: str) -> Iterator[Any]:
    """An insecure channel with fedlearn's message limits, closed on exit."""
    import grpc

    options = [("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(address, options=options)
    try:
        yield channel
    finally:
        channel.close()


def grpc_factory(method: Callable[..., Any], request: Any) -> Factory:
    """Per thread: ``method(request)`` over the (shared) channel ``method`` belongs to."""

    def make() -> tuple[Call, Callable[[], None]]:
        def call() -> tuple[str, np.ndarray]:
            return decode_grpc(method(request, timeout=30.0))

        return call, lambda: None

    return make


def grpc_methods(channel: Any, key: str | None) -> Callable[..., Any]:
    """fedlearn's ``ModelInfer`` (the generated stub) or the floor's method ``key``."""
    from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
    from fedlearn.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc

    if key is None:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        return stub.ModelInfer  # type: ignore[no-any-return]
    return channel.unary_unary(  # type: ignore[no-any-return]
        f"/{FLOOR_SERVICE}/{key}",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


# -- floor servers (run as ``--floor-server rest|grpc`` subprocesses) ------------------


def floor_model(registry: Path, keys: list[str]) -> tuple[Any, dict[str, np.ndarray]]:
    """The served version (v2) and the benchmark's input of each ``...-b{batch}`` key."""
    from fedlearn.registry.model_registry import ModelRegistry
    from fedlearn.serving.models import ServedModel

    with ModelRegistry(registry) as reg:
        model = ServedModel.from_registry(reg, MODEL, 2)
    batches = {key: int(key.rsplit("-b", 1)[1]) for key in keys}
    return model, {key: fixtures().digits(b, seed=b) for key, b in batches.items()}


def run_rest_floor(port: int, responses: dict[str, Any], registry: Path) -> None:
    """A bare Starlette app: ``POST /floor/{key}/infer`` reads the body and answers the
    captured bytes and headers of ``key``; ``/floor-model/{key}/infer`` also runs the
    model on ``key``'s input first (one thread-pool hop, as an async server must)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    fixed = {
        key: (base64.b64decode(r["body"]), r["headers"], r["media_type"])
        for key, r in responses["rest"].items()
    }

    model, inputs = floor_model(registry, list(fixed))

    async def infer(request: Request) -> Response:
        await request.body()
        body, headers, media_type = fixed[request.path_params["key"]]
        return Response(body, headers=headers, media_type=media_type)

    async def infer_model(request: Request) -> Response:
        await request.body()
        key = request.path_params["key"]
        await run_in_threadpool(model.infer, {"input": inputs[key]})
        body, headers, media_type = fixed[key]
        return Response(body, headers=headers, media_type=media_type)

    app = Starlette(
        routes=[
            Route("/floor/{key}/infer", infer, methods=["POST"]),
            Route("/floor-model/{key}/infer", infer_model, methods=["POST"]),
        ]
    )
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
    )


def run_grpc_floor(port: int, responses: dict[str, Any], registry: Path) -> None:
    """A bare grpcio server: method ``/floor/{key}`` answers the captured bytes of ``key``
    (request not parsed), with fedlearn's options and 8 worker threads;
    ``/floor/{key}-model`` also runs the model on ``key``'s input first."""
    import grpc

    model, inputs = floor_model(registry, list(responses["grpc"]))
    handlers = {}
    for key, body64 in responses["grpc"].items():
        answer = base64.b64decode(body64)
        handlers[key] = grpc.unary_unary_rpc_method_handler(
            lambda request, context, answer=answer: answer
        )

        def with_model(
            request: bytes, context: Any, answer: bytes = answer, key: str = key
        ) -> bytes:
            model.infer({"input": inputs[key]})
            return answer

        handlers[f"{key}-model"] = grpc.unary_unary_rpc_method_handler(with_model)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(FLOOR_SERVICE, handlers),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    server.stop(0)


# -- processes -------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``args`` (cwd: repo root), output to ``log``."""
    out = log.open("wb")
    try:
        return subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process by its pid; SIGKILL if it has not exited in 15 s."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    """Poll ``check`` until true (60 s), failing early if ``proc`` exits."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            if check():
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not come up within 60 s")


def swaps_total(url: str) -> float:
    """``fedlearn_serving_swaps_total{model="mnist"}`` from ``/metrics`` (0 if absent)."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search(r'^fedlearn_serving_swaps_total\{model="mnist"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


# -- the benchmark ---------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One load shape: protocol mode, batch size, concurrent clients."""

    mode: str  # "rest" (binary), "rest-json" or "grpc"
    batch: int
    clients: int

    @property
    def key(self) -> str:
        return f"{self.mode}-b{self.batch}"

    def __str__(self) -> str:
        return f"{self.mode} b={self.batch} C={self.clients}"


@dataclass
class Results:
    """Everything measured, per cell and repetition."""

    machine: dict[str, Any]
    args: dict[str, Any]
    cells: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    summary: list[dict[str, Any]] = field(default_factory=list)
    hot_swap: dict[str, Any] = field(default_factory=dict)


def machine() -> dict[str, Any]:
    """What ran this: CPUs, load average, versions."""
    import grpc
    import httpx
    import torch
    import uvicorn

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
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "uvicorn": uvicorn.__version__,
        "httpx": httpx.__version__,
    }


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_cells(args: argparse.Namespace) -> list[Cell]:
    """REST binary and gRPC at every batch x C; REST JSON at ``--json-batches``, C=1."""
    cells = []
    for mode in ("rest", "grpc"):
        for batch in parse_ints(args.batches):
            for clients in parse_ints(args.clients):
                cells.append(Cell(mode, batch, clients))
    for batch in parse_ints(args.json_batches):
        cells.append(Cell("rest-json", batch, 1))
    return cells


def capture(
    url: str, grpc_address: str, inputs: dict[int, np.ndarray], expected: dict[int, np.ndarray]
) -> dict[str, Any]:
    """fedlearn's answer to each benchmark request (also checked against the model)."""
    import httpx

    from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb

    rest: dict[str, Any] = {}
    grpc_answers: dict[str, str] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        for batch, x in inputs.items():
            for mode, make in (("rest", rest_binary_body), ("rest-json", rest_json_body)):
                body, headers = make(x)
                r = client.post(INFER_PATH, content=body, headers=headers)
                version, logits = decode_rest(
                    r.status_code, r.content, r.headers.get(HEADER_LENGTH)
                )
                assert version == "2", f"production should be v2, fedlearn answered v{version}"
                np.testing.assert_allclose(logits, expected[batch], rtol=1e-5, atol=1e-6)
                keep = {k: v for k, v in r.headers.items() if k.lower() == HEADER_LENGTH.lower()}
                rest[f"{mode}-b{batch}"] = {
                    "body": base64.b64encode(r.content).decode(),
                    "headers": keep,
                    "media_type": r.headers["content-type"],
                }
    with grpc_channel(grpc_address) as channel:
        infer = grpc_methods(channel, None)
        for batch, x in inputs.items():
            response = infer(grpc_request(x), timeout=30)
            _, logits = decode_grpc(response)
            np.testing.assert_allclose(logits, expected[batch], rtol=1e-5, atol=1e-6)
            grpc_answers[f"grpc-b{batch}"] = base64.b64encode(
                pb.ModelInferResponse.SerializeToString(response)
            ).decode()
    return {"rest": rest, "grpc": grpc_answers}


def measure_cell(
    cell: Cell,
    target: str,
    inputs: dict[int, np.ndarray],
    urls: dict[str, str],
    args: argparse.Namespace,
) -> Stats:
    """One closed-loop run of ``cell`` against ``target`` (one of TARGETS)."""
    x = inputs[cell.batch]
    if cell.mode.startswith("rest"):
        encode = rest_json_body if cell.mode == "rest-json" else rest_binary_body
        body, headers = encode(x)
        path = {
            "fedlearn": INFER_PATH,
            "floor": f"/floor/{cell.key}/infer",
            "floor+model": f"/floor-model/{cell.key}/infer",
        }[target]
        url = urls["rest"] if target == "fedlearn" else urls["rest_floor"]
        factory = rest_factory(url, path, body, headers)
        return closed_loop(factory, cell.clients, args.warmup, args.duration)
    address = urls["grpc"] if target == "fedlearn" else urls["grpc_floor"]
    with grpc_channel(address) as channel:
        key = {"fedlearn": None, "floor": cell.key, "floor+model": f"{cell.key}-model"}[target]
        method = grpc_methods(channel, key)
        factory = grpc_factory(method, grpc_request(x))
        return closed_loop(factory, cell.clients, args.warmup, args.duration)


def model_factory(model: Any, x: np.ndarray) -> Factory:
    """Per thread: ``ServedModel.infer`` in this process (the compute floor)."""

    def make() -> tuple[Call, Callable[[], None]]:
        def call() -> tuple[str, np.ndarray]:
            return "", model.infer({"input": x})["logits"]

        return call, lambda: None

    return make


def hot_swap(
    args: argparse.Namespace,
    registry_root: Path,
    urls: dict[str, str],
    modules: list[Any],
) -> dict[str, Any]:
    """Flip production v1 <-> v2 under load; every answer must succeed and match the
    in-process logits of the version it names."""
    from fedlearn.registry.model_registry import ModelRegistry

    fx = fixtures()
    n = args.swap_clients
    xs = [fx.digits(args.swap_batch, seed=100 + i) for i in range(2 * n)]
    expected = [{v + 1: fx.predict(m, x) for v, m in enumerate(modules)} for x in xs]
    for e in expected:
        assert not np.allclose(e[1], e[2]), "v1 and v2 must answer differently"
    stop_flag = threading.Event()
    lock = threading.Lock()
    counts: dict[str, dict[str, int]] = {
        p: {"ok": 0, "failed": 0, "mismatched": 0, "exact": 0, "v1": 0, "v2": 0, "changes": 0}
        for p in ("rest", "grpc")
    }
    failures: list[str] = []

    def client(protocol: str, index: int, channel: Any) -> None:
        x, want = xs[index], expected[index]
        if protocol == "rest":
            body, headers = rest_binary_body(x)
            call, close = rest_factory(urls["rest"], INFER_PATH, body, headers)()
        else:
            call, close = grpc_factory(grpc_methods(channel, None), grpc_request(x))()
        mine = {k: 0 for k in counts[protocol]}
        last = ""
        try:
            while not stop_flag.is_set():
                try:
                    version, logits = call()
                except Exception as exc:
                    mine["failed"] += 1
                    with lock:
                        failures.append(f"{protocol}: {type(exc).__name__}: {exc}"[:300])
                    continue
                reference = want.get(int(version)) if version.isdigit() else None
                if reference is None or not np.allclose(logits, reference, rtol=1e-5, atol=1e-6):
                    mine["mismatched"] += 1
                    with lock:
                        failures.append(f"{protocol}: v{version!r} answer does not match")
                    continue
                mine["ok"] += 1
                mine["exact"] += int(np.array_equal(logits, reference))
                mine[f"v{version}"] += 1
                mine["changes"] += int(bool(last) and last != version)
                last = version
        finally:
            close()
            with lock:
                for k, v in mine.items():
                    counts[protocol][k] += v

    registry = ModelRegistry(registry_root)
    before = swaps_total(urls["rest"])
    flips: list[int] = []
    with grpc_channel(urls["grpc"]) as channel:
        threads = [
            threading.Thread(target=client, args=(p, i + (n if p == "grpc" else 0), channel))
            for p in ("rest", "grpc")
            for i in range(n)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        current = registry.aliases(MODEL)["production"]
        t0 = time.perf_counter()
        for _ in range(args.swaps):
            time.sleep(args.swap_every)
            if current == 2:
                current = registry.rollback(MODEL).version
            else:
                registry.promote(MODEL, 2, None)
                current = 2
            flips.append(current)
        flip_seconds = time.perf_counter() - t0
        time.sleep(max(0.5, 10 * args.poll))
        stop_flag.set()
        for thread in threads:
            thread.join()
    registry.close()
    after = swaps_total(urls["rest"])
    total = {k: counts["rest"][k] + counts["grpc"][k] for k in counts["rest"]}
    return {
        "clients": {"rest": n, "grpc": n},
        "batch": args.swap_batch,
        "flips": len(flips),
        "flip_seconds": flip_seconds,
        "swaps_in_metrics": after - before,
        "per_protocol": counts,
        "total": total,
        "failures": failures[:20],
        "passed": total["failed"] == 0 and total["mismatched"] == 0 and total["ok"] > 0,
    }


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarize(cells: list[Cell], results: Results) -> list[dict[str, Any]]:
    """Median per cell over repetitions, with per-repetition ratios to the floors.

    The in-process compute floor of a batch size is the model's p50 at C=1 (its latency
    alone) and its best req/s over the C measured (threads oversubscribe the 2 CPUs
    differently in different processes, so the best is the fairer floor).
    """
    rows = []
    for cell in cells:
        fed = results.cells[str(cell)]["fedlearn"]
        floor = results.cells[str(cell)]["floor"]
        served = results.cells[str(cell)]["floor+model"]
        by_c = [
            runs["model"]
            for name, runs in results.cells.items()
            if name.startswith(f"model b={cell.batch} ")
        ]
        alone = results.cells[f"model b={cell.batch} C=1"]["model"]
        best = [max(runs[rep]["rps"] for runs in by_c) for rep in range(len(fed))]
        reps = range(len(fed))
        sum_p50 = [fed[r]["p50_ms"] / (floor[r]["p50_ms"] + alone[r]["p50_ms"]) for r in reps]
        sum_rps = [fed[r]["rps"] * (1 / floor[r]["rps"] + 1 / best[r]) for r in reps]
        rows.append(
            {
                "cell": str(cell),
                "mode": cell.mode,
                "batch": cell.batch,
                "clients": cell.clients,
                **{
                    f"{who}_{k}": median([s[k] for s in runs])
                    for who, runs in (("fedlearn", fed), ("floor", floor), ("served", served))
                    for k in ("rps", "p50_ms", "p99_ms")
                },
                "model_p50_ms": median([s["p50_ms"] for s in alone]),
                "model_best_rps": median(best),
                "fedlearn_errors": sum(s["errors"] for s in fed),
                "floor_errors": sum(s["errors"] for s in floor + served),
                "served_rps_ratio": median([fed[r]["rps"] / served[r]["rps"] for r in reps]),
                "served_p50_ratio": median([fed[r]["p50_ms"] / served[r]["p50_ms"] for r in reps]),
                "sum_rps_ratio": median(sum_rps),
                "sum_p50_ratio": median(sum_p50) if cell.clients == 1 else float("nan"),
                "floor_rps_ratio": median([fed[r]["rps"] / floor[r]["rps"] for r in reps]),
            }
        )
    return rows


def print_summary(rows: list[dict[str, Any]], swap: dict[str, Any]) -> None:
    """The results as a plain table, then the ratios and the hot swap."""
    head = (
        f"{'cell':<19}{'fedlearn req/s':>15}{'p50':>7}{'p99':>7}"
        f"{'floor req/s':>12}{'p50':>7}{'floor+model':>12}{'p50':>7}"
        f"{'model req/s':>12}{'p50':>7}{'|':>3}{'req/s':>7}{'p50':>6}{'|':>3}"
        f"{'req/s':>7}{'p50':>6}{'err':>5}"
    )
    print("\n" + head)
    print("-" * len(head))
    for r in rows:
        sum_p50 = "-" if r["clients"] != 1 else f"{r['sum_p50_ratio']:.2f}"
        print(
            f"{r['cell']:<19}{r['fedlearn_rps']:>15.0f}{r['fedlearn_p50_ms']:>7.2f}"
            f"{r['fedlearn_p99_ms']:>7.2f}{r['floor_rps']:>12.0f}{r['floor_p50_ms']:>7.2f}"
            f"{r['served_rps']:>12.0f}{r['served_p50_ms']:>7.2f}"
            f"{r['model_best_rps']:>12.0f}{r['model_p50_ms']:>7.2f}{'|':>3}"
            f"{r['served_rps_ratio']:>7.2f}{r['served_p50_ratio']:>6.2f}{'|':>3}"
            f"{r['sum_rps_ratio']:>7.2f}{sum_p50:>6}{r['fedlearn_errors']:>5d}"
        )
    print(
        "\nTimes in ms; medians over repetitions (ratios computed per repetition).\n"
        "floor: bare server, captured answer, no model. floor+model: the same server also "
        "running ServedModel.infer.\nmodel: ServedModel.infer in this process (p50 at C=1, "
        "best req/s over the C measured).\nFirst ratio pair: fedlearn / floor+model (req/s, "
        "p50). Second pair: fedlearn req/s / (1/(1/floor req/s + 1/model req/s)) and, at "
        "C=1,\nfedlearn p50 / (floor p50 + model p50)."
    )
    for r in rows:
        p50 = f", p50 {r['sum_p50_ratio']:.2f}" if r["clients"] == 1 else ""
        print(
            f"{r['cell']}: fedlearn/(floor+model) req/s = {r['served_rps_ratio']:.2f}, "
            f"p50 {r['served_p50_ratio']:.2f}; fedlearn/(floor (+) model) req/s = "
            f"{r['sum_rps_ratio']:.2f}{p50}; fedlearn/floor req/s = {r['floor_rps_ratio']:.2f}"
        )
    if swap:
        t = swap["total"]
        print(
            f"\nhot swap: {swap['flips']} flips in {swap['flip_seconds']:.1f} s, "
            f"{swap['swaps_in_metrics']:.0f} swaps in /metrics; "
            f"{t['ok']} answers ({t['v1']} v1, {t['v2']} v2, {t['exact']} bit-exact), "
            f"{t['failed']} failed, {t['mismatched']} mismatched, {t['changes']} version "
            f"changes seen by the {2 * swap['clients']['rest']} clients; "
            f"REST {swap['per_protocol']['rest']['ok']}, gRPC {swap['per_protocol']['grpc']['ok']}"
            f" -> {'PASS' if swap['passed'] else 'FAIL'}"
        )
        for line in swap["failures"]:
            print("  ", line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--batches", default="1,32", help="batch sizes (comma-separated)")
    parser.add_argument("--clients", default="1,8", help="concurrent clients (comma-separated)")
    parser.add_argument("--json-batches", default="1,32", help="REST JSON-mode batches (C=1)")
    parser.add_argument("--duration", type=float, default=1.5, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=0.4, help="seconds before measuring")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
    parser.add_argument("--poll", type=float, default=0.05, help="endpoint registry poll (s)")
    parser.add_argument("--swaps", type=int, default=20, help="production flips under load")
    parser.add_argument("--swap-every", type=float, default=0.25, help="seconds between flips")
    parser.add_argument("--swap-clients", type=int, default=4, help="clients per protocol")
    parser.add_argument("--swap-batch", type=int, default=4, help="batch size during swaps")
    parser.add_argument("--skip-swap", action="store_true", help="no hot-swap part")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch intra-op threads in every process (OMP_NUM_THREADS; 0: torch's default)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument("--floor-server", choices=["rest", "grpc"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--responses", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--registry", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.floor_server is not None:
        assert args.responses is not None and args.registry is not None
        responses = json.loads(args.responses.read_text())
        serve_floor = run_rest_floor if args.floor_server == "rest" else run_grpc_floor
        serve_floor(args.port, responses, args.registry)
        return 0

    if args.torch_threads > 0:  # before torch is imported here; inherited by children
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)

    import httpx

    from fedlearn.registry.model_registry import ModelRegistry
    from fedlearn.serving.models import ServedModel

    fx = fixtures()
    results = Results(machine=machine(), args={k: str(v) for k, v in vars(args).items()})
    print(json.dumps(results.machine))
    cells = build_cells(args)
    batches = sorted({c.batch for c in cells})
    inputs = {b: fx.digits(b, seed=b) for b in batches}
    procs: list[subprocess.Popen[bytes]] = []
    swap: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp_name:
        tmp = Path(tmp_name)
        registry = tmp / "registry"
        modules = fx.publish_mnist(registry, seeds=(0, 1))
        expected = {b: fx.predict(modules[1], x) for b, x in inputs.items()}
        ports = {k: free_port() for k in ("rest", "grpc", "rest_floor", "grpc_floor")}
        urls = {
            "rest": f"http://127.0.0.1:{ports['rest']}",
            "grpc": f"127.0.0.1:{ports['grpc']}",
            "rest_floor": f"http://127.0.0.1:{ports['rest_floor']}",
            "grpc_floor": f"127.0.0.1:{ports['grpc_floor']}",
        }
        try:
            serve = [
                sys.executable,
                "-m",
                "fedlearn.cli.main",
                "serve",
                "--registry",
                str(registry),
                "--path",  # clients.mnist's builder (python -m also puts the cwd first)
                str(ROOT),
            ]
            serve += ["--http-port", str(ports["rest"]), "--grpc-port", str(ports["grpc"])]
            serve += ["--poll", str(args.poll)]
            procs.append(start(serve, tmp / "serve.log"))
            ready = lambda: httpx.get(urls["rest"] + "/v2/health/ready").status_code == 200  # noqa: E731
            wait_until(ready, procs[0], "fedlearn serve")
            responses = capture(urls["rest"], urls["grpc"], inputs, expected)
            (tmp / "responses.json").write_text(json.dumps(responses))
            for kind in ("rest", "grpc"):
                floor = [sys.executable, str(Path(__file__).resolve()), "--floor-server", kind]
                floor += ["--port", str(ports[f"{kind}_floor"])]
                floor += ["--responses", str(tmp / "responses.json")]
                floor += ["--registry", str(registry)]
                procs.append(start(floor, tmp / f"floor-{kind}.log"))
            wait_until(lambda: listening(ports["rest_floor"]), procs[1], "REST floor")
            wait_until(lambda: listening(ports["grpc_floor"]), procs[2], "gRPC floor")
            with ModelRegistry(registry) as reg:
                served = ServedModel.from_registry(reg, MODEL, 2)
            model_cells = sorted({(c.batch, n) for c in cells for n in (1, c.clients)})
            for rep in range(args.reps):
                for batch, clients in model_cells:
                    name = f"model b={batch} C={clients}"
                    stats = closed_loop(
                        model_factory(served, inputs[batch]), clients, args.warmup, args.duration
                    )
                    results.cells.setdefault(name, {}).setdefault("model", []).append(asdict(stats))
                    print(f"rep {rep + 1} {name}: {stats.rps:.0f} req/s p50 {stats.p50_ms:.2f} ms")
                for cell in cells:
                    for target in TARGETS:
                        stats = measure_cell(cell, target, inputs, urls, args)
                        results.cells.setdefault(str(cell), {}).setdefault(target, []).append(
                            asdict(stats)
                        )
                        print(
                            f"rep {rep + 1} {cell} {target}: {stats.rps:.0f} req/s "
                            f"p50 {stats.p50_ms:.2f} ms p99 {stats.p99_ms:.2f} ms "
                            f"errors {stats.errors} {stats.first_error}"
                        )
            if not args.skip_swap:
                swap = hot_swap(args, registry, urls, modules)
                results.hot_swap = swap
        finally:
            for proc in reversed(procs):
                stop(proc)
    results.machine["loadavg_end"] = os.getloadavg()
    results.summary = summarize(cells, results)
    print_summary(results.summary, swap)
    print(f"load average at the end: {results.machine['loadavg_end']}")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(results), indent=1))
    bench_errors = sum(r["fedlearn_errors"] for r in results.summary)
    if bench_errors or (swap and not swap["passed"]):
        print(f"FAILED: {bench_errors} benchmark request errors, hot swap {swap.get('passed')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
