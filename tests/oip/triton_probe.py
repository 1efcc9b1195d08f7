"""Drive a fedlearn OIP v2 endpoint with tritonclient, unchanged (runs in its own venv).

Usage: python triton_probe.py HTTP_URL GRPC_ADDRESS INPUT.npy OUT_DIR

Writes one ``<case>.npy`` per inference case and ``report.json`` with health, metadata
and the error messages of deliberately bad requests. Imports nothing from fedlearn.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


def main() -> None:
    http_url, grpc_address, input_path, out = sys.argv[1:5]
    out_dir = Path(out)
    x = np.load(input_path)
    report: dict[str, object] = {}
    http = httpclient.InferenceServerClient(http_url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(grpc_address)

    report["http_live"] = http.is_server_live()
    report["http_ready"] = http.is_server_ready()
    report["http_model_ready"] = http.is_model_ready("mnist")
    report["http_server"] = http.get_server_metadata()
    report["http_model"] = http.get_model_metadata("mnist")
    report["grpc_live"] = grpc.is_server_live()
    report["grpc_ready"] = grpc.is_server_ready()
    report["grpc_model_ready"] = grpc.is_model_ready("mnist")
    report["grpc_model"] = grpc.get_model_metadata("mnist", as_json=True)
    report["grpc_server"] = grpc.get_server_metadata(as_json=True)

    for binary in (False, True):
        tensor = httpclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        wanted = httpclient.InferRequestedOutput("logits", binary_data=binary)
        result = http.infer("mnist", [tensor], outputs=[wanted])
        np.save(out_dir / f"http_{'binary' if binary else 'json'}.npy", result.as_numpy("logits"))
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = http.infer("mnist", [tensor], model_version="1")
    np.save(out_dir / "http_v1.npy", result.as_numpy("logits"))

    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = grpc.infer("mnist", [tensor], outputs=[grpcclient.InferRequestedOutput("logits")])
    np.save(out_dir / "grpc.npy", result.as_numpy("logits"))
    result = grpc.infer("mnist", [tensor], model_version="1", request_id="r-7")
    np.save(out_dir / "grpc_v1.npy", result.as_numpy("logits"))
    report["grpc_request_id"] = result.get_response(as_json=True).get("id")

    errors: dict[str, str] = {}
    bad = httpclient.InferInput("input", [1, 28, 28], "FP32")
    bad.set_data_from_numpy(x[0])
    for label, call in (
        ("http_unknown_model", lambda: http.infer("nope", [tensor_http(x)])),
        ("http_bad_shape", lambda: http.infer("mnist", [bad])),
        ("grpc_unknown_model", lambda: grpc.infer("nope", [tensor])),
        ("grpc_bad_dtype", lambda: grpc.infer("mnist", [tensor_grpc_fp64(x)])),
    ):
        try:
            call()
            errors[label] = "no error"
        except InferenceServerException as exc:
            errors[label] = f"{exc.status()} {exc.message()}"
    report["errors"] = errors
    (out_dir / "report.json").write_text(json.dumps(report, default=str))
    http.close()
    grpc.close()


def tensor_http(x: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def tensor_grpc_fp64(x: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x.astype(np.float64))
    return tensor


if __name__ == "__main__":
    main()
