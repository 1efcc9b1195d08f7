"""Query a freshly published version over REST and gRPC and compare with in-process.

Used by ``fedlearn simulate`` (train -> publish -> serve -> predict in one command) and
by the end-to-end test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedlearn.registry.model_registry import ModelVersion
from fedlearn.serving.client import GrpcClient, RestClient
from fedlearn.serving.endpoint import ServingEndpoint


@dataclass(frozen=True)
class ServingCheck:
    """Predictions for the same inputs from REST, gRPC and the in-process model."""

    version: int
    served_version: int | None
    labels: np.ndarray
    in_process: np.ndarray
    rest: np.ndarray
    grpc: np.ndarray

    @property
    def max_abs_diff(self) -> float:
        """Largest difference between a served output and the in-process one."""
        return float(
            max(
                np.abs(self.rest - self.in_process).max(), np.abs(self.grpc - self.in_process).max()
            )
        )

    @property
    def same_predictions(self) -> bool:
        """Whether both protocols predict the in-process classes for every input."""
        want = self.in_process.argmax(axis=1)
        return bool(
            np.array_equal(self.rest.argmax(axis=1), want)
            and np.array_equal(self.grpc.argmax(axis=1), want)
        )


def check_served(
    endpoint: ServingEndpoint,
    version: ModelVersion,
    module: nn.Module,
    x: np.ndarray,
    labels: np.ndarray,
) -> ServingCheck:
    """Ask the endpoint for ``version``'s outputs on ``x`` both ways; ``module`` (the
    in-process model with the same weights) gives the reference."""
    name = version.signature["inputs"][0]["name"]
    output = version.signature["outputs"][0]["name"]
    module.eval()
    with torch.inference_mode():
        reference = module(torch.from_numpy(np.ascontiguousarray(x))).numpy()
    rest = RestClient(endpoint.http_url).infer(version.name, {name: x}, str(version.version))
    client = GrpcClient(endpoint.grpc_address)
    try:
        grpc_out = client.infer(version.name, {name: x}, str(version.version))
    finally:
        client.close()
    return ServingCheck(
        version=version.version,
        served_version=endpoint.repository.served().get(version.name),
        labels=labels,
        in_process=reference,
        rest=rest[output],
        grpc=grpc_out[output],
    )
