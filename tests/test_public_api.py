"""The public surface is exactly what fedlearn.__all__ says, and nothing leaks."""

from __future__ import annotations

from types import ModuleType

import fedlearn
import fedlearn.errors


def test_all_names_exist_and_are_unique() -> None:
    assert len(set(fedlearn.__all__)) == len(fedlearn.__all__)
    for name in fedlearn.__all__:
        assert hasattr(fedlearn, name), name


def test_no_undeclared_public_names() -> None:
    public = {
        n
        for n, v in vars(fedlearn).items()
        if not n.startswith("_") and not isinstance(v, ModuleType)
    }
    assert public - set(fedlearn.__all__) == set()


def test_exception_tree_has_one_root() -> None:
    errors = [
        v
        for v in vars(fedlearn.errors).values()
        if isinstance(v, type) and issubclass(v, Exception)
    ]
    assert fedlearn.FedlearnError in errors
    for cls in errors:
        assert issubclass(cls, fedlearn.FedlearnError), cls
        if cls is not fedlearn.FedlearnError:
            assert cls.__name__ in fedlearn.__all__


def test_every_builtin_strategy_is_exported() -> None:
    for cls in fedlearn.STRATEGIES.values():
        assert getattr(fedlearn, cls.__name__) is cls


def test_model_builder_is_public() -> None:
    """Users mark their model builders with ``@fedlearn.model_builder`` (serving calls
    nothing else a registry names)."""
    from fedlearn.registry.builders import model_builder

    assert "model_builder" in fedlearn.__all__
    assert fedlearn.model_builder is model_builder
