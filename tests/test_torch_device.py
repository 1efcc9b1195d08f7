"""TorchClientApp on another device: clear errors without CUDA; close to the CPU with it.

The CUDA tests run where a GPU is present (``benchmarks/gpu_check.py`` runs them and a
short federated run on the device machine); elsewhere they are skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients import mnist
from fedlearn.data import FederatedDataset, load_dataset, partition_dataset
from fedlearn.engine.client_app import ClientContext
from fedlearn.errors import ConfigError

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def data() -> FederatedDataset:
    return partition_dataset(load_dataset("mnist5k"), "iid", 10, seed=0)


def ctx(cid: int = 0) -> ClientContext:
    return ClientContext(client_id=cid, round=1, seed=7)


def test_a_bad_device_is_a_config_error(data: FederatedDataset) -> None:
    with pytest.raises(ConfigError, match="not a torch device"):
        mnist.make_app(data, device="gpu0")


@pytest.mark.skipif(CUDA, reason="checks the error raised without CUDA")
def test_cuda_without_cuda_fails_the_task_clearly(data: FederatedDataset) -> None:
    app = mnist.make_app(data, device="cuda")  # building it does not touch CUDA
    arrays = app.initial_arrays(0)
    assert app.serving_spec().factory == "clients.mnist:build_model"
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        app.train(arrays, {}, ctx())


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_training_is_close_to_cpu(data: FederatedDataset) -> None:
    cpu = mnist.make_app(data, epochs=1, lr=0.05)
    gpu = mnist.make_app(data, epochs=1, lr=0.05, device="cuda")
    assert not gpu._placed  # nothing moved before the first task
    start = cpu.initial_arrays(0)
    a = cpu.train(start, {}, ctx())
    b = gpu.train(start, {}, ctx())
    assert next(gpu.model.parameters()).is_cuda
    assert list(a.arrays) == list(b.arrays)
    for name in a.arrays:
        assert b.arrays[name].dtype == a.arrays[name].dtype
        np.testing.assert_allclose(b.arrays[name], a.arrays[name], atol=2e-3, err_msg=name)
    assert a.num_examples == b.num_examples
    ea = cpu.evaluate(a.arrays, {}, ctx())
    eb = gpu.evaluate(a.arrays, {}, ctx())
    assert eb.loss == pytest.approx(ea.loss, rel=1e-4)
    assert eb.metrics["accuracy"] == pytest.approx(ea.metrics["accuracy"], abs=0.01)
