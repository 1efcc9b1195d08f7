"""What a registry row can make ``fedlearn serve`` run, and what a failed load costs.

A row's ``factory`` is text anyone who can write ``registry.db`` controls. The endpoint
calls only registered model builders (``@fedlearn.model_builder``) from allowed modules,
never imports from the working directory on its own, remembers a version that failed to
load until the registry changes, and answers with a stable message that carries no server
path (the detail goes to the server log).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

import fedlearn.security.certs as certs
from deployment import free_port
from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.errors import ConfigError
from fedlearn.registry.builders import model_builder
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.serving.endpoint import EndpointSettings, ServingEndpoint, start_endpoint
from fedlearn.serving.models import ServedModel
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.oip.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from serving import MNIST_FACTORY, MNIST_SIGNATURE, digits, publish_mnist, seeded_model

ROOT = Path(__file__).resolve().parents[1]
NOT_LOADED = "could not be loaded; see the server log"
X = digits(2)


@contextmanager
def endpoint(root: Path, **settings: Any) -> Iterator[ServingEndpoint]:
    """A real endpoint (REST and gRPC on loopback) that never polls: refresh by hand."""
    ep = start_endpoint(
        EndpointSettings(root, http_port=0, grpc_port=0, poll_interval_s=3600, **settings)
    )
    try:
        yield ep
    finally:
        ep.close()


def rest_infer(ep: ServingEndpoint, model: str, version: str | None = None) -> httpx.Response:
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28]}]}
    body["inputs"][0]["data"] = X.ravel().tolist()
    return httpx.post(ep.http_url + path, json=body, timeout=30)


def grpc_infer(ep: ServingEndpoint, model: str, version: str = "") -> grpc.RpcError | None:
    """None when the call succeeds, else its error (code and details)."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
    request.raw_input_contents.append(X.astype("<f4").tobytes())
    with grpc.insecure_channel(ep.grpc_address) as channel:
        try:
            GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            return exc
    return None


def publish_row(root: Path, name: str, factory: str, **params: Any) -> int:
    """A row naming ``factory`` (MNIST weights and signature), promoted to production."""
    with ModelRegistry(root) as registry:
        version = registry.publish(
            name,
            model_to_arrays(seeded_model(0)),
            run="r",
            round=1,
            metrics={},
            client_summary=None,
            factory=factory,
            factory_params=params,
            signature=MNIST_SIGNATURE,
        )
        registry.promote(name, version.version, None)
    return version.version


# -- a registry row cannot choose what runs -----------------------------------------------


@pytest.mark.parametrize("allowed", [(), ("fedlearn.",)], ids=["default", "fedlearn-allowed"])
def test_a_side_effecting_factory_in_a_row_is_never_called(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allowed: tuple[str, ...]
) -> None:
    """The issue's case: ``fedlearn.security.certs:write_dev_pki`` in a row made every
    unauthenticated infer request write key files. Not even an operator who allows the
    whole ``fedlearn.`` package makes it callable: it is no registered model builder."""
    calls: list[tuple[Any, ...]] = []
    real = certs.write_dev_pki

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(certs, "write_dev_pki", spy)
    pki = tmp_path / "pki"
    root = tmp_path / "registry"
    publish_row(root, "evil", "fedlearn.security.certs:write_dev_pki", out_dir=str(pki))
    settings = {"allowed_factories": ("clients.", *allowed)} if allowed else {}
    with endpoint(root, **settings) as ep:
        assert calls == [] and not pki.exists()  # not at start
        answers = []
        for _ in range(3):
            for version in (None, "1"):
                answers.append(rest_infer(ep, "evil", version))
                error = grpc_infer(ep, "evil", version or "")
                assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
            ep.repository.refresh()
    assert calls == []  # nor on any request, nor when the watcher looks again
    assert not pki.exists()
    for answer in answers:
        assert answer.status_code == 503 and NOT_LOADED in answer.json()["error"], answer.text


def test_an_unregistered_callable_in_an_allowed_module_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``clients.mnist:make_app`` is a callable in an allowed module, but no model builder;
    ``clients.mnist:build_model`` is one."""
    import clients.mnist

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(clients.mnist, "make_app", lambda *a, **k: calls.append((a, k)))
    root = tmp_path / "registry"
    publish_row(root, "app", "clients.mnist:make_app", data="x")
    publish_row(root, "cnn", MNIST_FACTORY)
    with endpoint(root) as ep:
        assert rest_infer(ep, "app", "1").status_code == 503
        assert rest_infer(ep, "cnn").status_code == 200
        assert ep.repository.served() == {"cnn": 1}
    assert calls == []


def test_the_working_directory_is_not_searched_unless_asked(tmp_path: Path) -> None:
    """``fedlearn serve`` (the installed command) run from a directory holding a package an
    allowed prefix names does not import it; ``--path DIR`` makes DIR's packages importable."""
    cwd, lib = tmp_path / "cwd", tmp_path / "lib"
    for base, package in ((cwd, "shadowpkg"), (lib, "libpkg")):
        (base / package).mkdir(parents=True)
        (base / package / "__init__.py").write_text("")
        (base / package / "nets.py").write_text(
            "import pathlib\n"
            "pathlib.Path(__file__).with_name('imported').touch()\n"
            "from clients.mnist import build_model as _cnn\n"
            "from fedlearn import model_builder\n\n\n"
            "@model_builder\n"
            "def build():\n"
            "    return _cnn()\n"
        )
    root = tmp_path / "registry"
    publish_row(root, "shadow", "shadowpkg.nets:build")
    publish_row(root, "lib", "libpkg.nets:build")
    http, grpc_port = free_port(), free_port()
    command = [str(Path(sys.executable).with_name("fedlearn")), "serve", "--registry", str(root)]
    command += ["--http-port", str(http), "--grpc-port", str(grpc_port), "--poll", "3600"]
    command += ["--allow-factory", "shadowpkg.", "--allow-factory", "libpkg."]
    command += ["--path", str(lib), "--path", str(ROOT)]  # ROOT: clients.mnist, used by both
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "fedlearn serve did not start"
            try:
                if httpx.get(url + "/v2/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28]}]}
        body["inputs"][0]["data"] = X.ravel().tolist()
        served = httpx.post(url + "/v2/models/lib/infer", json=body, timeout=30)
        assert served.status_code == 200, served.text
        shadow = httpx.post(url + "/v2/models/shadow/infer", json=body, timeout=30)
        assert shadow.status_code == 503 and NOT_LOADED in shadow.json()["error"]
        assert str(tmp_path) not in shadow.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert (lib / "libpkg" / "imported").exists()
    assert not (cwd / "shadowpkg" / "imported").exists()


# -- failed loads are remembered ------------------------------------------------------------


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Counter[tuple[str, int]]:
    """How often each (model, version) was built from its registry row."""
    counted: Counter[tuple[str, int]] = Counter()
    real = ServedModel.load.__func__  # type: ignore[attr-defined]

    def load(cls: type[ServedModel], info: Any, *args: Any, **kwargs: Any) -> ServedModel:
        counted[(info.name, info.version)] += 1
        return real(cls, info, *args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(ServedModel, "load", classmethod(load))
    return counted


def publish_broken(root: Path, name: str) -> int:
    """A version whose weights do not fit what its factory builds, promoted by force."""
    with ModelRegistry(root) as registry:
        version = registry.publish(
            name,
            {"w": np.zeros(3, np.float32)},
            run="r",
            round=9,
            metrics={},
            client_summary=None,
            factory=MNIST_FACTORY,
            signature=MNIST_SIGNATURE,
        )
        registry.promote(name, version.version, None)
    return version.version


def test_a_failing_version_is_loaded_once_per_registry_change(
    tmp_path: Path, loads: Counter[tuple[str, int]]
) -> None:
    publish_mnist(tmp_path, seeds=(0,))
    with endpoint(tmp_path) as ep:
        assert publish_broken(tmp_path, "mnist") == 2  # production now names the broken v2
        assert ep.repository.refresh() == []
        assert loads[("mnist", 2)] == 1  # tried once; v1 keeps serving
        for _ in range(5):
            answer = rest_infer(ep, "mnist")
            assert answer.status_code == 200 and answer.json()["model_version"] == "1"
            assert rest_infer(ep, "mnist", "2").status_code == 503
            error = grpc_infer(ep, "mnist", "2")
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
            assert ep.repository.refresh() == []  # the watcher's polls: nothing changed
        assert loads[("mnist", 2)] == 1
        # any change to the registry: the failed version is tried once more, then remembered
        with ModelRegistry(tmp_path) as registry:
            registry.set_alias("mnist", "staging", 1)
        assert ep.repository.refresh() == []
        for _ in range(5):
            assert rest_infer(ep, "mnist", "2").status_code == 503
            ep.repository.refresh()
        assert loads[("mnist", 2)] == 2
        assert loads[("mnist", 1)] == 1


def test_an_unpromoted_failing_version_is_loaded_once_per_registry_change(
    tmp_path: Path, loads: Counter[tuple[str, int]]
) -> None:
    """A version nobody promoted loads on request (``/versions/N``): once, not per request."""
    with ModelRegistry(tmp_path) as registry:
        registry.publish(
            "draft",
            {"w": np.zeros(3, np.float32)},
            run="r",
            round=1,
            metrics={},
            client_summary=None,
            factory=MNIST_FACTORY,
            signature=MNIST_SIGNATURE,
        )
    with endpoint(tmp_path) as ep:
        for _ in range(5):
            assert rest_infer(ep, "draft", "1").status_code == 503
            assert httpx.get(ep.http_url + "/v2/models/draft/versions/1/ready").status_code == 503
        assert loads[("draft", 1)] == 1
        with ModelRegistry(tmp_path) as registry:
            registry.set_alias("draft", "staging", 1)
        ep.repository.refresh()
        for _ in range(3):
            assert rest_infer(ep, "draft", "1").status_code == 503
        assert loads[("draft", 1)] == 2


# -- error answers carry no server paths ----------------------------------------------------


def test_error_answers_carry_no_server_paths(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "registry"
    publish_mnist(root, seeds=(0, 1))
    with ModelRegistry(root) as registry:
        v2 = registry.get("mnist", 2)
        registry.rollback("mnist")  # production: v1; v2 stays addressable
    data = bytearray(v2.path.read_bytes())
    data[-1] ^= 0xFF
    v2.path.write_bytes(bytes(data))  # its sha256 no longer matches
    publish_row(root, "ghost", "clients.no_such_module:build")
    caplog.set_level(logging.INFO)
    with endpoint(root) as ep:
        answers = [
            rest_infer(ep, "mnist", "2"),
            httpx.get(ep.http_url + "/v2/models/mnist/versions/2"),
            rest_infer(ep, "ghost"),
            rest_infer(ep, "ghost", "1"),
            httpx.get(ep.http_url + "/v2/models/ghost"),
        ]
        texts = []
        for answer in answers:
            assert answer.status_code == 503, answer.text
            texts.append(answer.json()["error"])
        for model, version in (("mnist", "2"), ("ghost", ""), ("ghost", "1")):
            error = grpc_infer(ep, model, version)
            assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
            texts.append(error.details() or "")
        with grpc.insecure_channel(ep.grpc_address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                GRPCInferenceServiceStub(channel).ModelMetadata(
                    pb.ModelMetadataRequest(name="mnist", version="2"), timeout=30
                )
            texts.append(raised.value.details() or "")
    for text in texts:
        assert NOT_LOADED in text, text
        for leak in (str(tmp_path), str(root), ".safetensors", "Traceback", "sha256", "Error"):
            assert leak not in text, (leak, text)
    assert "model 'mnist' version 2 could not be loaded; see the server log" in texts[0]
    # the server log has the detail
    assert str(root) in caplog.text and "sha256" in caplog.text
    assert "no_such_module" in caplog.text


# -- the builder registry ------------------------------------------------------------------


def test_model_builder_registers_functions_and_classes_unchanged() -> None:
    import clients.mnist
    import clients.shakespeare
    import clients.tabular
    import fedlearn
    from fedlearn.registry.builders import find_builder, is_registered, registered_builders

    assert fedlearn.model_builder is model_builder
    for build in (clients.mnist.build_model, clients.tabular.build_model):
        assert is_registered(build)
    assert is_registered(clients.shakespeare.CharGRU)
    assert not is_registered(clients.mnist.make_app)
    assert registered_builders()[MNIST_FACTORY] is clients.mnist.build_model
    assert find_builder(MNIST_FACTORY) is clients.mnist.build_model

    def nested() -> None: ...

    with pytest.raises(ConfigError, match="module-level function or class"):
        model_builder(nested)
    with pytest.raises(ConfigError, match="module-level function or class"):
        model_builder(lambda: None)
    with pytest.raises(ConfigError, match=r"cannot import module 'clients.nope'.*--path DIR"):
        find_builder("clients.nope:build")
    with pytest.raises(ConfigError, match="not under an allowed prefix"):
        find_builder("os:system")
    with pytest.raises(ConfigError, match=r"decorate make_app in clients\.mnist with @fedlearn"):
        find_builder("clients.mnist:make_app")


def test_path_option_puts_directories_first_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlearn.registry.builders import add_import_paths

    monkeypatch.setattr(sys, "path", list(sys.path))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert add_import_paths([a, b]) == [str(a), str(b)]
    assert sys.path[:2] == [str(a), str(b)]
    add_import_paths([b])  # once each: moved to the front, not repeated
    assert sys.path[:2] == [str(b), str(a)] and sys.path.count(str(b)) == 1
    with pytest.raises(ConfigError, match=r"--path .*nope: no such directory"):
        add_import_paths([tmp_path / "nope"])
