"""The Open Inference Protocol v2 REST endpoint: metadata, JSON and binary inference, errors."""

from __future__ import annotations

import json
import logging
import ssl
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from fedlearn.errors import ConfigError
from fedlearn.security.certs import write_dev_pki
from fedlearn.serving.metrics import ServingMetrics
from fedlearn.serving.models import ServedModel
from fedlearn.serving.repository import ModelRepository
from fedlearn.serving.rest import HEADER_LENGTH, create_app
from fedlearn.serving.threaded import serve_rest
from serving import digits, predict, publish_mnist

with warnings.catch_warnings():  # starlette nudges towards httpx2, which is not installed
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

INFER = "/v2/models/mnist/infer"
IMAGE_BYTES = 28 * 28 * 4


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[nn.Module]]:
    """A registry with mnist v1 (seed 0) and v2 (seed 1, production)."""
    root = tmp_path_factory.mktemp("registry")
    return root, publish_mnist(root, (0, 1))


@pytest.fixture(scope="module")
def modules(registry: tuple[Path, list[nn.Module]]) -> list[nn.Module]:
    return registry[1]


@pytest.fixture(scope="module")
def repository(registry: tuple[Path, list[nn.Module]]) -> Iterator[ModelRepository]:
    repo = ModelRepository(registry[0])
    repo.start()
    yield repo
    repo.close()


def make_client(repository: ModelRepository, **kwargs: Any) -> tuple[TestClient, ServingMetrics]:
    metrics = ServingMetrics()
    return TestClient(create_app(repository, metrics, **kwargs)), metrics


@pytest.fixture
def client(repository: ModelRepository) -> TestClient:
    return make_client(repository, server_version="9.8.7")[0]


def json_request(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    entry = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    return {"inputs": [entry], **extra}


def binary_request(x: np.ndarray, **extra: Any) -> tuple[bytes, dict[str, str]]:
    raw = x.astype("<f4").tobytes()
    entry = {
        "name": "input",
        "shape": list(x.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    head = json.dumps({"inputs": [entry], **extra}).encode()
    return head + raw, {HEADER_LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def decode(response: httpx.Response) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The response JSON and its outputs as arrays (JSON or binary)."""
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER_LENGTH)
    content = response.content
    head = json.loads(content if length is None else content[: int(length)])
    offset = 0 if length is None else int(length)
    arrays = {}
    for out in head["outputs"]:
        dtype = {"FP32": np.float32}[out["datatype"]]
        if "data" in out:
            arrays[out["name"]] = np.array(out["data"], dtype=dtype).reshape(out["shape"])
        else:
            size = out["parameters"]["binary_data_size"]
            raw = content[offset : offset + size]
            offset += size
            arrays[out["name"]] = np.frombuffer(raw, dtype="<f4").reshape(out["shape"])
    assert offset in (0, len(content)), "binary section not fully used"
    return head, arrays


def assert_logits(got: np.ndarray, module: nn.Module, x: np.ndarray) -> None:
    np.testing.assert_allclose(got, predict(module, x), rtol=1e-6, atol=1e-6)


def assert_serves(client: TestClient | httpx.Client, module: nn.Module) -> None:
    """A good JSON request still answers with ``module``'s predictions."""
    x = digits(2, seed=7)
    _, arrays = decode(client.post(INFER, json=json_request(x)))
    assert_logits(arrays["logits"], module, x)


# -- health and metadata ----------------------------------------------------------------


def test_health_and_server_metadata(client: TestClient) -> None:
    assert client.get("/v2/health/live").status_code == 200
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "fedlearn" and meta["version"] == "9.8.7"
    assert "binary_tensor_data" in meta["extensions"]


def test_server_version_defaults_to_the_installed_package(repository: ModelRepository) -> None:
    import fedlearn

    client, _ = make_client(repository)
    assert client.get("/v2").json()["version"] == fedlearn.__version__


@pytest.mark.parametrize("path", ["/v2/models/mnist", "/v2/models/mnist/versions/1"])
def test_model_metadata(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.json() == {
        "name": "mnist",
        "versions": ["1", "2"],
        "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }


def test_model_ready(client: TestClient) -> None:
    assert client.get("/v2/models/mnist/ready").status_code == 200
    assert client.get("/v2/models/mnist/versions/1/ready").status_code == 200
    unknown = client.get("/v2/models/nope/ready")
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]
    assert client.get("/v2/models/mnist/versions/9/ready").status_code == 404
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/mnist/versions/9").status_code == 404


def test_not_ready_until_the_repository_loads(registry: tuple[Path, list[nn.Module]]) -> None:
    repo = ModelRepository(registry[0])  # never started: nothing loaded yet
    try:
        client, _ = make_client(repo)
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/v2/models/mnist/ready").status_code == 503
        infer = client.post(INFER, json=json_request(digits(1)))
        assert infer.status_code == 503 and "no 'production' version" in infer.json()["error"]
        assert client.get("/v2/models/mnist").status_code == 503
        # an explicit version loads on demand
        assert client.get("/v2/models/mnist/versions/1/ready").status_code == 200
        assert client.get("/v2/models/mnist/versions/1").status_code == 200
        repo.refresh()
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/v2/models/mnist/ready").status_code == 200
    finally:
        repo.close()


# -- inference --------------------------------------------------------------------------


def test_json_infer_matches_in_process(client: TestClient, modules: list[nn.Module]) -> None:
    x = digits(3)
    head, arrays = decode(client.post(INFER, json=json_request(x, id="req-1")))
    assert head["model_name"] == "mnist" and head["model_version"] == "2"
    assert head["id"] == "req-1"
    assert [(o["name"], o["datatype"], o["shape"]) for o in head["outputs"]] == [
        ("logits", "FP32", [3, 10])
    ]
    assert_logits(arrays["logits"], modules[1], x)
    # nested (non-flat) data and an explicit output list give the same answer
    body = json_request(x, outputs=[{"name": "logits"}])
    body["inputs"][0]["data"] = x.tolist()
    _, again = decode(client.post(INFER, json=body))
    np.testing.assert_array_equal(again["logits"], arrays["logits"])


def test_explicit_versions_answer_with_their_own_weights(
    client: TestClient, modules: list[nn.Module]
) -> None:
    x = digits(4, seed=3)
    answers = {}
    for version in (1, 2):
        path = f"/v2/models/mnist/versions/{version}/infer"
        head, arrays = decode(client.post(path, json=json_request(x)))
        assert head["model_version"] == str(version)
        assert_logits(arrays["logits"], modules[version - 1], x)
        answers[version] = arrays["logits"]
    assert not np.allclose(answers[1], answers[2])


@pytest.mark.parametrize(
    ("extra", "binary_out"),
    [
        ({"parameters": {"binary_data_output": True}}, True),
        ({"outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, True),
        (
            {
                "parameters": {"binary_data_output": True},
                "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
            },
            False,
        ),
        ({}, False),
    ],
)
def test_binary_tensor_round_trip(
    client: TestClient, modules: list[nn.Module], extra: dict[str, Any], binary_out: bool
) -> None:
    x = digits(3, seed=5)
    body, headers = binary_request(x, **extra)
    response = client.post(INFER, content=body, headers=headers)
    head, arrays = decode(response)
    out = head["outputs"][0]
    if binary_out:
        assert response.headers["content-type"] == "application/octet-stream"
        assert out["parameters"] == {"binary_data_size": 3 * 10 * 4} and "data" not in out
        assert len(response.content) == int(response.headers[HEADER_LENGTH]) + 3 * 10 * 4
    else:
        assert response.headers["content-type"] == "application/json"
        assert HEADER_LENGTH not in response.headers and "data" in out
    assert_logits(arrays["logits"], modules[1], x)
    # the JSON path gives bit-identical logits
    _, json_arrays = decode(client.post(INFER, json=json_request(x)))
    np.testing.assert_array_equal(arrays["logits"], json_arrays["logits"])


def test_non_finite_inputs_give_non_finite_json(client: TestClient) -> None:
    x = digits(1)
    x[0, 0, 0, 0] = np.nan
    body = json.dumps(json_request(x)).encode()  # Python writes NaN
    _, arrays = decode(client.post(INFER, content=body))
    assert np.isnan(arrays["logits"]).all()


# -- bad requests -----------------------------------------------------------------------

X1 = digits(1, seed=11)
RAW1 = X1.tobytes()


def _input(**changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": "input",
        "shape": [1, 1, 28, 28],
        "datatype": "FP32",
        "data": X1.ravel().tolist(),
    }
    for key, value in changes.items():
        if value is ...:
            del entry[key]
        else:
            entry[key] = value
    return entry


def _body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs or [_input()]), **extra}).encode()


def _binary(size: Any, tail: bytes, header: str | None = "auto", **changes: Any) -> tuple:
    fields: dict[str, Any] = {"data": ..., "parameters": {"binary_data_size": size}}
    head = _body(_input(**{**fields, **changes}))
    headers = (
        {} if header is None else {HEADER_LENGTH: str(len(head)) if header == "auto" else header}
    )
    return head + tail, headers


BAD_REQUESTS = {
    # name: (method, path, body, headers, status, message fragment)
    "not json": ("POST", INFER, b"{", {}, 400, "not valid JSON"),
    "not utf-8": ("POST", INFER, b"\xff\xfe", {}, 400, "not valid JSON"),
    "too deep": ("POST", INFER, b"[" * 100_000, {}, 400, "nested too deeply"),
    "huge integer": ("POST", INFER, b'{"id": ' + b"1" * 5000 + b"}", {}, 400, "not valid JSON"),
    "array body": ("POST", INFER, b"[]", {}, 400, "must be an object"),
    "no inputs": ("POST", INFER, b"{}", {}, 400, "'inputs' must be a non-empty list"),
    "empty inputs": ("POST", INFER, b'{"inputs": []}', {}, 400, "non-empty list"),
    "input not object": ("POST", INFER, b'{"inputs": [1]}', {}, 400, "input 0 must be an object"),
    "no name": ("POST", INFER, _body(_input(name=...)), {}, 400, "'name' must be a string"),
    "no datatype": ("POST", INFER, _body(_input(datatype=...)), {}, 400, "'datatype' must be"),
    "no shape": ("POST", INFER, _body(_input(shape=...)), {}, 400, "'shape' must be a list"),
    "negative shape": (
        "POST",
        INFER,
        _body(_input(shape=[-1, 1, 28, 28])),
        {},
        400,
        "shape must be a list of non-negative integers",
    ),
    "unknown datatype": (
        "POST",
        INFER,
        _body(_input(datatype="FOO")),
        {},
        400,
        "unsupported datatype 'FOO'",
    ),
    "BYTES": ("POST", INFER, _body(_input(datatype="BYTES")), {}, 400, "unsupported datatype"),
    "wrong datatype": (
        "POST",
        INFER,
        _body(_input(datatype="FP64")),
        {},
        400,
        "datatype FP64, expected FP32",
    ),
    "wrong shape": (
        "POST",
        INFER,
        _body(_input(shape=[1, 784])),
        {},
        400,
        "shape [1, 784], expected [-1, 1, 28, 28]",
    ),
    "data count": (
        "POST",
        INFER,
        _body(_input(shape=[2, 1, 28, 28])),
        {},
        400,
        "data holds 784 elements",
    ),
    "string data": ("POST", INFER, _body(_input(data=["a"] * 784)), {}, 400, "must be numbers"),
    "ragged data": (
        "POST",
        INFER,
        _body(_input(data=[[1.0], [1.0, 2.0]])),
        {},
        400,
        "data holds 2 elements",
    ),
    "no data": ("POST", INFER, _body(_input(data=...)), {}, 400, "neither 'data' nor"),
    "empty batch": (
        "POST",
        INFER,
        _body(_input(shape=[0, 1, 28, 28], data=[])),
        {},
        400,
        "empty batch",
    ),
    "unknown input": ("POST", INFER, _body(_input(name="image")), {}, 400, "unknown input 'image'"),
    "duplicate input": ("POST", INFER, _body(_input(), _input()), {}, 400, "appears twice"),
    "unknown output": (
        "POST",
        INFER,
        _body(outputs=[{"name": "probs"}]),
        {},
        400,
        "unknown output 'probs'",
    ),
    "duplicate output": (
        "POST",
        INFER,
        _body(outputs=[{"name": "logits"}, {"name": "logits"}]),
        {},
        400,
        "output 'logits' appears twice",
    ),
    "outputs not list": (
        "POST",
        INFER,
        _body(outputs={"name": "logits"}),
        {},
        400,
        "must be a list",
    ),
    "output without name": ("POST", INFER, _body(outputs=[{}]), {}, 400, "string 'name'"),
    "id not string": ("POST", INFER, _body(id=7), {}, 400, "'id' must be a string"),
    "parameters not object": ("POST", INFER, _body(parameters=[1]), {}, 400, "must be an object"),
    "binary_data_output not bool": (
        "POST",
        INFER,
        _body(parameters={"binary_data_output": "yes"}),
        {},
        400,
        "must be true or false",
    ),
    "shared memory": (
        "POST",
        INFER,
        _body(_input(parameters={"shared_memory_region": "r"})),
        {},
        400,
        "shared memory is not supported",
    ),
    "header length past body": (
        "POST",
        INFER,
        _body(),
        {HEADER_LENGTH: "999999"},
        400,
        "body holds only",
    ),
    "header length negative": ("POST", INFER, _body(), {HEADER_LENGTH: "-1"}, 400, "non-negative"),
    "header length not int": ("POST", INFER, _body(), {HEADER_LENGTH: "12a"}, 400, "non-negative"),
    "header length splits json": (
        "POST",
        INFER,
        _body(),
        {HEADER_LENGTH: "10"},
        400,
        "not valid JSON",
    ),
    "binary bytes left over": (
        "POST",
        INFER,
        *_binary(len(RAW1), RAW1 + b"\0" * 4),
        400,
        "binary section holds 3140 bytes but the inputs' binary_data_size add up to 3136",
    ),
    "binary size past section": (
        "POST",
        INFER,
        *_binary(len(RAW1) + 4, RAW1),
        400,
        "runs past the binary section",
    ),
    "binary size without header": (
        "POST",
        INFER,
        *_binary(len(RAW1), b"", header=None),
        400,
        "runs past the binary section (0 bytes",
    ),
    "binary size negative": ("POST", INFER, *_binary(-4, RAW1), 400, "non-negative integer"),
    "binary size string": ("POST", INFER, *_binary("3136", RAW1), 400, "non-negative integer"),
    "binary size bool": ("POST", INFER, *_binary(True, RAW1), 400, "non-negative integer"),
    "binary size float": ("POST", INFER, *_binary(3136.0, RAW1), 400, "non-negative integer"),
    "binary size vs shape": (
        "POST",
        INFER,
        *_binary(len(RAW1), RAW1, shape=[2, 1, 28, 28]),
        400,
        "raw data holds 3136 bytes; shape [2, 1, 28, 28] of FP32 needs 6272",
    ),
    "data and binary": (
        "POST",
        INFER,
        *_binary(len(RAW1), RAW1, data=[0.0]),
        400,
        "both 'data' and binary_data_size",
    ),
    "compressed body": (
        "POST",
        INFER,
        _body(),
        {"Content-Encoding": "gzip"},
        415,
        "Content-Encoding 'gzip' is not supported",
    ),
    "unknown model": ("POST", "/v2/models/nope/infer", _body(), {}, 404, "unknown model 'nope'"),
    "unknown version": (
        "POST",
        "/v2/models/mnist/versions/9/infer",
        _body(),
        {},
        404,
        "has no version 9",
    ),
    "version not a number": (
        "POST",
        "/v2/models/mnist/versions/latest/infer",
        _body(),
        {},
        404,
        "version must be a positive integer",
    ),
    "GET infer": ("GET", INFER, b"", {}, 405, "Method Not Allowed"),
    "POST live": ("POST", "/v2/health/live", b"", {}, 405, "Method Not Allowed"),
    "unknown path": ("GET", "/v3/models", b"", {}, 404, "Not Found"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.keys())
def test_bad_request_is_refused_and_the_endpoint_keeps_serving(
    repository: ModelRepository, modules: list[nn.Module], case: str
) -> None:
    method, path, body, headers, status, fragment = BAD_REQUESTS[case]
    client, _ = make_client(repository)
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert fragment in message
    assert "Traceback" not in message
    assert _sample(client, "fedlearn_serving_errors_total", code=str(status)) == 1
    assert_serves(client, modules[1])


def test_body_over_the_limit_is_refused(repository: ModelRepository) -> None:
    client, _ = make_client(repository, max_body_bytes=4096)
    response = client.post(INFER, content=_body())  # ~16 KB
    assert response.status_code == 413 and "4096-byte limit" in response.json()["error"]
    small = client.post(INFER, content=b"{}")
    assert small.status_code == 400


def _asgi_post(app: Any, headers: list[tuple[bytes, bytes]], chunks: int, chunk: bytes) -> tuple:
    """POST to ``app`` over raw ASGI, the body streamed in ``chunks`` pieces."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled < chunks}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": INFER,
        "raw_path": INFER.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    anyio.run(app, scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


@pytest.mark.parametrize(
    "headers",
    [[], [(b"content-length", b"10")]],
    ids=["no content-length", "lying content-length"],
)
def test_streamed_body_stops_at_the_limit(
    repository: ModelRepository, headers: list[tuple[bytes, bytes]]
) -> None:
    app = create_app(repository, ServingMetrics(), max_body_bytes=10_000)
    status, body, pulled = _asgi_post(app, headers, chunks=10_000, chunk=b" " * 1000)
    assert status == 413 and "10000-byte limit" in body["error"]
    assert pulled <= 11  # stopped reading as soon as the limit was passed


def test_bad_content_length_is_refused(repository: ModelRepository) -> None:
    app = create_app(repository, ServingMetrics())
    status, body, _ = _asgi_post(app, [(b"content-length", b"ten")], chunks=1, chunk=b"{}")
    assert status == 400 and "Content-Length" in body["error"]


def test_unexpected_failure_is_a_generic_500(
    client: TestClient,
    modules: list[nn.Module],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(self: ServedModel, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail")

    with monkeypatch.context() as patch:
        patch.setattr(ServedModel, "infer", boom)
        with caplog.at_level(logging.ERROR, logger="fedlearn.serving.rest"):
            response = client.post(INFER, json=json_request(digits(1)))
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}
    assert "secret detail" in caplog.text  # logged for the operator, not sent to the client
    assert_serves(client, modules[1])


# -- fuzzing ----------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
FUZZ_LIMIT = 64 * 1024
FUZZ_PATHS = [
    "/v2/models/mnist/versions/7/infer",
    "/v2/models/mnist/versions/x/infer",
    "/v2/models/nope/infer",
]
MUTATIONS = [
    "path",
    "garbage",
    "document",
    "field",
    "drop",
    "data",
    "value",
    "shape",
    "datatype",
    "size",
    "tail",
    "header",
    "params",
    "outputs",
    "id",
    "inputs",
    "big",
]
SMALL_NUMBERS = st.floats() | st.integers(-(2**70), 2**70) | st.booleans()


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A good infer request (JSON or binary) with up to three random mutations."""
    x = digits(draw(st.integers(1, 2)), seed=draw(st.integers(0, 3)))
    path = draw(st.sampled_from([INFER, *(f"/v2/models/mnist/versions/{v}/infer" for v in (1, 2))]))
    entry: dict[str, Any] = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    tail = b""
    if draw(st.booleans()):
        tail = x.tobytes()
        entry["parameters"] = {"binary_data_size": len(tail)}
    else:
        entry["data"] = x.ravel().tolist()
    body: dict[str, Any] = {"inputs": [entry]}
    outputs = draw(
        st.sampled_from(
            [None, [{"name": "logits"}], [{"name": "logits", "parameters": {"binary_data": True}}]]
        )
    )
    if outputs is not None:
        body["outputs"] = outputs
    if draw(st.booleans()):
        body["parameters"] = {"binary_data_output": draw(st.booleans())}
    header: str | None = None
    document: Any = body
    padding = 0
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        if mutation == "path":
            path = draw(st.sampled_from(FUZZ_PATHS))
        elif mutation == "garbage":
            return path, draw(st.binary(max_size=64)), {}
        elif mutation == "document":
            document = draw(JSON_VALUES)
        elif mutation == "field":
            key = draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters"]))
            entry[key] = draw(JSON_VALUES)
        elif mutation == "drop":
            entry.pop(draw(st.sampled_from(["name", "shape", "datatype", "data", "parameters"])), 0)
        elif mutation == "data":
            entry["data"] = draw(st.lists(SMALL_NUMBERS, max_size=5) | JSON_VALUES)
        elif mutation == "value" and isinstance(entry.get("data"), list) and entry["data"]:
            index = draw(st.integers(0, len(entry["data"]) - 1))
            entry["data"][index] = draw(SMALL_NUMBERS | JSON_VALUES)
        elif mutation == "shape":
            entry["shape"] = draw(st.lists(st.integers(-2, 30), max_size=4))
        elif mutation == "datatype":
            entry["datatype"] = draw(
                st.sampled_from(["FP64", "FP16", "INT8", "BOOL", "BYTES", "fp32"])
            )
        elif mutation == "size":
            size = draw(st.integers(-5, 20_000) | JSON_VALUES)
            entry["parameters"] = {"binary_data_size": size}
        elif mutation == "tail":
            cut = draw(st.integers(0, len(tail)))
            tail = tail[:cut] + draw(st.binary(max_size=16))
        elif mutation == "header":
            header = draw(
                st.integers(-10, 40_000).map(str) | st.text(alphabet="0123456789-+ x.", max_size=5)
            )
        elif mutation == "params":
            body["parameters"] = draw(
                JSON_VALUES | st.fixed_dictionaries({"binary_data_output": JSON_VALUES})
            )
        elif mutation == "outputs":
            output = st.fixed_dictionaries(
                {"name": st.sampled_from(["logits", "probs"]) | JSON_VALUES},
                optional={"parameters": JSON_VALUES},
            )
            body["outputs"] = draw(st.lists(output, max_size=2) | JSON_VALUES)
        elif mutation == "id":
            body["id"] = draw(JSON_VALUES)
        elif mutation == "inputs":
            body["inputs"] = draw(st.sampled_from([[], [entry, entry], [entry, {}]]))
        elif mutation == "big":
            padding = FUZZ_LIMIT
    head = json.dumps(document).encode() + b" " * padding
    headers = {}
    if header is not None:
        headers[HEADER_LENGTH] = header
    elif tail:
        headers[HEADER_LENGTH] = str(len(head))
    return path, head + tail, headers


@pytest.fixture(scope="module")
def fuzz_client(repository: ModelRepository) -> TestClient:
    return make_client(repository, max_body_bytes=FUZZ_LIMIT)[0]


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=infer_requests())
def test_fuzzed_requests_never_break_the_endpoint(
    fuzz_client: TestClient, request: tuple[str, bytes, dict[str, str]]
) -> None:
    path, body, headers = request
    response = fuzz_client.post(path, content=body, headers=headers)
    assert response.status_code in (200, 400, 404, 413), response.text
    if response.status_code == 200:
        decode_any(response)
    else:
        assert isinstance(response.json()["error"], str)
    assert fuzz_client.get("/v2/health/live").status_code == 200


def decode_any(response: httpx.Response) -> None:
    """Check a 200 answer is well-formed: JSON head plus exactly the declared binary bytes."""
    length = response.headers.get(HEADER_LENGTH)
    head = json.loads(response.content if length is None else response.content[: int(length)])
    declared = sum(o.get("parameters", {}).get("binary_data_size", 0) for o in head["outputs"])
    if length is None:
        assert declared == 0
    else:
        assert len(response.content) == int(length) + declared


# -- metrics ----------------------------------------------------------------------------


def _sample(client: TestClient | httpx.Client, name: str, **labels: str) -> float:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_count_requests_and_errors(repository: ModelRepository) -> None:
    client, _ = make_client(repository)
    for _ in range(3):
        assert client.post(INFER, json=json_request(digits(1))).status_code == 200
    assert client.post(INFER, content=_body(_input(shape=[1, 784]))).status_code == 400
    assert client.post("/v2/models/nope/infer", content=_body()).status_code == 404
    assert client.get("/v2/nothing").status_code == 404
    requests = "fedlearn_serving_requests_total"
    assert _sample(client, requests, protocol="rest", model="mnist", outcome="ok") == 3
    assert _sample(client, requests, protocol="rest", model="mnist", outcome="error") == 1
    assert _sample(client, requests, model="nope") == 0  # unknown names never become labels
    assert _sample(client, "fedlearn_serving_request_seconds_count", model="mnist") == 4
    assert _sample(client, "fedlearn_serving_errors_total", protocol="rest", code="400") == 1
    assert _sample(client, "fedlearn_serving_errors_total", protocol="rest", code="404") == 2


# -- over a real socket -----------------------------------------------------------------


def test_real_uvicorn_server(repository: ModelRepository, modules: list[nn.Module]) -> None:
    app = create_app(repository, ServingMetrics(), max_body_bytes=200_000)
    server = serve_rest(app, "127.0.0.1", 0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert http.get("/v2/health/live").status_code == 200
            assert http.get("/v2/health/ready").status_code == 200
            assert http.get("/v2/models/mnist").json()["versions"] == ["1", "2"]
            assert_serves(http, modules[1])
            x = digits(3, seed=9)
            body, headers = binary_request(x, parameters={"binary_data_output": True})
            response = http.post(INFER, content=body, headers=headers)
            assert response.headers["content-type"] == "application/octet-stream"
            _, arrays = decode(response)
            assert_logits(arrays["logits"], modules[1], x)
            bad = http.post(INFER, content=b"{", headers={"Content-Type": "application/json"})
            assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
            assert_serves(http, modules[1])
        with httpx.Client(base_url=server.url, timeout=30) as http:
            big = http.post(INFER, content=b" " * 300_000)
            assert big.status_code == 413 and "200000-byte limit" in big.json()["error"]
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert_serves(http, modules[1])
    finally:
        server.stop()
    assert not server.thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/v2/health/live", timeout=5)


def test_real_uvicorn_server_over_tls(
    repository: ModelRepository, modules: list[nn.Module], tmp_path: Path
) -> None:
    pki = write_dev_pki(tmp_path)
    app = create_app(repository, ServingMetrics())
    with serve_rest(
        app, "127.0.0.1", 0, ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key)
    ) as server:
        assert server.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(pki.ca_cert))
        with httpx.Client(base_url=server.url, verify=trust, timeout=30) as https:
            assert_serves(https, modules[1])
        with pytest.raises(httpx.ConnectError):  # the dev CA is not trusted by default
            httpx.get(server.url + "/v2/health/live", timeout=5)


def test_serve_rest_reports_a_port_it_cannot_bind(repository: ModelRepository) -> None:
    app = create_app(repository, ServingMetrics())
    with (
        serve_rest(app, "127.0.0.1", 0) as first,
        pytest.raises(ConfigError, match="could not listen"),
    ):
        serve_rest(app, "127.0.0.1", first.port)
