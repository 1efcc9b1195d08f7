"""The serving endpoint's ``/metrics``: every exported counter moves with the traffic it
counts (scraped over HTTP before and after requests on both protocols and a hot swap)."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.serving.endpoint import EndpointSettings, start_endpoint
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.oip.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from serving import digits, publish_mnist

Sample = tuple[str, tuple[tuple[str, str], ...]]
X = digits(2)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28]}]}
BODY["inputs"][0]["data"] = X.ravel().tolist()
BAD = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]}


def scrape(url: str) -> tuple[dict[Sample, float], dict[str, str]]:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    samples: dict[Sample, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            types[sample.name] = family.type
    return samples, types


def traffic(url: str, stub: GRPCInferenceServiceStub) -> None:
    """One good and one bad infer request per protocol, and a 404 on REST."""
    assert httpx.post(url + "/v2/models/mnist/infer", json=BODY, timeout=30).status_code == 200
    assert httpx.post(url + "/v2/models/mnist/infer", json=BAD, timeout=30).status_code == 400
    assert httpx.get(url + "/v2/models/nope", timeout=30).status_code == 404
    request = pb.ModelInferRequest(model_name="mnist")
    request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.astype("<f4").tobytes())
    stub.ModelInfer(request, timeout=30)
    bad = pb.ModelInferRequest(model_name="mnist")
    bad.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    bad.raw_input_contents.append(b"\0" * 4 * 784)
    try:
        stub.ModelInfer(bad, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        raise AssertionError("a bad request was answered")


def test_every_serving_counter_moves_with_requests_and_swaps(tmp_path: Path) -> None:
    publish_mnist(tmp_path, seeds=(0, 1))
    settings = EndpointSettings(tmp_path, http_port=0, grpc_port=0, poll_interval_s=3600)
    with start_endpoint(settings) as ep, grpc.insecure_channel(ep.grpc_address) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with ModelRegistry(tmp_path) as registry:  # a swap before: its series exist
            registry.rollback("mnist")
            ep.repository.refresh()
            traffic(ep.http_url, stub)  # every labelled series exists from here on
            before, _ = scrape(ep.http_url)
            traffic(ep.http_url, stub)
            registry.promote("mnist", 2, None)
            assert ep.repository.refresh() == [("mnist", 1, 2)]
        after, types = scrape(ep.http_url)
    counted = [
        key
        for key in after
        if not key[0].endswith("_created")
        and (
            types[key[0]] == "counter"
            or (
                types[key[0]] == "histogram"
                and (key[0].endswith(("_count", "_sum")) or dict(key[1]).get("le") == "+Inf")
            )
        )
    ]
    still = [key for key in counted if after[key] <= before.get(key, 0.0)]
    assert still == [], f"serving counters that did not move: {still}"
    moved = {name for name, _ in counted}
    assert moved >= {
        "fedlearn_serving_requests_total",
        "fedlearn_serving_request_seconds_count",
        "fedlearn_serving_errors_total",
        "fedlearn_serving_swaps_total",
    }
    # what moved, by how much: 2 good and 2 bad infers (1 each per protocol), a 404
    labels = {"model": "mnist"}
    for protocol in ("rest", "grpc"):
        for outcome in ("ok", "error"):
            key = (
                "fedlearn_serving_requests_total",
                tuple(sorted({**labels, "protocol": protocol, "outcome": outcome}.items())),
            )
            assert after[key] - before[key] == 1, key
    errors = "fedlearn_serving_errors_total"
    assert after[(errors, (("code", "400"), ("protocol", "rest")))] == 2
    assert after[(errors, (("code", "404"), ("protocol", "rest")))] == 2
    assert after[(errors, (("code", "INVALID_ARGUMENT"), ("protocol", "grpc")))] == 2
    assert after[("fedlearn_serving_swaps_total", (("model", "mnist"),))] == 2
    # the one gauge follows the swap
    assert before[("fedlearn_serving_model_version", (("model", "mnist"),))] == 1
    assert after[("fedlearn_serving_model_version", (("model", "mnist"),))] == 2
