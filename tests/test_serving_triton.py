"""Interoperability: tritonclient (HTTP JSON, HTTP binary, gRPC) against ``fedlearn serve``.

tritonclient pins protobuf < 7 and registers the same ``inference.*`` message names as
our generated code, so it runs from its own venv (``.venv-triton``, made by
``scripts/setup.sh test``) in a subprocess: ``tests/oip/triton_probe.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from fedlearn.serving.endpoint import EndpointSettings, start_endpoint
from serving import digits, predict, publish_mnist

ROOT = Path(__file__).resolve().parents[1]
TRITON_PYTHON = Path(os.environ.get("FEDLEARN_TRITON_PYTHON", ROOT / ".venv-triton/bin/python"))


def test_tritonclient_speaks_to_the_endpoint_unchanged(tmp_path: Path) -> None:
    assert TRITON_PYTHON.exists(), (
        f"{TRITON_PYTHON} is missing: `bash scripts/setup.sh test` creates the tritonclient venv"
    )
    modules = publish_mnist(tmp_path / "registry", seeds=(0, 1))
    x = digits(6)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    out.mkdir()
    settings = EndpointSettings(registry=tmp_path / "registry", http_port=0, grpc_port=0)
    with start_endpoint(settings) as endpoint:
        proc = subprocess.run(
            [
                str(TRITON_PYTHON),
                str(ROOT / "tests/oip/triton_probe.py"),
                endpoint.http_url,
                endpoint.grpc_address,
                str(tmp_path / "x.npy"),
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    v1, v2 = (predict(m, x) for m in modules)
    for case in ("http_json", "http_binary", "grpc"):
        got = np.load(out / f"{case}.npy")
        assert got.dtype == np.float32 and got.shape == (6, 10), case
        np.testing.assert_allclose(got, v2, rtol=1e-6, atol=1e-6, err_msg=case)
    for case in ("http_v1", "grpc_v1"):
        np.testing.assert_allclose(np.load(out / f"{case}.npy"), v1, rtol=1e-6, atol=1e-6)
    report = json.loads((out / "report.json").read_text())
    for key in ("http_live", "http_ready", "http_model_ready", "grpc_live", "grpc_ready"):
        assert report[key] is True, key
    assert report["grpc_model_ready"] is True
    assert report["http_model"]["name"] == "mnist"
    assert report["http_model"]["versions"] == ["1", "2"]
    assert report["http_model"]["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    ]
    assert report["grpc_model"]["outputs"][0]["shape"] == ["-1", "10"]  # int64 as JSON strings
    assert report["grpc_request_id"] == "r-7"
    errors = report["errors"]
    assert errors["http_unknown_model"] == "404 unknown model 'nope'"
    assert errors["http_bad_shape"].startswith("400 input 'input': shape [1, 28, 28]")
    assert "StatusCode.NOT_FOUND" in errors["grpc_unknown_model"]
    assert "StatusCode.INVALID_ARGUMENT" in errors["grpc_bad_dtype"]
    assert "FP64" in errors["grpc_bad_dtype"]
