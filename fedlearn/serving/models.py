"""A registry version made servable: factory-built torch module + weights + signature.

The factory reference stored with a version (``module:function``) names a registered
model builder (:mod:`fedlearn.registry.builders`) of a module under an allowed prefix: the
prefix is checked before anything is imported, and nothing but a builder registered with
``@fedlearn.model_builder`` is ever called. The weights come from the registry's safetensors
file (sha256-checked), so a registry can never make the server run code of its choosing or
unpickle anything.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedlearn.engine.records import Arrays
from fedlearn.errors import ConfigError, InvalidInput
from fedlearn.registry.builders import find_builder
from fedlearn.registry.model_registry import DEFAULT_FACTORY_PREFIXES, ModelRegistry, ModelVersion
from fedlearn.registry.spec import datatype_of
from fedlearn.serving.tensors import Signature

log = logging.getLogger(__name__)


def build_module(
    factory: str,
    arrays: Arrays,
    allowed: tuple[str, ...] = DEFAULT_FACTORY_PREFIXES,
    params: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``factory(**params)`` (a registered model builder of an allowed module) with
    ``arrays`` loaded, in eval mode."""
    build = find_builder(factory, allowed)
    try:
        model = build(**(params or {}))
    except Exception as exc:  # wrong arguments, or the builder itself failed
        raise ConfigError(f"factory {factory!r} failed: {type(exc).__name__}: {exc}") from exc
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
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # same names, other shapes
        raise ConfigError(f"factory {factory!r}: weights do not fit the module: {exc}") from exc
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
        find_builder(info.factory, allowed)  # refused before the weights are read
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
                # the client gets the reason's first line (torch's own words, no paths);
                # anything longer (a C++ trace, say) stays in the server log
                log.debug(
                    "%s v%d cannot run on a request's inputs: %s", self.name, self.version, exc
                )
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise InvalidInput(f"the model cannot run on these inputs: {reason}") from None
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
