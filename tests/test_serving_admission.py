"""The serving endpoint bounds the inference requests in flight: past ``max_inflight``
(answered or queued), REST answers 503 with Retry-After and gRPC RESOURCE_EXHAUSTED at
once, instead of taking a thread or a queue slot; the requests it took all succeed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from torch import nn

from fedlearn.errors import ConfigError
from fedlearn.serving.endpoint import EndpointSettings, ServingEndpoint, start_endpoint
from fedlearn.serving.models import ServedModel
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.oip.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from serving import digits, predict, publish_mnist

LIMIT = 4  # in flight per protocol: 2 gRPC workers + 2 queued, or 4 REST requests
EXTRA = 6


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[nn.Module]]:
    root = tmp_path_factory.mktemp("registry")
    return root, publish_mnist(root, (0,))


class Gate:
    """Makes every inference wait until opened, counting those that have started."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.open = threading.Event()
        self.started = 0
        self._lock = threading.Lock()
        original = ServedModel.infer

        def infer(model: ServedModel, *args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.started += 1
            assert self.open.wait(30)
            return original(model, *args, **kwargs)

        monkeypatch.setattr(ServedModel, "infer", infer)

    def wait_started(self, count: int) -> None:
        deadline = time.monotonic() + 20
        while self.started < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.started == count


@pytest.fixture
def endpoint(registry: tuple[Path, list[nn.Module]]) -> Iterator[ServingEndpoint]:
    settings = EndpointSettings(
        registry=registry[0], http_port=0, grpc_port=0, grpc_workers=2, max_inflight=LIMIT
    )
    with start_endpoint(settings) as ep:
        deadline = time.monotonic() + 20
        while not ep.repository.all_ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield ep


def _json_body(x: np.ndarray) -> dict[str, Any]:
    entry = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return {"inputs": [entry | {"data": x.ravel().tolist()}]}


def test_rest_answers_503_with_retry_after_past_the_bound(
    endpoint: ServingEndpoint,
    registry: tuple[Path, list[nn.Module]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate(monkeypatch)
    x = digits(1, seed=3)
    url = endpoint.http_url + "/v2/models/mnist/infer"

    def post() -> httpx.Response:
        return httpx.post(url, json=_json_body(x), timeout=60)

    with ThreadPoolExecutor(LIMIT + EXTRA) as pool:
        admitted = [pool.submit(post) for _ in range(LIMIT)]
        gate.wait_started(LIMIT)  # all four are running: the endpoint is full
        refused = [pool.submit(post).result(30) for _ in range(EXTRA)]
        assert gate.started == LIMIT  # none of the excess reached a thread
        gate.open.set()
        answered = [f.result(30) for f in admitted]
    for response in refused:
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "4 inference requests are already in flight" in response.json()["error"]
    for response in answered:
        assert response.status_code == 200
        logits = np.asarray(response.json()["outputs"][0]["data"], np.float32)
        np.testing.assert_allclose(logits, predict(registry[1][0], x).ravel(), rtol=1e-5)
    # the endpoint serves again once the burst is over
    assert post().status_code == 200


def test_grpc_answers_resource_exhausted_past_the_bound(
    endpoint: ServingEndpoint,
    registry: tuple[Path, list[nn.Module]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = Gate(monkeypatch)
    x = digits(1, seed=4)
    request = pb.ModelInferRequest(model_name="mnist")
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    with grpc.insecure_channel(endpoint.grpc_address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        admitted = [stub.ModelInfer.future(request, timeout=60) for _ in range(LIMIT)]
        gate.wait_started(2)  # the two workers are busy; two more calls wait in the queue
        time.sleep(0.2)
        refused = []
        for _ in range(EXTRA):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request, timeout=30)
            refused.append(err.value)
        assert gate.started == 2
        gate.open.set()
        answered = [f.result(30) for f in admitted]
        again = stub.ModelInfer(request, timeout=30)
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    expected = predict(registry[1][0], x)
    for response in [*answered, again]:
        logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(expected.shape)
        np.testing.assert_allclose(logits, expected, rtol=1e-5)


def test_the_bound_is_a_setting_with_a_default_that_queues_a_burst(tmp_path: Path) -> None:
    settings = EndpointSettings(registry=tmp_path)
    assert settings.max_inflight == 256  # 2000 requests at concurrency 200 all queue
    with pytest.raises(ConfigError, match="--max-inflight must be >= 1"):
        EndpointSettings(registry=tmp_path, max_inflight=0)
