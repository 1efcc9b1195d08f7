"""The serving core: signatures, servable versions, the hot-swapping repository."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.errors import ConfigError, InvalidInput, ModelNotFound, ModelNotReady
from fedlearn.registry.model_registry import Gate, ModelRegistry
from fedlearn.registry.spec import DATATYPES
from fedlearn.serving import ModelRepository, RepositorySettings, ServedModel, Signature
from fedlearn.serving.tensors import array_from_bytes, array_from_list
from serving import MNIST_FACTORY, MNIST_SIGNATURE, digits, predict, publish_mnist, seeded_model

SIG = Signature.from_dict(MNIST_SIGNATURE)


def test_signature_checks_name_datatype_and_shape() -> None:
    x = digits(2)
    assert SIG.check_inputs({"input": x})[0] is x
    cases = [
        ({"input": x, "extra": x}, "unknown input 'extra'"),
        ({}, "missing input 'input'"),
        ({"input": x.astype(np.float64)}, "datatype FP64, expected FP32"),
        ({"input": x.reshape(2, 784)}, r"shape \[2, 784\], expected \[-1, 1, 28, 28\]"),
        ({"input": x[:, :, :27]}, "shape"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidInput, match=message):
            SIG.check_inputs(inputs)
    with pytest.raises(InvalidInput, match="unknown output 'probs'"):
        SIG.select_outputs(["probs"])
    assert SIG.select_outputs(None) == SIG.outputs


def test_tensor_decoding_round_trips_and_refuses_lies() -> None:
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert np.array_equal(array_from_bytes(x.tobytes(), "INT32", [2, 3]), x)
    assert np.array_equal(array_from_list([[0, 1, 2], [3, 4, 5]], "INT32", [2, 3]), x)
    assert np.array_equal(array_from_list([0, 1, 2, 3, 4, 5], "INT32", [2, 3]), x)
    with pytest.raises(InvalidInput, match="needs 24"):
        array_from_bytes(x.tobytes()[:-1], "INT32", [2, 3])
    with pytest.raises(InvalidInput, match="needs 6"):
        array_from_list([1, 2, 3], "INT32", [2, 3])
    with pytest.raises(InvalidInput, match="must be integers"):
        array_from_list([1.5] * 6, "INT32", [2, 3])
    with pytest.raises(InvalidInput, match="does not fit INT8"):
        array_from_list([300] * 6, "INT8", [2, 3])
    with pytest.raises(InvalidInput, match="must be numbers"):
        array_from_list(["a"] * 6, "FP32", [2, 3])
    with pytest.raises(InvalidInput, match="true/false"):
        array_from_list([1] * 6, "BOOL", [2, 3])
    with pytest.raises(InvalidInput, match="unsupported datatype 'BYTES'"):
        array_from_bytes(b"", "BYTES", [0])
    with pytest.raises(InvalidInput, match="non-negative"):
        array_from_bytes(b"", "FP32", [-1])


def test_served_model_predicts_like_the_module(tmp_path: Path) -> None:
    (module,) = publish_mnist(tmp_path)
    with ModelRegistry(tmp_path) as registry:
        served = ServedModel.from_registry(registry, "mnist", 1)
    x = digits(5)
    out = served.infer({"input": x})
    assert list(out) == ["logits"]
    assert np.array_equal(out["logits"], predict(module, x))
    with pytest.raises(InvalidInput, match="empty batch"):
        served.infer({"input": x[:0]})


def test_factories_outside_the_allowlist_are_never_imported(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as registry:
        registry.publish(
            "evil",
            model_to_arrays(seeded_model(0)),
            run="r",
            round=1,
            metrics={},
            client_summary=None,
            factory="os:system",
            signature=MNIST_SIGNATURE,
        )
        with pytest.raises(ConfigError, match="not under an allowed prefix"):
            ServedModel.from_registry(registry, "evil", 1)
        # an allowed module, a callable in it, but no registered model builder
        registry.publish(
            "pki",
            model_to_arrays(seeded_model(0)),
            run="r",
            round=1,
            metrics={},
            client_summary=None,
            factory="fedlearn.security.certs:write_dev_pki",
            factory_params={"out_dir": str(tmp_path / "keys")},
            signature=MNIST_SIGNATURE,
        )
        with pytest.raises(ConfigError, match="not a registered model builder: decorate"):
            ServedModel.from_registry(registry, "pki", 1, ("clients.", "fedlearn."))
        assert not (tmp_path / "keys").exists()
        # allowed module, wrong weights for what it builds
        registry.publish(
            "mismatch",
            {"w": np.zeros(3, np.float32)},
            run="r",
            round=1,
            metrics={},
            client_summary=None,
            factory=MNIST_FACTORY,
            signature=MNIST_SIGNATURE,
        )
        with pytest.raises(ConfigError, match="weights do not match"):
            ServedModel.from_registry(registry, "mismatch", 1)


def test_repository_hot_swaps_on_promotion_and_rollback(tmp_path: Path) -> None:
    modules = publish_mnist(tmp_path, seeds=(0,))
    repo = ModelRepository(tmp_path, RepositorySettings(poll_interval_s=60))
    swaps: list[tuple[str, int | None, int]] = []
    repo.on_swap(lambda name, old, new: swaps.append((name, old, new)))
    repo.start()
    try:
        x = digits(3)
        held = repo.get("mnist")  # an in-flight request holds this model
        assert held.version == 1
        modules += publish_mnist(tmp_path, seeds=(1,), accuracy=(0.9,))
        assert repo.refresh() == [("mnist", 1, 2)]
        assert repo.get("mnist").version == 2
        assert np.array_equal(
            repo.get("mnist").infer({"input": x})["logits"], predict(modules[1], x)
        )
        # the old object still answers, unchanged
        assert np.array_equal(held.infer({"input": x})["logits"], predict(modules[0], x))
        assert repo.get("mnist", "1").version == 1 and repo.get("mnist", 2).version == 2
        with ModelRegistry(tmp_path) as registry:
            registry.rollback("mnist")
        assert repo.refresh() == [("mnist", 2, 1)]
        assert repo.served() == {"mnist": 1}
        assert swaps == [("mnist", None, 1), ("mnist", 1, 2), ("mnist", 2, 1)]
    finally:
        repo.close()


def test_repository_errors_and_a_broken_version_keeps_the_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    publish_mnist(tmp_path)
    repo = ModelRepository(tmp_path, RepositorySettings(poll_interval_s=60))
    repo.start()
    try:
        with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
            repo.get("nope")
        with pytest.raises(ModelNotFound, match="no version 9"):
            repo.get("mnist", "9")
        with pytest.raises(ModelNotFound, match="positive integer"):
            repo.get("mnist", "latest; DROP")
        # publish v2, corrupt its file, promote it: v1 keeps serving
        publish_mnist(tmp_path, seeds=(1,), accuracy=(0.9,))
        with ModelRegistry(tmp_path) as registry:
            v2 = registry.get("mnist", 2)
        data = bytearray(v2.path.read_bytes())
        data[-1] ^= 0xFF
        v2.path.write_bytes(bytes(data))
        with caplog.at_level(logging.ERROR, "fedlearn.serving.repository"):
            assert repo.refresh() == []
        assert "does not match its recorded sha256" in caplog.text  # the detail: in the log
        assert repo.get("mnist").version == 1
        with pytest.raises(ModelNotReady, match="version 2 could not be loaded; see the server"):
            repo.get("mnist", "2")
        assert repo.ready("mnist") and not repo.ready("mnist", "2")
    finally:
        repo.close()


def test_a_model_without_production_is_not_ready(tmp_path: Path) -> None:
    with ModelRegistry(tmp_path) as registry:
        registry.publish(
            "mnist",
            model_to_arrays(seeded_model(0)),
            run="r",
            round=1,
            metrics={"accuracy": 0.1},
            client_summary=None,
            factory=MNIST_FACTORY,
            signature=MNIST_SIGNATURE,
        )
        assert not registry.promote("mnist", 1, Gate("accuracy", min_worst_client=0.5)).promoted
    repo = ModelRepository(tmp_path)
    repo.start()
    try:
        assert not repo.ready("mnist")
        with pytest.raises(ModelNotReady):
            repo.get("mnist")
        assert repo.ready("mnist", "1")  # explicit versions stay addressable
    finally:
        repo.close()


def test_concurrent_requests_during_swaps_never_fail(tmp_path: Path) -> None:
    modules = publish_mnist(tmp_path, seeds=(0, 1))
    repo = ModelRepository(tmp_path, RepositorySettings(poll_interval_s=60))
    repo.start()
    x = digits(4)
    expected = {i + 1: predict(m, x) for i, m in enumerate(modules)}
    errors: list[BaseException] = []
    answered = {1: 0, 2: 0}
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                model = repo.get("mnist")
                out = model.infer({"input": x})["logits"]
                assert np.array_equal(out, expected[model.version])
                answered[model.version] += 1
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:

        def swap_and_see(version: int) -> None:
            repo.refresh()
            before = answered[version]
            deadline = time.monotonic() + 10
            while answered[version] < before + 4 and time.monotonic() < deadline:
                time.sleep(0.001)

        with ModelRegistry(tmp_path) as registry:
            for _ in range(10):
                registry.rollback("mnist")
                swap_and_see(1)
                registry.promote("mnist", 2, None)
                swap_and_see(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
        repo.close()
    assert errors == []
    assert answered[1] >= 40 and answered[2] >= 40


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["FP32", "FP64", "INT8", "INT32", "INT64", "UINT8", "BOOL"]),
    st.lists(
        st.one_of(
            st.integers(-(2**70), 2**70),
            st.floats(allow_nan=False, width=64),
            st.booleans(),
        ),
        min_size=1,
        max_size=12,
    ),
)
def test_json_tensors_decode_exactly_or_refuse(datatype: str, values: list[object]) -> None:
    """Whatever path decodes it, a JSON tensor is the values in the datatype or a 400."""
    try:
        got = array_from_list(values, datatype, [len(values)])
    except InvalidInput:
        return
    dtype = DATATYPES[datatype]
    assert got.dtype == dtype and got.shape == (len(values),)
    for value, out in zip(values, got.tolist(), strict=True):
        if dtype.kind == "f":
            assert out == pytest.approx(float(value), rel=1e-6) or not np.isfinite(out)  # type: ignore[arg-type]
            assert np.isfinite(np.float64(out)) or abs(float(value)) > 1e38  # type: ignore[arg-type]
        else:
            assert out == value
