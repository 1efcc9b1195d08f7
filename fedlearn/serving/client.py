"""Minimal Open Inference Protocol v2 clients (REST and gRPC) for checks and benchmarks.

Applications can use any OIP v2 client (tritonclient, KServe's); these two exist so that
``fedlearn simulate`` can query the model it just published without extra dependencies.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping

import grpc
import numpy as np

from fedlearn.errors import InferenceError
from fedlearn.registry.spec import datatype_of
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.oip import grpc_predict_v2_pb2_grpc as pb_grpc
from fedlearn.serving.tensors import array_from_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"


class RestClient:
    """``POST /v2/models/{name}[/versions/{v}]/infer`` with binary tensors both ways."""

    def __init__(self, url: str, timeout_s: float = 30.0, ca: bytes | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.context = None if ca is None else ssl.create_default_context(cadata=ca.decode())

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], version: str | None = None
    ) -> dict[str, np.ndarray]:
        """The model's outputs for ``inputs``; InferenceError carries the server's message."""
        arrays = {name: np.ascontiguousarray(a) for name, a in inputs.items()}
        header = {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype_of(a),
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for name, a in arrays.items()
            ],
            "parameters": {"binary_data_output": True},
        }
        head = json.dumps(header).encode()
        body = head + b"".join(a.tobytes() for a in arrays.values())
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        request = urllib.request.Request(
            self.url + path,
            data=body,
            method="POST",
            headers={"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as r:
                data = r.read()
                length = r.headers.get(HEADER_LENGTH)
        except urllib.error.HTTPError as exc:
            raise InferenceError(
                f"HTTP {exc.code}: {exc.read().decode(errors='replace')}"
            ) from None
        split = len(data) if length is None else int(length)
        response = json.loads(data[:split])
        out: dict[str, np.ndarray] = {}
        offset = split
        for tensor in response["outputs"]:
            size = tensor.get("parameters", {}).get("binary_data_size")
            if size is None:
                out[tensor["name"]] = np.asarray(tensor["data"]).reshape(tensor["shape"])
                continue
            raw = data[offset : offset + size]
            offset += size
            out[tensor["name"]] = array_from_bytes(raw, tensor["datatype"], tensor["shape"])
        return out


class GrpcClient:
    """``inference.GRPCInferenceService/ModelInfer`` with raw tensor contents."""

    def __init__(
        self,
        address: str,
        timeout_s: float = 30.0,
        ca: bytes | None = None,
        host: str | None = None,
    ) -> None:
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", 64 << 20)]
        if host is not None:
            options.append(("grpc.ssl_target_name_override", host))
        if ca is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=ca)
            self.channel = grpc.secure_channel(address, creds, options=options)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s

    def infer(
        self, model: str, inputs: Mapping[str, np.ndarray], version: str | None = None
    ) -> dict[str, np.ndarray]:
        """The model's outputs for ``inputs``; InferenceError carries the status and message."""
        request = pb.ModelInferRequest(model_name=model, model_version=version or "")
        for name, array in inputs.items():
            a = np.ascontiguousarray(array)
            request.inputs.add(name=name, datatype=datatype_of(a), shape=list(a.shape))
            request.raw_input_contents.append(a.tobytes())
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            raise InferenceError(f"{exc.code().name}: {exc.details()}") from None
        return {
            t.name: array_from_bytes(raw, t.datatype, list(t.shape))
            for t, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()
