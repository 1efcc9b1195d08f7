"""Train -> publish -> ``fedlearn serve`` (a real process) -> infer over REST and gRPC."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deployment import free_port
from fedlearn.apps.torch_app import arrays_to_model, model_inputs
from fedlearn.config.simulation import load_config
from fedlearn.data import load_dataset, partition_dataset
from fedlearn.engine.weights import load_weights
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.run.job import run_job
from fedlearn.serving.client import GrpcClient, RestClient
from serving import predict

ROOT = Path(__file__).resolve().parents[1]


def _config(out: Path, seed: int, rounds: int):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        {
            "run.rounds": rounds,
            "run.clients": 6,
            "run.seed": seed,
            "run.out_dir": str(out),
            "client.params": {"epochs": 1, "batch_size": 32, "lr": 0.1},
            "strategy.params.min_train_clients": 3,
            "backend.kind": "inprocess",
            "publish.model": "mnist",
            "publish.registry": str(out.parent / "registry"),
            "publish.gate.tolerance": 1.0,  # let every version through: this test swaps
        },
    )


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}
    except OSError:
        return 0, {}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """A registry with one published run, and ``fedlearn serve`` watching it."""
    job = run_job(_config(tmp_path / "run1", seed=0, rounds=2))
    assert [p.decision.promoted for p in job.published] == [True]
    http, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedlearn.cli",
            "serve",
            "--registry",
            str(tmp_path / "registry"),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc_port),
            "--poll",
            "0.1",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while _get(url + "/v2/health/ready")[0] != 200:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "fedlearn serve did not become ready"
            time.sleep(0.1)
        yield tmp_path, url, f"127.0.0.1:{grpc_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    data = partition_dataset(load_dataset("mnist5k"), "dirichlet", 6, 0, alpha=0.5)
    client = data.client(0)
    return model_inputs(np.asarray(client.x_test[:n])).numpy(), np.asarray(client.y_test[:n])


def _module(weights: Path):  # type: ignore[no-untyped-def]
    from clients.mnist import build_model

    module = build_model()
    arrays_to_model(module, load_weights(weights))
    return module.eval()


def test_simulate_publish_serve_infer_matches_in_process(
    served: tuple[Path, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    root, url, grpc_address = served
    x, _ = _test_images(16)
    expected = predict(_module(root / "run1" / "model.safetensors"), x)

    status, meta = _get(url + "/v2/models/mnist")
    assert status == 200 and meta["versions"] == ["1"]
    rest = RestClient(url).infer("mnist", {"input": x})["logits"]
    client = GrpcClient(grpc_address)
    try:
        over_grpc = client.infer("mnist", {"input": x})["logits"]
    finally:
        client.close()
    for out in (rest, over_grpc):
        assert out.shape == (16, 10) and out.dtype == np.float32
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert np.array_equal(out.argmax(axis=1), expected.argmax(axis=1))

    # a second run publishes v2 into the registry the server watches: it swaps to it
    job = run_job(_config(root / "run2", seed=1, rounds=1))
    assert job.published[-1].decision.promoted
    expected2 = predict(_module(root / "run2" / "model.safetensors"), x)
    deadline = time.monotonic() + 30
    while RestClient(url).infer("mnist", {"input": x})["logits"].tobytes() == rest.tobytes():
        assert time.monotonic() < deadline, "the endpoint did not swap to v2"
        time.sleep(0.05)
    np.testing.assert_allclose(
        RestClient(url).infer("mnist", {"input": x})["logits"], expected2, rtol=1e-5, atol=1e-5
    )
    # both versions stay addressable
    np.testing.assert_allclose(
        RestClient(url).infer("mnist", {"input": x}, version="1")["logits"],
        expected,
        rtol=1e-5,
        atol=1e-5,
    )
    with ModelRegistry(root / "registry") as registry:
        assert registry.aliases("mnist")["production"] == 2
    metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    assert 'fedlearn_serving_model_version{model="mnist"} 2.0' in metrics
