"""The Open Inference Protocol v2 REST endpoint (the KServe / Triton ``/v2`` HTTP API).

Routes::

    GET  /v2/health/live                           200 while the process answers
    GET  /v2/health/ready                          200 when every promoted model is loaded
    GET  /v2                                       server metadata
    GET  /v2/models/{name}[/versions/{v}]          model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready    200 when that model (version) can answer
    POST /v2/models/{name}[/versions/{v}]/infer    inference (JSON, or Triton binary tensors)
    GET  /metrics                                  Prometheus text exposition

Status codes: 200 success; 400 malformed request (bad JSON, missing or mistyped fields,
inputs that do not fit the signature, inconsistent binary sizes); 404 unknown model,
version or path; 405 wrong method; 408 a body that has not fully arrived
``body_timeout_s`` after the request began (a slow-body client; the connection is closed);
413 body over ``max_body_bytes``; 415 a compressed
body (``Content-Encoding`` other than identity); 503 the model (or, for
``/v2/health/ready``, some model) has no loaded version, or ``max_inflight`` inference
requests are already being answered or queued (with ``Retry-After``: the request was not
read, try again); 500 anything else, with a generic
message (the detail goes to the log). Every non-200 answer has the JSON body
``{"error": "..."}`` except the ready probes, which answer ``{"ready": false}`` with 503
(any non-200 means "not ready", as the protocol and tritonclient read it); those are
answers, not failures, so only the other non-200 answers count in the error metric.

Binary tensor data (Triton's extension, used by tritonclient in binary mode): a request
with header ``Inference-Header-Content-Length: N`` carries its JSON in the first ``N``
bytes of the body and the raw little-endian tensors after it, in the order of the inputs
that declare ``parameters.binary_data_size``. Outputs asked for with
``parameters.binary_data: true`` (or all outputs, with the request parameter
``binary_data_output: true``) are answered the same way. JSON output data is flat and
row-major; non-finite floats are written as ``NaN`` / ``Infinity`` (as Python's and
tritonclient's JSON parsers read them).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST

from fedlearn.config.extras import extra_message
from fedlearn.errors import ConfigError, InvalidInput, ModelNotFound, ModelNotReady

try:  # the serve extra: without it, a ConfigError that names it rather than an ImportError
    import anyio
    import uvicorn  # noqa: F401  (the serve extra: the threaded server runs it)
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import Response
    from starlette.routing import Route
except ImportError as exc:
    raise ConfigError(extra_message("serve", "serving models over REST (OIP v2)")) from exc

from fedlearn.registry.spec import datatype_of
from fedlearn.serving.metrics import ServingMetrics
from fedlearn.serving.models import ServedModel
from fedlearn.serving.repository import ModelRepository
from fedlearn.serving.tensors import array_from_bytes, array_from_list

if TYPE_CHECKING:
    from fedlearn.serving.traffic import TrafficRouter

log = logging.getLogger(__name__)

PROTOCOL = "rest"
#: Header of the binary tensor data extension: the length of the JSON part of a body.
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
#: Seconds a request's whole body may take to arrive (64 MiB at 2.2 MB/s).
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_INFLIGHT = 256
"""Inference requests answered or queued at once; more get 503 (REST) / RESOURCE_EXHAUSTED."""
RETRY_AFTER_S = 1
#: The header making a traffic split sticky (``fedlearn.serving.traffic.ROUTE_HEADER``).
ROUTE_HEADER = "x-fedlearn-route-key"
_DIGITS = re.compile(r"[0-9]{1,19}")
_INTERNAL = "internal server error"

Endpoint = Callable[[Request], Awaitable[Response]]


class RequestError(Exception):
    """A request the endpoint refuses with ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: its id, input arrays and the outputs it wants."""

    id: str | None
    inputs: dict[str, np.ndarray]
    #: ``(name, binary)`` per explicitly requested output; empty: every output.
    outputs: tuple[tuple[str, bool | None], ...]
    binary_output: bool


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad(f"{where}: 'parameters' must be an object")
    return raw


def _flag(params: dict[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise _bad(f"{where}: parameter {key!r} must be true or false")


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON part and the binary section of ``body``."""
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    if not _DIGITS.fullmatch(text):
        raise _bad(f"{HEADER_LENGTH} must be a non-negative integer, got {header_length!r}")
    length = int(text)
    if length > len(body):
        raise _bad(f"{HEADER_LENGTH} is {length} but the body holds only {len(body)} bytes")
    return body[:length], memoryview(body)[length:]


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Decode an infer body (JSON, or JSON + binary section); RequestError(400) if malformed."""
    head, binary = _split_body(body, header_length)
    try:
        raw = json.loads(head)
    except RecursionError:
        raise _bad("request JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise _bad("request JSON must be an object")
    request_id = raw.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad("'id' must be a string")
    params = _parameters(raw.get("parameters"), "request")
    binary_output = bool(_flag(params, "binary_data_output", "request"))

    inputs_raw = raw.get("inputs")
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise _bad("'inputs' must be a non-empty list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, entry in enumerate(inputs_raw):
        where = f"input {i}"
        if not isinstance(entry, dict):
            raise _bad(f"{where} must be an object")
        name = entry.get("name")
        if not isinstance(name, str):
            raise _bad(f"{where}: 'name' must be a string")
        where = f"input {name!r}"
        if name in inputs:
            raise _bad(f"{where} appears twice")
        datatype = entry.get("datatype")
        if not isinstance(datatype, str):
            raise _bad(f"{where}: 'datatype' must be a string")
        shape = entry.get("shape")
        if not isinstance(shape, list):
            raise _bad(f"{where}: 'shape' must be a list of non-negative integers")
        in_params = _parameters(entry.get("parameters"), where)
        if "shared_memory_region" in in_params:
            raise _bad(f"{where}: shared memory is not supported")
        size = in_params.get("binary_data_size")
        try:
            if size is not None:
                if "data" in entry:
                    raise _bad(f"{where} has both 'data' and binary_data_size")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise _bad(f"{where}: binary_data_size must be a non-negative integer")
                if offset + size > len(binary):
                    raise _bad(
                        f"{where}: binary_data_size {size} runs past the binary section "
                        f"({len(binary)} bytes, {len(binary) - offset} left)"
                    )
                inputs[name] = array_from_bytes(binary[offset : offset + size], datatype, shape)
                offset += size
            elif "data" in entry:
                inputs[name] = array_from_list(entry["data"], datatype, shape)
            else:
                raise _bad(f"{where} has neither 'data' nor binary_data_size")
        except InvalidInput as exc:
            raise _bad(f"{where}: {exc}") from None
    if offset != len(binary):
        raise _bad(
            f"the binary section holds {len(binary)} bytes but the inputs' "
            f"binary_data_size add up to {offset}"
        )

    outputs: list[tuple[str, bool | None]] = []
    outputs_raw = raw.get("outputs")
    if outputs_raw is not None:
        if not isinstance(outputs_raw, list):
            raise _bad("'outputs' must be a list")
        for i, entry in enumerate(outputs_raw):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise _bad(f"output {i} must be an object with a string 'name'")
            name = entry["name"]
            if any(name == seen for seen, _ in outputs):
                raise _bad(f"output {name!r} appears twice")
            out_params = _parameters(entry.get("parameters"), f"output {name!r}")
            if "shared_memory_region" in out_params:
                raise _bad(f"output {name!r}: shared memory is not supported")
            if "classification" in out_params:
                raise _bad(f"output {name!r}: classification is not supported")
            outputs.append((name, _flag(out_params, "binary_data", f"output {name!r}")))
    return InferRequest(request_id, inputs, tuple(outputs), binary_output)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=True).encode("utf-8")


def encode_infer_response(
    model: ServedModel, request: InferRequest, results: dict[str, np.ndarray]
) -> Response:
    """The OIP response for ``results``, with binary outputs appended when asked for."""
    wanted = request.outputs or tuple((s.name, None) for s in model.signature.outputs)
    outputs = []
    blobs = []
    for name, binary in wanted:
        array = results[name]
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(array),
            "shape": list(array.shape),
        }
        if request.binary_output if binary is None else binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1).tolist()
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        body["id"] = request.id
    body["outputs"] = outputs
    head = _dumps(body)
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *blobs]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


def _json(obj: Any, status: int = 200) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json")


def create_app(
    repository: ModelRepository,
    metrics: ServingMetrics,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    server_name: str = "fedlearn",
    server_version: str | None = None,
    traffic: TrafficRouter | None = None,
) -> Starlette:
    """The OIP v2 REST app over ``repository`` (routes and status codes: module docstring).

    At most ``max_inflight`` inference requests are in flight at once: read, queued for a
    worker thread or running there. One more is answered 503 with ``Retry-After`` before
    its body is read, so a burst costs neither threads nor memory for bodies. ``server_version``
    defaults to the installed fedlearn distribution's version. ``traffic`` applies the
    registry's traffic policies to requests for a model's name (header
    ``x-fedlearn-route-key`` makes a split sticky); its state shows in the model's metadata.
    """
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    if not body_timeout_s > 0:
        raise ConfigError(f"body_timeout_s must be > 0, got {body_timeout_s}")
    if max_inflight < 1:
        raise ConfigError(f"max_inflight must be >= 1, got {max_inflight}")
    if server_version is None:
        try:
            server_version = importlib.metadata.version("fedlearn")
        except importlib.metadata.PackageNotFoundError:
            server_version = "unknown"
    server_meta = {"name": server_name, "version": server_version, "extensions": list(EXTENSIONS)}

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        metrics.error(PROTOCOL, status)
        response = _json({"error": message}, status)
        if headers:
            response.headers.update(headers)
        return response

    def guarded(endpoint: Endpoint) -> Endpoint:
        async def handle(request: Request) -> Response:
            try:
                return await endpoint(request)
            except RequestError as exc:
                # a body left unread (too slow, too large) is not drained: the
                # connection closes after the answer
                unread = exc.status in (408, 413)
                return error(exc.status, exc.message, {"Connection": "close"} if unread else None)
            except ModelNotFound as exc:
                return error(404, str(exc))
            except InvalidInput as exc:
                return error(400, str(exc))
            except ModelNotReady as exc:
                return error(503, str(exc))
            except ClientDisconnect:
                log.debug("client went away before sending its whole request")
                return error(400, "client disconnected")
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return error(500, _INTERNAL)

        return handle

    async def read_body(request: Request) -> bytes:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            raise RequestError(
                415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed"
            )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not _DIGITS.fullmatch(declared.strip()):
                raise _bad(f"Content-Length must be a non-negative integer, got {declared!r}")
            if int(declared) > max_body_bytes:
                raise RequestError(413, f"request body over the {max_body_bytes}-byte limit")
        chunks = []
        total = 0
        try:
            with anyio.fail_after(body_timeout_s):  # a slow body holds no more than this
                async for chunk in request.stream():
                    total += len(chunk)
                    if total > max_body_bytes:
                        raise RequestError(
                            413, f"request body over the {max_body_bytes}-byte limit"
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(
                408,
                f"the request body did not arrive within {body_timeout_s:g} s "
                f"({total} bytes came); send it at once",
            ) from None
        return b"".join(chunks)

    def version_of(request: Request) -> str | None:
        version = request.path_params.get("version")
        return None if version is None else str(version)

    async def live(request: Request) -> Response:
        return _json({"live": True})

    async def ready(request: Request) -> Response:
        ok = await run_in_threadpool(repository.all_ready)
        return _json({"ready": ok}, 200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return _json(server_meta)

    async def model_metadata(request: Request) -> Response:
        name = request.path_params["name"]
        model = await run_in_threadpool(repository.get, name, version_of(request))
        versions = await run_in_threadpool(repository.versions, name)
        meta = {
            "name": model.name,
            "versions": [str(v) for v in versions],
            "platform": model.platform,
            **model.signature.as_dict(),
            **({} if metrics.drift is None else {"drift": metrics.drift.status(model)}),
        }
        if traffic is not None and version_of(request) is None:
            routing = traffic.metadata(model.name)
            if routing is not None:
                meta["traffic"] = routing
        return _json(meta)

    async def model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        ok = await run_in_threadpool(repository.ready, name, version_of(request))
        return _json({"name": name, "ready": ok}, 200 if ok else 503)

    def run_infer(
        name: str,
        version: str | None,
        body: bytes,
        header_length: str | None,
        route_key: str | None = None,
    ) -> Response:
        # one thread-pool hop per request: look the model up, then parse, infer, encode
        model = repository.get(name, version)
        with metrics.infer(PROTOCOL, model.name):
            request = parse_infer_request(body, header_length)
            wanted = [output for output, _ in request.outputs] or None
            if traffic is not None and version is None:
                model, results = traffic.infer(model, request.inputs, wanted, route_key)
            else:
                results = model.infer(request.inputs, wanted)
            metrics.observed(model, request.inputs, results)
            return encode_infer_response(model, request, results)

    inflight = [0]  # touched only on the event loop's thread

    async def infer(request: Request) -> Response:
        if inflight[0] >= max_inflight:
            return error(
                503,
                f"{max_inflight} inference requests are already in flight; retry after "
                f"{RETRY_AFTER_S} s",
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        inflight[0] += 1
        try:
            body = await read_body(request)
            return await run_in_threadpool(
                run_infer,
                request.path_params["name"],
                version_of(request),
                body,
                request.headers.get(HEADER_LENGTH),
                request.headers.get(ROUTE_HEADER),
            )
        finally:
            inflight[0] -= 1

    async def prometheus(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # registered for HTTPException only
            return error(500, _INTERNAL)
        return error(exc.status_code, exc.detail, dict(exc.headers or {}))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error(500, _INTERNAL)

    def get(path: str, endpoint: Endpoint) -> Route:
        return Route(path, guarded(endpoint), methods=["GET"])

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    routes = [
        get("/v2/health/live", live),
        get("/v2/health/ready", ready),
        get("/v2", server_metadata),
        get(model, model_metadata),
        get(versioned, model_metadata),
        get(model + "/ready", model_ready),
        get(versioned + "/ready", model_ready),
        Route(model + "/infer", guarded(infer), methods=["POST"]),
        Route(versioned + "/infer", guarded(infer), methods=["POST"]),
        get("/metrics", prometheus),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
