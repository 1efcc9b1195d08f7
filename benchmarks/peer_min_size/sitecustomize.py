"""Lowers the peer scripts' Dirichlet ``min_size`` in every process that imports them.

``benchmarks/bench_mnist.py --min-size N`` puts this directory on ``PYTHONPATH`` (with
``FEDLEARN_PEER_MIN_SIZE=N``) when it runs Flower's ``mnist_bench.py``: the script imports
itself as the module ``mnist_bench`` in the driver and in every Ray actor, whose
interpreters run this file at start-up. After ``mnist_bench`` is executed its
``dirichlet_partition`` gets ``min_size = N`` as its default; nothing else changes, so the
peer's split equals fedlearn's ``data.min_size = N`` split (250 MNIST-5k clients at
alpha 0.5 admit no draw with the peers' 10 samples each).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

_MODULES = ("mnist_bench", "mnist_bare_loop")


def _patch(module: ModuleType) -> None:
    fn = getattr(module, "dirichlet_partition", None)
    if fn is not None and fn.__defaults__:
        fn.__defaults__ = (int(os.environ["FEDLEARN_PEER_MIN_SIZE"]), *fn.__defaults__[1:])


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if os.environ.get("FEDLEARN_PEER_MIN_SIZE"):
    sys.meta_path.insert(0, _Finder())
