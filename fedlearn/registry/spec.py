"""What a registry needs to serve a model again: factory reference, its arguments, signature.

A :class:`ServingSpec` is derived from the callable that builds the model (a module-level
function or class, or a ``functools.partial`` of one with scalar arguments) and one
example input, so publishing needs no hand-written signature for the usual apps.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.errors import ConfigError, InvalidInput

if TYPE_CHECKING:
    import torch
    from torch import nn


#: OIP v2 datatype name -> numpy dtype (little-endian, as the binary extension requires).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_DTYPE: dict[np.dtype[Any], str] = {dtype: name for name, dtype in DATATYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype name of ``array``'s dtype."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise InvalidInput(f"dtype {array.dtype} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class ServingSpec:
    """``factory(**params)`` rebuilds the module; ``signature`` is its OIP inputs/outputs."""

    factory: str
    signature: dict[str, Any]
    params: Mapping[str, Any] = field(default_factory=dict)


def factory_reference(build: Callable[..., Any]) -> tuple[str, dict[str, Any]]:
    """``("module:name", keyword arguments)`` that call ``build`` again from a fresh process.

    ``build`` must be a module-level function or class, or a ``functools.partial`` of one
    whose arguments are booleans, numbers or strings; anything else (a lambda, a closure,
    a bound method) raises :class:`ConfigError`. The reference is the one
    ``@fedlearn.model_builder`` registers the function under
    (:func:`fedlearn.registry.builders.builder_reference`): ``fedlearn serve`` calls it only
    if it is registered (the publisher warns when it is not).
    """
    params: dict[str, Any] = {}
    target = build
    if isinstance(build, functools.partial):
        target = build.func
        try:
            bound = inspect.signature(target).bind_partial(*build.args, **build.keywords)
        except TypeError as exc:
            raise ConfigError(f"cannot name the model factory {build!r}: {exc}") from exc
        params = dict(bound.arguments)
        for key, value in params.items():
            if not isinstance(value, bool | int | float | str):
                raise ConfigError(
                    f"model factory argument {key}={value!r} is not a boolean, number or string"
                )
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", "")
    if not module or not qualname.isidentifier() or module == "__main__":
        raise ConfigError(
            f"cannot name the model factory {build!r}: use a module-level function or class "
            "(or a functools.partial of one), or set publish.factory"
        )
    return f"{module}:{qualname}", params


def tensor_spec(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    """``{name, datatype, shape}`` of a batch ``tensor``, its first dimension any size."""
    array = tensor.detach().cpu().numpy()
    return {"name": name, "datatype": datatype_of(array), "shape": [-1, *array.shape[1:]]}


def derive_spec(build: Callable[..., nn.Module], example: torch.Tensor) -> ServingSpec:
    """The spec of the module ``build()`` makes, run once on ``example`` (a batch)."""
    import torch

    factory, params = factory_reference(build)
    with torch.random.fork_rng(devices=[]):
        module = build().eval()
    with torch.inference_mode():
        output = module(example[:1])
    if not isinstance(output, torch.Tensor):
        raise ConfigError(
            f"{factory} returns {type(output).__name__}; set publish.inputs and publish.outputs"
        )
    signature = {
        "inputs": [tensor_spec("input", example)],
        "outputs": [tensor_spec("logits", output)],
    }
    return ServingSpec(factory, signature, params)
