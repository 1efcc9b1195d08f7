"""The Open Inference Protocol v2 gRPC endpoint, over a real server on loopback.

Requests go through the generated stub (as a standard client's would): health and
metadata, raw and typed inference checked against the in-process model, explicit
versions, every kind of bad request mapped to its status code, and a fuzz run of
malformed requests and plain garbage bytes that must never yield INTERNAL or UNKNOWN.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.errors import ModelNotFound
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.serving.grpc_service import decode_inputs, encode_outputs, start_grpc_server
from fedlearn.serving.metrics import ServingMetrics
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.oip.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from fedlearn.serving.repository import ModelRepository, open_repository
from serving import MNIST_FACTORY, MNIST_SIGNATURE, digits, predict, publish_mnist, seeded_model

Code = grpc.StatusCode
METHOD = "/inference.GRPCInferenceService/"


class Endpoint:
    """A started server over one repository, and a stub connected to it."""

    def __init__(self, repository: Any, **options: Any) -> None:
        self.metrics = ServingMetrics()
        self.server, self.port = start_grpc_server(repository, self.metrics, **options)
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{self.port}",
            options=[("grpc.max_send_message_length", 256 * 2**20)],
        )
        self.stub = GRPCInferenceServiceStub(self.channel)

    def raw_call(self, method: str, data: bytes) -> Any:
        """Send ``data`` as the serialized request of ``method``; returns the reply bytes."""
        call = self.channel.unary_unary(METHOD + method)  # no (de)serializers: bytes as-is
        return call(data, timeout=10)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()

    def sample(self, name: str, labels: dict[str, str]) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def mnist(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ModelRepository, list[nn.Module]]]:
    """``mnist`` v1 (seed 0) and v2 (seed 1, production)."""
    root = tmp_path_factory.mktemp("registry")
    modules = publish_mnist(root, seeds=(0, 1))
    repository = open_repository(root)
    yield repository, modules
    repository.close()


@pytest.fixture(scope="module")
def endpoint(mnist: tuple[ModelRepository, list[nn.Module]]) -> Iterator[Endpoint]:
    ep = Endpoint(mnist[0])
    yield ep
    ep.close()


@pytest.fixture(scope="module")
def modules(mnist: tuple[ModelRepository, list[nn.Module]]) -> list[nn.Module]:
    return mnist[1]


def raw_request(x: np.ndarray, **fields: Any) -> pb.ModelInferRequest:
    """An FP32 ``input`` sent as raw_input_contents (how tritonclient sends tensors)."""
    request = pb.ModelInferRequest(**{"model_name": "mnist", **fields})
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


def typed_request(x: np.ndarray, **fields: Any) -> pb.ModelInferRequest:
    """An FP32 ``input`` sent as typed fp32_contents."""
    request = pb.ModelInferRequest(**{"model_name": "mnist", **fields})
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


def raw_logits(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("logits", "FP32")
    assert len(response.raw_output_contents) == 1
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(tuple(output.shape))


def assert_serves(endpoint: Endpoint, modules: list[nn.Module]) -> None:
    """A good request right after: the endpoint still answers, correctly."""
    x = digits(2, seed=7)
    response = endpoint.stub.ModelInfer(raw_request(x), timeout=10)
    np.testing.assert_allclose(raw_logits(response), predict(modules[1], x), rtol=1e-6)


# -- health and metadata ----------------------------------------------------------------


def test_live_ready_and_server_metadata(endpoint: Endpoint) -> None:
    assert endpoint.stub.ServerLive(pb.ServerLiveRequest()).live
    assert endpoint.stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = endpoint.stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "fedlearn"
    assert meta.version
    assert list(meta.extensions) == []


def test_model_ready(endpoint: Endpoint) -> None:
    assert endpoint.stub.ModelReady(pb.ModelReadyRequest(name="mnist")).ready
    assert endpoint.stub.ModelReady(pb.ModelReadyRequest(name="mnist", version="1")).ready
    for request in (
        pb.ModelReadyRequest(name="nope"),
        pb.ModelReadyRequest(name="mnist", version="9"),
        pb.ModelReadyRequest(name="mnist", version="²"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            endpoint.stub.ModelReady(request)
        assert err.value.code() == Code.NOT_FOUND


def test_model_metadata(endpoint: Endpoint) -> None:
    meta = endpoint.stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
    assert meta.name == "mnist"
    assert list(meta.versions) == ["1", "2"]
    assert meta.platform == "pytorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, 1, 28, 28])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("logits", "FP32", [-1, 10])
    ]
    assert endpoint.stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist", version="1")).name
    with pytest.raises(grpc.RpcError) as err:
        endpoint.stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert err.value.code() == Code.NOT_FOUND
    assert "unknown model 'nope'" in err.value.details()


# -- inference ------------------------------------------------------------------------


def test_infer_raw_matches_in_process_model(endpoint: Endpoint, modules: list[nn.Module]) -> None:
    x = digits(5)
    response = endpoint.stub.ModelInfer(raw_request(x, id="req-42"))
    assert (response.model_name, response.model_version, response.id) == ("mnist", "2", "req-42")
    assert list(response.outputs[0].shape) == [5, 10]
    assert not response.outputs[0].contents.ListFields()  # raw in, raw out
    np.testing.assert_allclose(raw_logits(response), predict(modules[1], x), rtol=1e-6)


def test_infer_typed_contents(endpoint: Endpoint, modules: list[nn.Module]) -> None:
    x = digits(3, seed=1)
    response = endpoint.stub.ModelInfer(typed_request(x))
    assert not response.raw_output_contents  # typed in, typed out
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("logits", "FP32", [3, 10])
    got = np.array(output.contents.fp32_contents, dtype=np.float32).reshape(3, 10)
    np.testing.assert_allclose(got, predict(modules[1], x), rtol=1e-6)


def test_explicit_versions(endpoint: Endpoint, modules: list[nn.Module]) -> None:
    x = digits(4, seed=2)
    for version, module in (("1", modules[0]), ("2", modules[1])):
        response = endpoint.stub.ModelInfer(raw_request(x, model_version=version))
        assert response.model_version == version
        np.testing.assert_allclose(raw_logits(response), predict(module, x), rtol=1e-6)
    assert not np.allclose(predict(modules[0], x), predict(modules[1], x))


def test_requested_outputs(endpoint: Endpoint, modules: list[nn.Module]) -> None:
    x = digits(1)
    request = raw_request(x)
    request.outputs.add(name="logits")
    np.testing.assert_allclose(
        raw_logits(endpoint.stub.ModelInfer(request)), predict(modules[1], x), rtol=1e-6
    )


def test_metrics_count_requests_and_errors(endpoint: Endpoint) -> None:
    ok = {"protocol": "grpc", "model": "mnist", "outcome": "ok"}
    bad = {"protocol": "grpc", "code": "NOT_FOUND"}
    before_ok = endpoint.sample("fedlearn_serving_requests_total", ok)
    before_bad = endpoint.sample("fedlearn_serving_errors_total", bad)
    endpoint.stub.ModelInfer(raw_request(digits(1)))
    with pytest.raises(grpc.RpcError):
        endpoint.stub.ModelInfer(raw_request(digits(1), model_name="nope"))
    assert endpoint.sample("fedlearn_serving_requests_total", ok) == before_ok + 1
    assert endpoint.sample("fedlearn_serving_errors_total", bad) == before_bad + 1


# -- bad requests -----------------------------------------------------------------------


def _edit(**fields: Any) -> Callable[[pb.ModelInferRequest], None]:
    def apply(request: pb.ModelInferRequest) -> None:
        for key, value in fields.items():
            setattr(request, key, value)

    return apply


def _input(**fields: Any) -> Callable[[pb.ModelInferRequest], None]:
    def apply(request: pb.ModelInferRequest) -> None:
        tensor = request.inputs[0]
        for key, value in fields.items():
            if key == "shape":
                del tensor.shape[:]
                tensor.shape.extend(value)
            else:
                setattr(tensor, key, value)

    return apply


def _raw(*chunks: bytes) -> Callable[[pb.ModelInferRequest], None]:
    def apply(request: pb.ModelInferRequest) -> None:
        del request.raw_input_contents[:]
        request.raw_input_contents.extend(chunks)

    return apply


def _duplicate_input(request: pb.ModelInferRequest) -> None:
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])


def _mix_typed(request: pb.ModelInferRequest) -> None:
    request.inputs[0].contents.fp32_contents.append(1.0)


def _empty_batch(request: pb.ModelInferRequest) -> None:
    _input(shape=[0, 1, 28, 28])(request)
    _raw(b"")(request)


def _no_inputs(request: pb.ModelInferRequest) -> None:
    del request.inputs[:]
    del request.raw_input_contents[:]


def _outputs(*names: str) -> Callable[[pb.ModelInferRequest], None]:
    def apply(request: pb.ModelInferRequest) -> None:
        for name in names:
            request.outputs.add(name=name)

    return apply


def _typed(datatype: str, field: str, values: list[Any], shape: list[int]) -> Callable[..., None]:
    def apply(request: pb.ModelInferRequest) -> None:
        del request.raw_input_contents[:]
        tensor = request.inputs[0]
        tensor.datatype = datatype
        del tensor.shape[:]
        tensor.shape.extend(shape)
        getattr(tensor.contents, field).extend(values)

    return apply


X = digits(2, seed=3)
RAW = X.astype("<f4").tobytes()

BAD_REQUESTS: list[tuple[str, Callable[[pb.ModelInferRequest], None], grpc.StatusCode, str]] = [
    ("unknown model", _edit(model_name="nope"), Code.NOT_FOUND, "unknown model 'nope'"),
    ("empty model name", _edit(model_name=""), Code.NOT_FOUND, "unknown model ''"),
    ("unknown version", _edit(model_version="9"), Code.NOT_FOUND, "has no version 9"),
    ("version not a number", _edit(model_version="v1"), Code.NOT_FOUND, "positive integer"),
    ("unicode digit version", _edit(model_version="²"), Code.NOT_FOUND, "positive integer"),
    ("unknown datatype", _input(datatype="FP8"), Code.INVALID_ARGUMENT, "unsupported datatype"),
    ("BYTES datatype", _input(datatype="BYTES"), Code.INVALID_ARGUMENT, "unsupported datatype"),
    (
        "wrong datatype",
        _input(datatype="INT32"),
        Code.INVALID_ARGUMENT,
        "datatype INT32, expected FP32",
    ),
    (
        "shape not in signature",
        _input(shape=[2, 28, 28, 1]),
        Code.INVALID_ARGUMENT,
        "expected [-1, 1, 28, 28]",
    ),
    ("raw size lies", _input(shape=[3, 1, 28, 28]), Code.INVALID_ARGUMENT, "raw data holds"),
    ("raw bytes short", _raw(RAW[:-1]), Code.INVALID_ARGUMENT, "raw data holds"),
    ("raw entries > inputs", _raw(RAW, RAW), Code.INVALID_ARGUMENT, "2 entries for 1 inputs"),
    ("mixing raw and typed", _mix_typed, Code.INVALID_ARGUMENT, "use one form"),
    ("duplicate input", _duplicate_input, Code.INVALID_ARGUMENT, "duplicate input 'input'"),
    ("no inputs", _no_inputs, Code.INVALID_ARGUMENT, "missing input 'input'"),
    ("unknown input", _input(name="image"), Code.INVALID_ARGUMENT, "unknown input 'image'"),
    ("negative dimension", _input(shape=[-1, 1, 28, 28]), Code.INVALID_ARGUMENT, "negative"),
    ("huge shape", _input(shape=[0, 2**62, 2**62]), Code.INVALID_ARGUMENT, "too large"),
    ("empty batch", _empty_batch, Code.INVALID_ARGUMENT, "empty batch"),
    ("unknown output", _outputs("probs"), Code.INVALID_ARGUMENT, "unknown output 'probs'"),
    ("duplicate output", _outputs("logits", "logits"), Code.INVALID_ARGUMENT, "requested twice"),
    (
        "typed count mismatch",
        _typed("FP32", "fp32_contents", [0.5] * 10, [2, 1, 28, 28]),
        Code.INVALID_ARGUMENT,
        "fp32_contents holds 10 elements",
    ),
    (
        "typed wrong field",
        _typed("FP32", "int_contents", [1] * 784, [1, 1, 28, 28]),
        Code.INVALID_ARGUMENT,
        "belongs in fp32_contents",
    ),
    (
        "typed FP16",
        _typed("FP16", "fp32_contents", [0.5] * 784, [1, 1, 28, 28]),
        Code.INVALID_ARGUMENT,
        "must be sent in raw_input_contents",
    ),
    (
        "typed out of range",
        _typed("INT8", "int_contents", [300], [1]),
        Code.INVALID_ARGUMENT,
        "do not fit INT8",
    ),
]


@pytest.mark.parametrize(
    ("edit", "code", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request(
    endpoint: Endpoint,
    modules: list[nn.Module],
    edit: Callable[[pb.ModelInferRequest], None],
    code: grpc.StatusCode,
    message: str,
) -> None:
    request = raw_request(X)
    edit(request)
    with pytest.raises(grpc.RpcError) as err:
        endpoint.stub.ModelInfer(request, timeout=10)
    assert err.value.code() == code, err.value.details()
    assert message in err.value.details()
    assert endpoint.sample("fedlearn_serving_errors_total", {"protocol": "grpc", "code": code.name})
    assert_serves(endpoint, modules)


def test_garbage_bytes_are_invalid_argument(endpoint: Endpoint, modules: list[nn.Module]) -> None:
    with pytest.raises(grpc.RpcError) as err:
        endpoint.raw_call("ModelInfer", b"\xff\xff\xff")
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "not a valid inference.ModelInferRequest" in err.value.details()
    assert_serves(endpoint, modules)


def test_unimplemented_triton_rpc(endpoint: Endpoint) -> None:
    with pytest.raises(grpc.RpcError) as err:
        endpoint.raw_call("RepositoryIndex", b"")
    assert err.value.code() == Code.UNIMPLEMENTED


def test_oversize_message(mnist: tuple[ModelRepository, list[nn.Module]]) -> None:
    small = Endpoint(mnist[0], max_message_bytes=64 * 1024)
    try:
        with pytest.raises(grpc.RpcError) as err:
            small.stub.ModelInfer(raw_request(digits(64)), timeout=10)  # ~200 KB
        assert err.value.code() == Code.RESOURCE_EXHAUSTED
        x = digits(2)
        response = small.stub.ModelInfer(raw_request(x), timeout=10)
        np.testing.assert_allclose(raw_logits(response), predict(mnist[1][1], x), rtol=1e-6)
    finally:
        small.close()


class BrokenRepository:
    """A repository whose lookups fail with an unexpected error."""

    def names(self) -> list[str]:
        raise RuntimeError("secret detail")

    def get(self, name: str, version: str | None = None) -> Any:
        if name == "missing":
            raise ModelNotFound(f"unknown model {name!r}")
        raise RuntimeError("secret detail")


def test_unexpected_errors_are_internal_and_generic() -> None:
    broken = Endpoint(BrokenRepository())
    try:
        for call in (
            lambda: broken.stub.ModelInfer(raw_request(X), timeout=10),
            lambda: broken.stub.ServerReady(pb.ServerReadyRequest(), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == Code.INTERNAL
            assert "secret" not in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            broken.stub.ModelInfer(raw_request(X, model_name="missing"), timeout=10)
        assert err.value.code() == Code.NOT_FOUND
        assert (
            broken.sample("fedlearn_serving_errors_total", {"protocol": "grpc", "code": "INTERNAL"})
            == 2
        )
    finally:
        broken.close()


# -- tensor codecs (datatypes the MNIST model does not take) -------------------------------


def test_decode_typed_and_raw_datatypes() -> None:
    request = pb.ModelInferRequest()
    cases = {
        "a": ("INT8", "int_contents", [-128, 0, 127], np.int8),
        "b": ("UINT64", "uint64_contents", [0, 2**64 - 1, 5], np.uint64),
        "c": ("BOOL", "bool_contents", [True, False, True], np.bool_),
        "d": ("FP64", "fp64_contents", [0.1, -2.5, 1e300], np.float64),
        "e": ("UINT16", "uint_contents", [0, 65535, 7], np.uint16),
    }
    for name, (datatype, field, values, _) in cases.items():
        tensor = request.inputs.add(name=name, datatype=datatype, shape=[3, 1])
        getattr(tensor.contents, field).extend(values)
    arrays = decode_inputs(request)
    for name, (_, _, values, dtype) in cases.items():
        assert arrays[name].dtype == dtype
        np.testing.assert_array_equal(arrays[name], np.array(values, dtype=dtype).reshape(3, 1))

    raw = pb.ModelInferRequest(raw_input_contents=[b"\x00\x02\x01", b"\x00<\x00\xc0"])
    raw.inputs.add(name="flags", datatype="BOOL", shape=[3])
    raw.inputs.add(name="half", datatype="FP16", shape=[2])
    arrays = decode_inputs(raw)
    assert arrays["flags"].tolist() == [False, True, True]  # any non-zero byte is true
    assert arrays["half"].tolist() == [1.0, -2.0]


def test_encode_outputs_typed_and_raw() -> None:
    outputs = {"n": np.array([[1, -2]], dtype=np.int16), "p": np.array([0.5], dtype=np.float32)}
    typed = pb.ModelInferResponse()
    encode_outputs(typed, outputs, raw=False)
    assert not typed.raw_output_contents
    assert [(t.name, t.datatype, list(t.shape)) for t in typed.outputs] == [
        ("n", "INT16", [1, 2]),
        ("p", "FP32", [1]),
    ]
    assert list(typed.outputs[0].contents.int_contents) == [1, -2]
    assert list(typed.outputs[1].contents.fp32_contents) == [0.5]

    with_half = {**outputs, "h": np.array([1.0], dtype=np.float16)}
    response = pb.ModelInferResponse()
    encode_outputs(response, with_half, raw=False)  # FP16 has no typed form: all raw
    assert [t.contents.ListFields() for t in response.outputs] == [[], [], []]
    assert list(response.raw_output_contents) == [
        np.array([1, -2], "<i2").tobytes(),
        np.array([0.5], "<f4").tobytes(),
        np.array([1.0], "<f2").tobytes(),
    ]


# -- a model with nothing loaded --------------------------------------------------------


def test_model_without_loaded_version(tmp_path: Path) -> None:
    module = seeded_model(3)
    with ModelRegistry(tmp_path) as registry:  # published, never promoted
        registry.publish(
            "draft",
            model_to_arrays(module),
            run="test",
            round=1,
            metrics={"accuracy": 0.5},
            client_summary=None,
            factory=MNIST_FACTORY,
            signature=MNIST_SIGNATURE,
        )
    repository = open_repository(tmp_path)
    draft = Endpoint(repository)
    try:
        # a never-promoted model does not hold the server back, but is not ready itself
        assert draft.stub.ServerReady(pb.ServerReadyRequest()).ready
        assert not draft.stub.ModelReady(pb.ModelReadyRequest(name="draft")).ready
        for call in (
            lambda: draft.stub.ModelInfer(raw_request(X, model_name="draft")),
            lambda: draft.stub.ModelMetadata(pb.ModelMetadataRequest(name="draft")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == Code.UNAVAILABLE
            assert "no 'production' version loaded" in err.value.details()
        # an explicit version loads on demand
        assert draft.stub.ModelReady(pb.ModelReadyRequest(name="draft", version="1")).ready
        response = draft.stub.ModelInfer(raw_request(X, model_name="draft", model_version="1"))
        np.testing.assert_allclose(raw_logits(response), predict(module, X), rtol=1e-6)
    finally:
        draft.close()
        repository.close()


# -- fuzzing ----------------------------------------------------------------------------

ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND}
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
datatypes = st.one_of(
    st.sampled_from(["FP32", "FP64", "FP16", "INT8", "INT32", "UINT8", "UINT64", "BOOL"]),
    st.sampled_from(["BYTES", "", "fp32", "FP8"]),
    text,
)
dims = st.one_of(st.integers(0, 4), st.sampled_from([1, 28]), st.integers(-(2**63), 2**63 - 1))
shapes = st.one_of(st.lists(dims, max_size=5), st.builds(lambda n: [n, 1, 28, 28], dims))
typed_fields = st.sampled_from(
    ["fp32_contents", "fp64_contents", "int_contents", "int64_contents", "bool_contents"]
)
parameters = st.one_of(
    st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
    st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: pb.InferParameter(string_param=v), text),
    st.builds(lambda v: pb.InferParameter(double_param=v), st.floats()),
)


def _mutate(draw: st.DrawFn, request: pb.ModelInferRequest, mutation: str) -> None:
    """One random change to ``request`` (most make it invalid; some keep it valid)."""
    tensor = request.inputs[0] if request.inputs else request.inputs.add()
    if mutation == "model_name":
        request.model_name = draw(text)
    elif mutation == "model_version":
        request.model_version = draw(
            st.one_of(st.sampled_from(["1", "2", "0", "9", "²", "-1", "01", "1 "]), text)
        )
    elif mutation == "input_name":
        tensor.name = draw(text)
    elif mutation == "datatype":
        tensor.datatype = draw(datatypes)
    elif mutation == "shape":
        del tensor.shape[:]
        tensor.shape.extend(draw(shapes))
    elif mutation == "raw_bytes":
        del request.raw_input_contents[:]
        request.raw_input_contents.append(draw(st.binary(max_size=64)))
    elif mutation == "raw_extra":
        request.raw_input_contents.append(draw(st.binary(max_size=8)))
    elif mutation == "typed":  # typed contents instead of raw: valid when it holds all of x
        n = math.prod(max(d, 0) for d in tensor.shape)
        values = draw(
            st.one_of(
                st.just([0.25] * n if n <= 4 * 784 else []),
                st.lists(st.integers(-300, 300), max_size=8),
            )
        )
        del request.raw_input_contents[:]
        field = draw(st.one_of(st.just("fp32_contents"), typed_fields))
        if field == "bool_contents":
            values = [bool(v) for v in values]
        elif field in ("int_contents", "int64_contents"):
            values = [int(v) for v in values]
        getattr(tensor.contents, field).extend(values)
    elif mutation == "mix":
        tensor.contents.fp32_contents.append(0.5)
    elif mutation == "add_input":
        request.inputs.add(name=draw(st.one_of(st.just("input"), text)), datatype=draw(datatypes))
    elif mutation == "no_inputs":
        del request.inputs[:]
    elif mutation == "outputs":
        request.outputs.add(name=draw(st.one_of(st.just("logits"), text)))
    elif mutation == "parameters":
        request.parameters[draw(text)].CopyFrom(draw(parameters))
        tensor.parameters[draw(text)].CopyFrom(draw(parameters))


MUTATIONS = [
    "model_name", "model_version", "input_name", "datatype", "shape", "raw_bytes",
    "raw_extra", "typed", "mix", "add_input", "no_inputs", "outputs", "parameters",
]  # fmt: skip


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A valid raw request for 1-3 digits, then up to three random mutations."""
    x = digits(draw(st.integers(1, 3)), seed=draw(st.integers(0, 3)))
    request = raw_request(x, id=draw(text), model_version=draw(st.sampled_from(["", "1", "2"])))
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=3)):
        _mutate(draw, request, mutation)
    return request


@st.composite
def garbage(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid request's bytes cut short or with bytes overwritten."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=256))
    data = bytearray(raw_request(digits(1)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return Code.OK


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    request=infer_requests(),
    junk=garbage(),
    method=st.sampled_from(["ModelInfer", "ModelMetadata", "ModelReady", "ServerReady"]),
)
def test_fuzz_never_internal(
    endpoint: Endpoint, request: pb.ModelInferRequest, junk: bytes, method: str
) -> None:
    code = _code(lambda: endpoint.stub.ModelInfer(request, timeout=10))
    assert code in ALLOWED, (code, request)
    code = _code(lambda: endpoint.raw_call(method, junk))
    assert code in ALLOWED, (code, method, junk)
    assert endpoint.stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def test_fuzz_left_the_endpoint_serving(endpoint: Endpoint, modules: list[nn.Module]) -> None:
    assert_serves(endpoint, modules)
    internal = {"protocol": "grpc", "code": "INTERNAL"}
    assert endpoint.sample("fedlearn_serving_errors_total", internal) == 0
