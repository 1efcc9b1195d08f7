"""The model registry: files + SQLite index, sha256 checks, aliases, gate, rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlearn.errors import ConfigError, SerializationError
from fedlearn.registry.model_registry import Gate, ModelRegistry, check_factory

SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
}


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float64),
        "steps": np.array([7, -1], dtype=np.int64),
    }


@pytest.fixture
def reg(tmp_path: Path) -> Any:
    with ModelRegistry(tmp_path / "reg") as registry:
        yield registry


def _publish(
    reg: ModelRegistry,
    acc: float,
    *,
    worst: float | None = None,
    seed: int = 0,
    parent: int | None = None,
) -> int:
    return reg.publish(
        "mnist",
        _arrays(seed),
        run="run-1",
        round=seed,
        metrics={"accuracy": acc, "loss": 1.0 - acc},
        client_summary=None if worst is None else {"accuracy_worst": worst},
        factory="clients.mnist:make_model",
        signature=SIGNATURE,
        parent=parent,
    ).version


def test_publish_load_round_trip_is_bit_exact(reg: ModelRegistry) -> None:
    arrays = _arrays(3)
    info = reg.publish(
        "mnist",
        arrays,
        run="r",
        round=5,
        metrics={"accuracy": 0.9},
        client_summary={"accuracy_worst": 0.7},
        factory="clients.mnist:make_model",
        signature=SIGNATURE,
    )
    assert info.path == reg.root / "mnist" / "v1.safetensors" and info.path.exists()
    assert not list(info.path.parent.glob("*.tmp"))
    loaded = reg.load("mnist", 1)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype
        assert loaded[key].tobytes() == value.tobytes()
    got = reg.get("mnist", 1)
    assert (got.run, got.round, got.metrics, got.client_summary) == (
        "r",
        5,
        {"accuracy": 0.9},
        {"accuracy_worst": 0.7},
    )
    assert got.signature == SIGNATURE and got.factory == "clients.mnist:make_model"
    assert len(got.sha256) == 64 and got.parent is None


def test_versions_count_per_name_and_survive_reopen(reg: ModelRegistry) -> None:
    assert _publish(reg, 0.5) == 1
    assert _publish(reg, 0.6, seed=1, parent=1) == 2
    other = reg.publish(
        "cifar",
        _arrays(),
        run="r",
        round=0,
        metrics={},
        client_summary=None,
        factory="fedlearn.models:cnn",
        signature=SIGNATURE,
    )
    assert other.version == 1
    assert [v.version for v in reg.versions("mnist")] == [1, 2]
    assert reg.get("mnist", 2).parent == 1
    assert reg.names() == ["cifar", "mnist"]
    with ModelRegistry(reg.root) as again:
        assert [v.version for v in again.versions("mnist")] == [1, 2]
        np.testing.assert_array_equal(again.load("mnist", 2)["w"], _arrays(1)["w"])
    with pytest.raises(ConfigError, match="no version 9"):
        reg.get("mnist", 9)
    with pytest.raises(ConfigError, match="parent"):
        _publish(reg, 0.7, parent=42)


def test_tampered_file_fails_sha_check(reg: ModelRegistry) -> None:
    info = reg.publish(
        "mnist",
        _arrays(),
        run="r",
        round=1,
        metrics={"accuracy": 0.5},
        client_summary=None,
        factory="clients.mnist:make_model",
        signature=SIGNATURE,
    )
    data = bytearray(info.path.read_bytes())
    data[-1] ^= 0x01
    info.path.write_bytes(bytes(data))
    with pytest.raises(SerializationError, match="sha256"):
        reg.load("mnist", 1)
    info.path.unlink()
    with pytest.raises(SerializationError, match="unreadable"):
        reg.load("mnist", 1)


def test_gate_blocks_worse_and_promotes_better(reg: ModelRegistry) -> None:
    gate = Gate("accuracy")
    _publish(reg, 0.80)
    _publish(reg, 0.75, seed=1)
    _publish(reg, 0.85, seed=2)
    assert reg.promote("mnist", 1, gate).promoted  # first version always passes
    worse = reg.promote("mnist", 2, gate)
    assert not worse.promoted and "not promoted" in worse.reason and "0.75" in worse.reason
    assert reg.resolve("mnist", "production").version == 1
    better = reg.promote("mnist", 3, gate)
    assert better.promoted
    assert reg.resolve("mnist", "production").version == 3
    again = reg.promote("mnist", 3, gate)
    assert not again.promoted and "already production" in again.reason
    log = reg.decisions("mnist")
    assert [(d.version, d.promoted, d.action) for d in log] == [
        (1, True, "promote"),
        (2, False, "promote"),
        (3, True, "promote"),
        (3, False, "promote"),
    ]
    assert log[1].reason == worse.reason


def test_gate_tolerance_and_lower_is_better(reg: ModelRegistry) -> None:
    _publish(reg, 0.80)
    _publish(reg, 0.78, seed=1)
    _publish(reg, 0.76, seed=2)
    reg.promote("mnist", 1, None)
    assert not reg.promote("mnist", 3, Gate("accuracy", tolerance=0.03)).promoted
    assert reg.promote("mnist", 2, Gate("accuracy", tolerance=0.03)).promoted
    # loss = 1 - accuracy: v3 has the higher loss, v1 the lower.
    assert not reg.promote("mnist", 3, Gate("loss", higher_is_better=False)).promoted
    assert reg.promote("mnist", 1, Gate("loss", higher_is_better=False)).promoted
    missing = reg.promote("mnist", 2, Gate("f1"))
    assert not missing.promoted and "no metric 'f1'" in missing.reason
    with pytest.raises(ConfigError):
        Gate("accuracy", tolerance=-0.1)


def test_min_worst_client_blocks_even_the_first_version(reg: ModelRegistry) -> None:
    gate = Gate("accuracy", min_worst_client=0.6)
    _publish(reg, 0.90, worst=0.4)
    _publish(reg, 0.85, worst=0.65, seed=1)
    _publish(reg, 0.95, seed=2)  # no client summary at all
    blocked = reg.promote("mnist", 1, gate)
    assert not blocked.promoted and "worst client" in blocked.reason
    with pytest.raises(ConfigError, match="no alias 'production'"):
        reg.resolve("mnist", "production")
    assert reg.promote("mnist", 2, gate).promoted
    unknown = reg.promote("mnist", 3, gate)
    assert not unknown.promoted and "accuracy_worst" in unknown.reason
    assert reg.resolve("mnist", "production").version == 2


def test_rollback_restores_previous_production(reg: ModelRegistry) -> None:
    for i, acc in enumerate((0.7, 0.8, 0.9)):
        _publish(reg, acc, seed=i)
        assert reg.promote("mnist", i + 1, Gate("accuracy")).promoted
    with ModelRegistry(reg.root) as again:  # the history is in the index, not in memory
        assert again.rollback("mnist").version == 2
    assert reg.resolve("mnist", "production").version == 2
    assert reg.rollback("mnist").version == 1
    with pytest.raises(ConfigError, match="roll back"):
        reg.rollback("mnist")
    log = reg.decisions("mnist")
    assert [(d.version, d.action) for d in log[-2:]] == [(2, "rollback"), (1, "rollback")]
    assert log[-2].reason == "rolled back from v3 to v2"


def test_aliases_resolve(reg: ModelRegistry) -> None:
    _publish(reg, 0.5)
    _publish(reg, 0.6, seed=1)
    reg.set_alias("mnist", "candidate", 2)
    reg.promote("mnist", 1, None)
    assert reg.resolve("mnist", "candidate").version == 2
    assert reg.resolve("mnist", "production").version == 1
    assert reg.resolve("mnist", "latest").version == 2
    assert reg.resolve("mnist", 1).version == 1
    assert reg.resolve("mnist", "2").version == 2
    assert reg.aliases("mnist") == {"candidate": 2, "production": 1, "latest": 2}
    np.testing.assert_array_equal(reg.load("mnist", "candidate")["w"], _arrays(1)["w"])
    reg.set_alias("mnist", "candidate", 1)
    assert reg.resolve("mnist", "candidate").version == 1
    for alias in ("production", "latest", "12"):
        with pytest.raises(ConfigError):
            reg.set_alias("mnist", alias, 2)
    with pytest.raises(ConfigError):
        reg.set_alias("mnist", "staging", 7)
    with pytest.raises(ConfigError, match="no alias"):
        reg.resolve("mnist", "staging")
    with pytest.raises(ConfigError, match="no versions"):
        reg.resolve("other", "latest")


@pytest.mark.parametrize(
    "ref",
    [
        "os:system",
        "clientsx.evil:make",
        "builtins:eval",
        "clients.mnist",
        "clients.mnist:",
        ":make",
        "clients..mnist:make",
        "clients.mnist:make.__globals__",
        "../clients:make",
        "fedlearnx:make",
    ],
)
def test_bad_factory_refs_are_refused(ref: str) -> None:
    with pytest.raises(ConfigError):
        check_factory(ref)


def test_good_factory_refs_and_custom_prefixes() -> None:
    assert check_factory("clients.mnist:make_model") == ("clients.mnist", "make_model")
    with pytest.raises(ConfigError, match="not under an allowed prefix"):
        check_factory("fedlearn.apps.torch_app:build")  # fedlearn. is not allowed by default
    assert check_factory("fedlearn.apps.torch_app:build", ("clients.", "fedlearn.")) == (
        "fedlearn.apps.torch_app",
        "build",
    )
    assert check_factory("clients:make") == ("clients", "make")
    assert check_factory("myorg.models:net", ("myorg",)) == ("myorg.models", "net")
    with pytest.raises(ConfigError):
        check_factory("clients.mnist:make", ("myorg.",))


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "../escape"),
        ("name", ""),
        ("factory", "not a ref"),
        ("metrics", {"accuracy": float("nan")}),
        ("client_summary", {"accuracy_worst": "high"}),
        ("signature", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2.5]}]}),
        ("round", -1),
    ],
)
def test_publish_rejects_bad_input(reg: ModelRegistry, field: str, value: Any) -> None:
    kwargs: dict[str, Any] = {
        "name": "mnist",
        "run": "r",
        "round": 0,
        "metrics": {"accuracy": 0.5},
        "client_summary": None,
        "factory": "clients.mnist:make_model",
        "signature": SIGNATURE,
    }
    kwargs[field] = value
    name = kwargs.pop("name")
    with pytest.raises(ConfigError):
        reg.publish(name, _arrays(), **kwargs)
    assert reg.versions("mnist") == []
    assert not (reg.root / "mnist").exists() or not any((reg.root / "mnist").iterdir())
