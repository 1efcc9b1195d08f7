"""Serving published models over the Open Inference Protocol v2 (REST and gRPC).

Names are imported on first use, so ``fedlearn.registry.spec`` (used when publishing from a
coordinator) does not pull torch or the web stack into processes that never serve.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DATATYPES": "fedlearn.registry.spec",
    "Signature": "fedlearn.serving.tensors",
    "TensorSpec": "fedlearn.serving.tensors",
    "ServedModel": "fedlearn.serving.models",
    "build_module": "fedlearn.serving.models",
    "ModelRepository": "fedlearn.serving.repository",
    "RepositorySettings": "fedlearn.serving.repository",
    "open_repository": "fedlearn.serving.repository",
    "EndpointSettings": "fedlearn.serving.endpoint",
    "ServingEndpoint": "fedlearn.serving.endpoint",
    "start_endpoint": "fedlearn.serving.endpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedlearn.serving' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
