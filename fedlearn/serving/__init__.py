"""Serving published models over the Open Inference Protocol v2 (REST and gRPC)."""

from fedlearn.serving.models import ServedModel, build_module
from fedlearn.serving.repository import ModelRepository, RepositorySettings, open_repository
from fedlearn.serving.tensors import DATATYPES, Signature, TensorSpec

__all__ = [
    "DATATYPES",
    "ModelRepository",
    "RepositorySettings",
    "ServedModel",
    "Signature",
    "TensorSpec",
    "build_module",
    "open_repository",
]
