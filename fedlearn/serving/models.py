"""A registry version made servable: factory-built torch module + weights + signature.

The factory reference stored with a version (``module:function``) is checked against an
allowlist of module prefixes before anything is imported, and the weights come from the
registry's safetensors file (sha256-checked), so a registry can never make the server run
code outside the allowed modules or unpickle anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlearn.engine.records import Arrays
from fedlearn.engine.references import resolve
from fedlearn.errors import ConfigError, InvalidInput
from fedlearn.registry.model_registry import (
    DEFAULT_FACTORY_PREFIXES,
    ModelRegistry,
    ModelVersion,
    check_factory,
)
from fedlearn.registry.spec import datatype_of
from fedlearn.serving.tensors import Signature


def build_module(
    factory: str,
    arrays: Arrays,
    allowed: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES,
    params: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``factory(**params)`` (an allowed ``module:function``) with ``arrays`` loaded, in
    eval mode."""
    module_name, function = check_factory(factory, allowed)  # before anything is imported
    build = resolve(factory, "factory")
    if not callable(build):
        raise ConfigError(f"factory {factory!r}: {module_name}.{function} is not callable")
    try:
        model = build(**(params or {}))
    except TypeError as exc:
        raise ConfigError(f"factory {factory!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"factory {factory!r} returned {type(model).__name__}, not a torch Module"
        )
    expected = model.state_dict().keys()
    if arrays.keys() != expected:
        raise ConfigError(
            f"factory {factory!r}: weights do not match the module "
            f"(missing {sorted(expected - arrays.keys())}, "
            f"unexpected {sorted(arrays.keys() - expected)})"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        state = {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in expected}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


@dataclass
class ServedModel:
    """One loaded version: ``infer`` is thread-safe and never mutates the module."""

    name: str
    version: int
    signature: Signature
    module: nn.Module
    info: ModelVersion | None = None
    platform: str = "pytorch"

    @classmethod
    def load(
        cls,
        info: ModelVersion,
        arrays: Arrays,
        allowed: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES,
    ) -> ServedModel:
        """A registry version and its (sha256-verified) arrays as a servable model."""
        module = build_module(info.factory, arrays, allowed, info.factory_params)
        return cls(info.name, info.version, Signature.from_dict(info.signature), module, info)

    @classmethod
    def from_registry(
        cls,
        registry: ModelRegistry,
        name: str,
        version: int,
        allowed: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES,
    ) -> ServedModel:
        """Load ``name`` version ``version`` from ``registry``."""
        info = registry.get(name, version)
        check_factory(info.factory, allowed)
        return cls.load(info, registry.load(name, version), allowed)

    def infer(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` ({name: array}); returns the requested outputs."""
        ordered = self.signature.check_inputs(inputs)
        chosen = self.signature.select_outputs(outputs)
        batch = {a.shape[0] for a in ordered if a.ndim > 0}
        if 0 in batch:
            raise InvalidInput("empty batch")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in ordered]
        with torch.inference_mode():
            try:
                result = self.module(*tensors)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise InvalidInput(f"the model cannot run on these inputs: {exc}") from None
        produced = _outputs(result, [s.name for s in self.signature.outputs])
        out = {}
        for spec in chosen:
            array = produced[spec.name]
            if datatype_of(array) != spec.datatype or not spec.accepts(array.shape):
                raise ConfigError(
                    f"model {self.name} v{self.version}: output {spec.name!r} is "
                    f"{datatype_of(array)}{list(array.shape)}, the signature says "
                    f"{spec.datatype}{list(spec.shape)}"
                )
            out[spec.name] = array
        return out


def _outputs(result: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(result, torch.Tensor):
        values = [result]
    elif isinstance(result, Mapping):
        values = [result[n] for n in names]
    elif isinstance(result, tuple | list):
        values = list(result)
    else:
        raise ConfigError(f"the model returned {type(result).__name__}, not tensors")
    if len(values) != len(names):
        raise ConfigError(
            f"the model returned {len(values)} outputs, the signature has {len(names)}"
        )
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values, strict=True)}
