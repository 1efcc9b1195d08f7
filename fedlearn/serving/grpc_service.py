"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``).

Standard clients (tritonclient.grpc, KServe's gRPC client) call it unchanged; the schema
is ``fedlearn/serving/oip/grpc_predict_v2.proto``. ``ModelInfer`` takes each input either
as raw little-endian bytes (``raw_input_contents``, one entry per input, in order; what
tritonclient sends) or as typed ``contents`` (``fp32_contents``, ...), never both in one
request. The response mirrors the request: raw ``raw_output_contents`` for raw requests
(tritonclient reads only those), typed ``contents`` for typed requests, except that a
response holding a datatype with no typed field (FP16) is raw throughout.

Status codes: unknown model or version -> NOT_FOUND; malformed request or tensors that do
not fit the model -> INVALID_ARGUMENT; known model with nothing loaded -> UNAVAILABLE;
a message over ``max_message_bytes``, or a call while ``max_inflight`` calls are already
running or queued for the ``workers`` threads -> RESOURCE_EXHAUSTED (by gRPC itself, before
any handler runs, so it is not counted in the metrics); anything else -> INTERNAL with a
generic message, the detail going to the log. Requests are parsed by the handlers, not by
gRPC, so bytes that are no valid message get INVALID_ARGUMENT rather than gRPC's INTERNAL.

A ``ModelInfer`` naming no version follows the model's traffic policy
(:mod:`fedlearn.serving.traffic`); invocation metadata ``x-fedlearn-route-key`` makes a
split sticky, as the REST header of that name does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from fedlearn.errors import ConfigError, InvalidInput, ModelNotFound, ModelNotReady
from fedlearn.registry.spec import DATATYPES, datatype_of
from fedlearn.serving.metrics import ServingMetrics
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.repository import ModelRepository
from fedlearn.serving.tensors import TensorSpec, array_from_bytes, numpy_dtype

if TYPE_CHECKING:
    from fedlearn.serving.traffic import TrafficRouter

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "fedlearn"
#: Optional OIP extensions this endpoint implements over gRPC (none).
EXTENSIONS: tuple[str, ...] = ()
PROTOCOL = "grpc"
#: Invocation metadata key making a traffic split sticky (as REST's header).
ROUTE_KEY = "x-fedlearn-route-key"

#: OIP datatype -> the InferTensorContents field that carries it in typed form. FP16 has
#: no typed field and must travel as raw bytes.
TYPED_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

# Largest tensor a request may describe (elements, zero-sized dimensions counted as 1 so
# that a shape like [0, 2**62] is refused before numpy sees it).
_MAX_ELEMENTS = 2**40

# -- tensors ---------------------------------------------------------------------------


def _element_count(name: str, shape: Sequence[int]) -> int:
    count = 1
    bound = 1
    for dim in shape:
        if dim < 0:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
        count *= dim
        bound *= max(dim, 1)
        if bound > _MAX_ELEMENTS:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} is too large")
    return count


def _from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    _element_count(name, shape)
    try:
        array = array_from_bytes(raw, datatype, shape)
    except InvalidInput as exc:
        raise InvalidInput(f"input {name!r}: {exc}") from None
    if datatype == "BOOL":  # any non-zero byte is true; numpy bools must be 0 or 1
        array = array.view(np.uint8) != 0
    return array


def _from_contents(
    name: str, datatype: str, shape: Sequence[int], contents: pb.InferTensorContents
) -> np.ndarray:
    dtype = DATATYPES[datatype]
    count = _element_count(name, shape)
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} data must be sent in raw_input_contents")
    others = sorted(f.name for f, _ in contents.ListFields() if f.name != field)
    if others:
        raise InvalidInput(f"input {name!r}: {datatype} data belongs in {field}, got {others}")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: {field} holds {len(values)} elements; "
            f"shape {list(shape)} needs {count}"
        )
    if dtype.kind in "iu":
        wide = np.fromiter(values, dtype=np.int64 if dtype.kind == "i" else np.uint64, count=count)
        info = np.iinfo(dtype)
        if count and (int(wide.min()) < info.min or int(wide.max()) > info.max):
            raise InvalidInput(f"input {name!r}: {field} values do not fit {datatype}")
        array = wide.astype(dtype)
    else:
        array = np.fromiter(values, dtype=dtype, count=count)
    return array.reshape(tuple(shape))


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """The request's input tensors as ``{name: array}``; InvalidInput for any malformation."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidInput(f"duplicate input {name!r}")
        shape = list(tensor.shape)
        try:
            numpy_dtype(tensor.datatype)
        except InvalidInput as exc:
            raise InvalidInput(f"input {name!r}: {exc}") from None
        if raw:
            if tensor.contents.ListFields():
                raise InvalidInput(
                    f"input {name!r} has typed contents although the request uses "
                    "raw_input_contents; use one form for every input"
                )
            arrays[name] = _from_raw(name, tensor.datatype, shape, raw[index])
        else:
            arrays[name] = _from_contents(name, tensor.datatype, shape, tensor.contents)
    return arrays


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    """The output names the request asks for (empty: all); InvalidInput for duplicates."""
    names = [output.name for output in request.outputs]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InvalidInput(f"output {name!r} requested twice")
        seen.add(name)
    return names


def encode_outputs(
    response: pb.ModelInferResponse, outputs: Mapping[str, np.ndarray], *, raw: bool
) -> None:
    """Add ``outputs`` to ``response``: raw bytes, or typed contents where every datatype
    has a typed field (raw otherwise)."""
    datatypes = {name: datatype_of(array) for name, array in outputs.items()}
    raw = raw or any(dt not in TYPED_FIELDS for dt in datatypes.values())
    for name, array in outputs.items():
        datatype = datatypes[name]
        tensor = response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            response.raw_output_contents.append(
                array.astype(DATATYPES[datatype], copy=False).tobytes(order="C")
            )
        else:
            getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(array.ravel().tolist())


def model_version(name: str, version: str) -> str | None:
    """A request's version field: None when empty, else a decimal version number.

    Anything else is NOT_FOUND here, before the repository (whose ``str.isdigit`` check
    lets through Unicode digits that ``int`` cannot parse) sees it.
    """
    if not version:
        return None
    if not (version.isascii() and version.isdigit()):
        raise ModelNotFound(f"model {name!r}: version must be a positive integer, got {version!r}")
    return version


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


# -- service ---------------------------------------------------------------------------


class InferenceServicer:
    """The six OIP v2 RPCs over a :class:`ModelRepository`, counted in ServingMetrics."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: ServingMetrics,
        traffic: TrafficRouter | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self.traffic = traffic

    def server_live(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        """Always live while the process answers."""
        return pb.ServerLiveResponse(live=True)

    def server_ready(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        """Ready when every promoted model has a version loaded."""
        return pb.ServerReadyResponse(ready=self.repository.all_ready())

    def model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        """``ready=False`` for a known model with nothing loaded; NOT_FOUND when unknown."""
        return pb.ModelReadyResponse(
            ready=self.repository.ready(request.name, model_version(request.name, request.version))
        )

    def server_metadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        """Server name, fedlearn version and extensions."""
        from fedlearn import __version__

        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
        )

    def model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        """Versions, platform and signature of the model (or the requested version)."""
        model = self.repository.get(request.name, model_version(request.name, request.version))
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in self.repository.versions(model.name)],
            platform=model.platform,
            inputs=[_tensor_metadata(s) for s in model.signature.inputs],
            outputs=[_tensor_metadata(s) for s in model.signature.outputs],
        )

    def model_infer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext | None = None
    ) -> pb.ModelInferResponse:
        """One inference (module docstring); under the model's traffic policy when the
        request names no version."""
        # Resolve the model first, so the metrics are labelled by real model names only
        # and a flood of made-up names cannot grow their label sets.
        version = model_version(request.model_name, request.model_version)
        model = self.repository.get(request.model_name, version)
        with self.metrics.infer(PROTOCOL, model.name):
            inputs = decode_inputs(request)
            if self.traffic is not None and version is None:
                key = None
                for item in (context.invocation_metadata() or ()) if context else ():
                    if item.key == ROUTE_KEY:
                        key = str(item.value)
                model, outputs = self.traffic.infer(
                    model, inputs, requested_outputs(request) or None, key
                )
            else:
                outputs = model.infer(inputs, requested_outputs(request))
            self.metrics.observed(model, inputs, outputs)
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            encode_outputs(response, outputs, raw=bool(request.raw_input_contents))
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        """The gRPC handler of ``inference.GRPCInferenceService``."""
        methods: dict[str, tuple[Any, Callable[..., Any]]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelInfer": (pb.ModelInferRequest, self.model_infer),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                method: grpc.unary_unary_rpc_method_handler(
                    self._guarded(method, request_type, call),
                    request_deserializer=None,  # raw bytes: parsed in _guarded
                    response_serializer=_serialize,
                )
                for method, (request_type, call) in methods.items()
            },
        )

    def _guarded(
        self, method: str, request_type: Any, call: Callable[..., Any]
    ) -> Callable[[bytes, grpc.ServicerContext], Any]:
        """``call`` on the parsed request, every failure turned into a status code."""

        def behaviour(data: bytes, context: grpc.ServicerContext) -> Any:
            try:
                try:
                    request = request_type.FromString(data)
                except Exception:  # any parse failure of untrusted bytes
                    raise InvalidInput(
                        f"the request is not a valid {request_type.DESCRIPTOR.full_name}"
                    ) from None
                if method == "ModelInfer":  # the route key travels in its metadata
                    return call(request, context)
                return call(request)
            except ModelNotFound as exc:
                code, message = grpc.StatusCode.NOT_FOUND, str(exc)
            except InvalidInput as exc:
                code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            except ModelNotReady as exc:
                code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
            except Exception:
                log.exception("OIP gRPC %s failed", method)
                code, message = grpc.StatusCode.INTERNAL, "internal error (see the server log)"
            self.metrics.error(PROTOCOL, code.name)
            context.abort(code, message)
            return None  # not reached: abort raises

        return behaviour


def _serialize(message: Any) -> bytes:
    return bytes(message.SerializeToString())


def start_grpc_server(
    repository: ModelRepository,
    metrics: ServingMetrics,
    address: str = "127.0.0.1:0",
    *,
    max_message_bytes: int = 64 * 2**20,
    credentials: grpc.ServerCredentials | None = None,
    workers: int = 8,
    max_inflight: int = 256,
    traffic: TrafficRouter | None = None,
) -> tuple[grpc.Server, int]:
    """Serve OIP v2 gRPC on ``address`` (TLS with ``credentials``); returns the started
    server and its bound port. Stop it with ``server.stop(grace)``.

    ``workers`` threads answer calls; up to ``max_inflight`` calls in all are running or
    queued for them, and gRPC answers any more with RESOURCE_EXHAUSTED at once."""
    if max_message_bytes < 1:
        raise ConfigError(f"max message bytes must be >= 1, got {max_message_bytes}")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if max_inflight < 1:
        raise ConfigError(f"max_inflight must be >= 1, got {max_inflight}")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedlearn-oip-grpc"),
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
        maximum_concurrent_rpcs=max_inflight,
    )
    server.add_generic_rpc_handlers((InferenceServicer(repository, metrics, traffic).handler(),))
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind the OIP gRPC endpoint to {address}: {exc}") from None
    if not port:
        raise ConfigError(f"cannot bind the OIP gRPC endpoint to {address}")
    server.start()
    log.info("OIP v2 gRPC endpoint on %s (port %d)", address, port)
    return server, int(port)
