"""Publishing a run's global model: simulation and coordinator, gate decisions, summaries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deployment import Deployment, in_process_coordinator
from fedlearn.config.simulation import PublishSection, load_config
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.weights import load_weights
from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.registry.publish import Publisher, client_summary, serving_spec
from fedlearn.registry.spec import ServingSpec, factory_reference
from fedlearn.run.job import run_job

ROOT = Path(__file__).resolve().parents[1]
SPEC = ServingSpec(
    "clients.tabular:build_model",
    {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
    },
    {"in_features": 4, "num_classes": 2, "hidden": 0},
)


def _eval(cid: int, n: int, accuracy: float, loss: float, round: int = 1) -> ClientRecord:
    return ClientRecord(round, Stage.EVALUATE, cid, True, n, loss, {"accuracy": accuracy})


def _round(number: int, accuracy: float) -> RoundRecord:
    return RoundRecord(
        number, True, 3, 3, 3, 3, eval_metrics={"accuracy": accuracy, "loss": 0.5, "note": "x"}
    )


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "weight": rng.standard_normal((2, 4)).astype(np.float32),
        "bias": rng.standard_normal(2).astype(np.float32),
    }


def test_client_summary_is_hand_computable() -> None:
    clients = [
        _eval(0, 10, 0.9, 0.3),
        _eval(1, 30, 0.5, 0.9),
        _eval(2, 60, 0.7, 0.6),
        ClientRecord(1, Stage.EVALUATE, 3, False, error="crashed"),
        _eval(4, 99, 0.0, 9.9, round=2),  # another round: ignored
        ClientRecord(1, Stage.TRAIN, 5, True, 10, 0.1, {"accuracy": 0.0}),  # training: ignored
    ]
    s = client_summary(clients, 1)
    assert s["accuracy_worst"] == 0.5 and s["loss_worst"] == 0.9
    assert s["accuracy_clients"] == 3.0
    assert s["accuracy_mean"] == pytest.approx((10 * 0.9 + 30 * 0.5 + 60 * 0.7) / 100)
    assert s["accuracy_p50"] == pytest.approx(0.7)
    assert s["accuracy_p10"] == pytest.approx(0.5 + 0.2 * (0.7 - 0.5))


def test_publisher_gates_each_version_and_links_parents(tmp_path: Path) -> None:
    section = PublishSection.model_validate(
        {"gate": {"metric": "accuracy", "tolerance": 0.01, "min_worst_client": 0.4}}
    )
    publisher = Publisher(section, "run-a", SPEC, tmp_path)

    def clients(round: int) -> list[ClientRecord]:
        return [_eval(0, 10, 0.8, 0.4, round), _eval(1, 10, 0.6, 0.5, round)]

    first = publisher.publish(_arrays(0), _round(1, 0.70), clients(1), 1)
    assert first.decision.promoted and first.version.parent is None
    assert first.version.metrics == {"accuracy": 0.70, "loss": 0.5}  # the string is dropped
    assert first.version.client_summary is not None
    assert first.version.client_summary["accuracy_worst"] == 0.6
    # 0.695 is within the 0.01 tolerance of 0.70: promoted
    second = publisher.publish(_arrays(1), _round(2, 0.695), clients(2), 2)
    assert second.decision.promoted and second.version.parent == 1
    # 0.68 regresses by 0.015 > 0.01: recorded, not promoted
    third = publisher.publish(_arrays(2), _round(3, 0.68), clients(3), 3)
    assert not third.decision.promoted and "not promoted" in third.decision.reason
    # a worst client below 0.4 blocks even a better mean
    weak = [_eval(0, 10, 0.99, 0.1, 4), _eval(1, 10, 0.3, 2.0, 4)]
    fourth = publisher.publish(_arrays(3), _round(4, 0.9), weak, 4)
    assert not fourth.decision.promoted and "0.3" in fourth.decision.reason
    with ModelRegistry(tmp_path) as registry:
        assert registry.aliases("run-a")["production"] == 2
        assert registry.aliases("run-a")["candidate"] == 4  # the newest, whatever the gate said
        decisions = registry.decisions("run-a")
        assert [d.promoted for d in decisions] == [True, True, False, False]
        assert [d.reason for d in decisions[2:]] == [
            third.decision.reason,
            fourth.decision.reason,
        ]
        restored = registry.load("run-a", 3)
    for name, array in _arrays(2).items():
        assert restored[name].tobytes() == array.tobytes()


def test_loss_gate_defaults_to_lower_is_better(tmp_path: Path) -> None:
    section = PublishSection.model_validate({"gate": {"metric": "loss", "tolerance": 0.0}})
    publisher = Publisher(section, "r", SPEC, tmp_path)
    assert publisher.publish(_arrays(0), _round(1, 0.5), [], 1).decision.promoted
    worse = RoundRecord(2, True, 1, 1, 1, 1, eval_metrics={"loss": 0.7})
    better = RoundRecord(3, True, 1, 1, 1, 1, eval_metrics={"loss": 0.2})
    assert not publisher.publish(_arrays(1), worse, [], 2).decision.promoted
    assert publisher.publish(_arrays(2), better, [], 3).decision.promoted


def test_factory_references() -> None:
    from functools import partial

    from clients import mnist, shakespeare, tabular

    assert factory_reference(mnist.build_model) == ("clients.mnist:build_model", {})
    ref = factory_reference(partial(tabular.build_model, 30, 2, hidden=8))
    assert ref == (
        "clients.tabular:build_model",
        {"in_features": 30, "num_classes": 2, "hidden": 8},
    )
    assert factory_reference(partial(shakespeare.CharGRU, hidden=16)) == (
        "clients.shakespeare:CharGRU",
        {"hidden": 16},
    )
    for bad in (lambda: mnist.build_model(), partial(tabular.build_model, [1], 2)):
        with pytest.raises(ConfigError):
            factory_reference(bad)


def test_publish_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="set both inputs and outputs"):
        load_config(
            None,
            {"publish.factory": "clients.mnist:build_model", "publish.inputs": []},
        )
    with pytest.raises(ConfigError, match=r"publish\.gate\.tolerance"):
        load_config(None, {"publish.gate.tolerance": -1})
    with pytest.raises(ConfigError, match="cannot describe its model"):
        serving_spec(PublishSection(), object())


def test_simulation_publishes_every_round_and_the_final_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    config = load_config(
        None,
        {
            "run.rounds": 3,
            "run.clients": 4,
            "run.out_dir": str(tmp_path / "run"),
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "clients.tabular:make_app",
            "client.params": {"epochs": 1, "lr": 0.05},
            "strategy.params.min_train_clients": 2,
            "backend.kind": "inprocess",
            "publish.every": 2,
            "publish.model": "bc",
        },
    )
    job = run_job(config)
    # round 2 (every = 2) and the final round 3; nothing twice
    assert [p.version.round for p in job.published] == [2, 3]
    with ModelRegistry(tmp_path / "registry") as registry:
        versions = registry.versions("bc")
        assert [v.round for v in versions] == [2, 3]
        final = registry.load("bc", 2)
        last = versions[-1]
    saved = load_weights(tmp_path / "run" / "model.safetensors")
    assert list(final) == list(saved)
    for name in saved:
        assert final[name].tobytes() == saved[name].tobytes()
    record = job.result.rounds[-1]
    assert last.metrics["accuracy"] == record.eval_metrics["accuracy"]
    evals = [c for c in job.result.clients if c.round == 3 and c.stage is Stage.EVALUATE]
    assert last.client_summary is not None
    assert last.client_summary["accuracy_worst"] == min(float(c.metrics["accuracy"]) for c in evals)
    assert last.factory == "clients.tabular:build_model"
    assert last.factory_params == {"in_features": 30, "num_classes": 2, "hidden": 32}
    assert last.signature["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    assert last.parent == 1


def test_publish_disabled_writes_no_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    config = load_config(
        None,
        {
            "run.rounds": 1,
            "run.clients": 2,
            "run.out_dir": str(tmp_path / "run"),
            "data.dataset": "breast_cancer",
            "client.app": "clients.tabular:make_app",
            "strategy.params.min_train_clients": 1,
            "backend.kind": "inprocess",
            "publish.enabled": False,
        },
    )
    assert run_job(config).published == []
    assert not (tmp_path / "registry").exists()


def _custom_app_config(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    settings: dict[str, object] = {
        "run.rounds": 2,
        "run.clients": 3,
        "run.out_dir": str(tmp_path / "run"),
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "fault_apps:make_app",  # a numpy app that cannot describe a model
        "client.params": {},
        "strategy.params.min_train_clients": 1,
        "backend.kind": "inprocess",
    }
    return load_config(None, settings | extra)


def test_a_custom_app_with_default_publishing_runs_and_says_why_nothing_was_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    job = run_job(_custom_app_config(tmp_path))
    assert job.outcome.status == "finished" and job.published == []
    assert not (tmp_path / "registry").exists()
    [note] = [n for n in job.outcome.notes if n.startswith("publishing skipped")]
    assert "fault_apps:make_app" in note and "serving_spec()" in note
    assert "set publish.factory, publish.inputs and publish.outputs" in note


def test_a_custom_app_with_publishing_asked_for_is_a_config_error_before_any_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="cannot describe its model"):
        run_job(_custom_app_config(tmp_path, **{"publish.enabled": True}))
    assert not (tmp_path / "run").exists()


def test_coordinator_publishes_the_final_model(tmp_path: Path) -> None:
    d = Deployment(tmp_path, rounds=2)
    overrides = {
        "publish.enabled": True,
        "publish.model": "bc",
        "publish.factory": "clients.tabular:build_model",
        "publish.factory_params": {"in_features": 30, "num_classes": 2, "hidden": 32},
        "publish.inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
        "publish.outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
    }
    with in_process_coordinator(d, overrides) as c:
        for i in range(d.num_sites):
            c.start_site(i)
        result = c.wait(120)
    with ModelRegistry(d.state_dir / "registry") as registry:
        (version,) = registry.versions("bc")
        assert registry.aliases("bc")["production"] == 1
        arrays = registry.load("bc", 1)
    assert version.round == 2 and version.run == "run"
    for name, array in result.arrays.items():
        assert arrays[name].tobytes() == np.ascontiguousarray(array).tobytes()


def test_coordinator_publish_needs_an_explicit_model() -> None:
    from fedlearn.config.deployment import CoordinatorConfig
    from fedlearn.config.loading import validate

    raw = {
        "server": {"insecure": True},
        "model": {"factory": "clients.tabular:initial_breast_cancer"},
        "publish": {"enabled": True},
    }
    with pytest.raises(ConfigError, match="factory, inputs and outputs"):
        validate(CoordinatorConfig, raw)


def test_publishing_an_unregistered_builder_says_serving_will_refuse_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert Publisher(PublishSection(), "run", SPEC, tmp_path).warning is None  # registered
    config = load_config(
        None,
        {
            "run.rounds": 1,
            "run.clients": 2,
            "run.out_dir": str(tmp_path / "run"),
            "data.dataset": "breast_cancer",
            "client.app": "clients.tabular:make_app",
            "client.params": {"epochs": 1, "hidden": 0},
            "strategy.params.min_train_clients": 1,
            "backend.kind": "inprocess",
            "publish.factory": "serving:undecorated_build",
            "publish.factory_params": {"in_features": 30, "num_classes": 2},
            "publish.inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
            "publish.outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
        },
    )
    job = run_job(config)
    assert [p.version.factory for p in job.published] == ["serving:undecorated_build"]
    [note] = [n for n in job.outcome.notes if "registered model builder" in n]
    assert note == (
        "publish: serving:undecorated_build is not a registered model builder, so `fedlearn "
        "serve` will refuse to load the published versions; decorate undecorated_build in "
        "serving with @fedlearn.model_builder"
    )
    missing = Publisher(
        PublishSection(), "run", ServingSpec("clients.gone:build", SPEC.signature), tmp_path
    )
    assert missing.warning is not None and "cannot be imported here" in missing.warning
