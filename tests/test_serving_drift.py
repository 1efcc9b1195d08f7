"""The endpoint's drift monitor: a real endpoint on loopback fed held-out digits keeps its
drift score below the threshold; fed shifted digits it raises the score and the alert
past it (Prometheus gauges and ``/v2/models/{name}`` metadata); a version published
without a reference distribution reports drift as unavailable and serves as always."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from clients.tabular import build_model
from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.drift.reference import Reference, save_reference
from fedlearn.drift.stats import SummarySpec, summarize
from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.serving.drift import DriftMonitor, VersionDrift
from fedlearn.serving.endpoint import EndpointSettings, start_endpoint
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.oip.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

SPEC = SummarySpec(bins=8, low=0.0, high=1.0, features=64, classes=10)
THRESHOLD = 0.2
WINDOW = 300


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training inputs and labels (the reference) and held-out inputs, fixed seed."""
    data = partition_dataset(load_dataset("digits"), "iid", 1, seed=0).centralized()
    return data.x_train, data.y_train, data.x_test


def _publish(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    torch.manual_seed(0)
    arrays = model_to_arrays(build_model(64, 10, 16))
    signature = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    with ModelRegistry(root) as registry:
        for _ in range(2):  # v1 with a reference, v2 (published "before drift") without
            version = registry.publish(
                "digits",
                arrays,
                run="r",
                round=1,
                metrics={"accuracy": 0.5},
                client_summary=None,
                factory="clients.tabular:build_model",
                factory_params={"in_features": 64, "num_classes": 10, "hidden": 16},
                signature=signature,
            )
            if version.version == 1:
                save_reference(version.path, Reference(SPEC, summarize(x, y, SPEC)))
        registry.promote("digits", 1, None)


def _infer(url: str, x: np.ndarray, version: int = 1, batch: int = 60) -> None:
    for start in range(0, len(x), batch):
        rows = x[start : start + batch].astype(np.float32)
        body = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "data": rows.ravel().tolist(),
                }
            ]
        }
        path = f"/v2/models/digits/versions/{version}/infer"
        assert httpx.post(url + path, json=body, timeout=30).status_code == 200


def _gauges(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("fedlearn_serving_drift_"):
                out[(sample.name, sample.labels.get("version", ""))] = sample.value
    return out


def _metadata(url: str, version: int) -> dict[str, object]:
    response = httpx.get(url + f"/v2/models/digits/versions/{version}", timeout=10)
    assert response.status_code == 200
    drift = response.json()["drift"]
    assert isinstance(drift, dict)
    return drift


def test_shifted_inputs_raise_the_drift_score_past_the_threshold_in_distribution_stay_below(
    tmp_path: Path, digits: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    x_train, y_train, x_test = digits
    _publish(tmp_path, x_train, y_train)
    settings = EndpointSettings(
        tmp_path,
        http_port=0,
        grpc_port=0,
        poll_interval_s=3600,
        drift_threshold=THRESHOLD,
        drift_window=WINDOW,
        drift_rows=1000,  # count every row of these 60-row requests
    )
    with start_endpoint(settings) as ep:
        url = ep.http_url
        _infer(url, x_test)  # 359 held-out digits
        calm = _gauges(url)
        meta = _metadata(url, 1)
        assert calm[("fedlearn_serving_drift_available", "1")] == 1
        # every answered row is counted by the time the scores are read
        assert calm[("fedlearn_serving_drift_window_rows", "1")] == len(x_test)
        assert calm[("fedlearn_serving_drift_psi", "1")] < THRESHOLD
        assert calm[("fedlearn_serving_drift_alert", "1")] == 0
        assert calm[("fedlearn_serving_drift_threshold", "")] == THRESHOLD
        assert meta["available"] is True and meta["alert"] is False
        assert meta["psi"] == pytest.approx(calm[("fedlearn_serving_drift_psi", "1")])

        # the same digits, brighter by 0.3: the window (WINDOW rows and up) fills with them
        _infer(url, np.clip(x_test + 0.3, 0.0, 1.0))
        _infer(url, np.clip(x_test + 0.3, 0.0, 1.0))
        drifted = _gauges(url)
        assert drifted[("fedlearn_serving_drift_psi", "1")] > THRESHOLD
        assert drifted[("fedlearn_serving_drift_alert", "1")] == 1
        assert drifted[("fedlearn_serving_drift_ks_pvalue", "1")] < 1e-6
        assert (
            drifted[("fedlearn_serving_drift_ks_statistic", "1")]
            > (calm[("fedlearn_serving_drift_ks_statistic", "1")])
        )
        assert _metadata(url, 1)["alert"] is True

        # gRPC requests are counted too
        with grpc.insecure_channel(ep.grpc_address) as channel:
            request = pb.ModelInferRequest(model_name="digits", model_version="1")
            rows = x_test[:40].astype("<f4")
            request.inputs.add(name="input", datatype="FP32", shape=list(rows.shape))
            request.raw_input_contents.append(rows.tobytes())
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        # two generations: the previous one full (>= WINDOW rows), the current one filling
        rows = _gauges(url)[("fedlearn_serving_drift_window_rows", "1")]
        assert WINDOW <= rows <= 2 * len(x_test) + 40

        # a version without a reference: drift unavailable, requests answered as always
        _infer(url, x_test[:60], version=2)
        meta2 = _metadata(url, 2)
        assert meta2["available"] is False
        assert "without a training reference" in str(meta2["reason"])
        assert _gauges(url)[("fedlearn_serving_drift_available", "2")] == 0


def test_no_drift_means_no_drift_metrics(tmp_path: Path, digits: tuple[np.ndarray, ...]) -> None:
    _publish(tmp_path, digits[0], digits[1])
    settings = EndpointSettings(tmp_path, http_port=0, grpc_port=0, drift=False)
    with start_endpoint(settings) as ep:
        _infer(ep.http_url, digits[2][:60])
        assert _gauges(ep.http_url) == {}
        response = httpx.get(ep.http_url + "/v2/models/digits", timeout=10).json()
        assert "drift" not in response


def test_bad_drift_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        DriftMonitor(threshold=0)
    with pytest.raises(ConfigError, match="window"):
        DriftMonitor(window=0)


def test_large_batches_are_sampled_evenly(
    digits: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    x_train, y_train, x_test = digits
    reference = Reference(SPEC, summarize(x_train, y_train, SPEC))
    drift = VersionDrift(reference, window=1000, max_rows=8)
    batch = x_test[:60].astype(np.float32)
    drift.observe(batch, None)
    assert drift.scores(THRESHOLD, 0).rows == 8  # rows 0, 8, ..., 56
    expected = summarize(batch[::8], None, SPEC).hist
    drift.flush()
    counted = drift._current.hist.reshape(64, SPEC.bins + 2)
    assert counted.tolist() == expected.tolist()
