"""Config validation: every bad field is named."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
from fedlearn.config.loading import load_toml, parse_assignment, set_dotted, validate
from fedlearn.config.simulation import SimulationConfig, load_config, parse_config
from fedlearn.errors import ConfigError


def test_embedded_defaults_are_the_main_job() -> None:
    cfg = load_config(None)
    assert (cfg.run.clients, cfg.data.dataset, cfg.data.partitioner, cfg.data.alpha) == (
        20,
        "mnist5k",
        "dirichlet",
        0.5,
    )
    assert cfg.client.app == "clients.mnist:make_app"


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"run": {"rounds": 0}}, "run.rounds"),
        ({"run": {"clients": -3}}, "run.clients"),
        ({"run": {"roundz": 3}}, "run.roundz"),
        ({"data": {"alpha": 0}}, "data.alpha"),
        ({"data": {"dataset": "imagenet"}}, "data.dataset"),
        ({"data": {"test_fraction": 1.5}}, "data.test_fraction"),
        ({"client": {"app": "no colon"}}, "client.app"),
        ({"backend": {"kind": "mpi"}}, "backend.kind"),
        ({"backend": {"workers": 0}}, "backend.workers"),
        ({"bogus": {}}, "bogus"),
        ({"run": {"name": "../escape"}}, "run.name"),
    ],
)
def test_bad_fields_are_named(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    assert field in str(info.value)


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[run]\nrounds = 3\n[strategy]\nname = "fedprox"\nparams = {proximal_mu = 0.1}\n'
    )
    cfg = load_config(path, {"run.clients": 7, "strategy.params.proximal_mu": 0.5})
    assert (cfg.run.rounds, cfg.run.clients, cfg.strategy.params["proximal_mu"]) == (3, 7, 0.5)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[run\nrounds = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_parse_assignment() -> None:
    assert parse_assignment("run.rounds=4") == ("run.rounds", 4)
    assert parse_assignment("data.dataset=digits") == ("data.dataset", "digits")
    assert parse_assignment("client.params.lr=0.5") == ("client.params.lr", 0.5)
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignment("novalue")


def test_a_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"config {tmp_path} is a directory, not a TOML file"


def test_an_unreadable_config_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[run]\nrounds = 3\n")

    def refuse(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"config {path} cannot be read: permission denied (check the file's permissions)"
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[run]\nrounds = 3\n")
    path.chmod(0)
    with pytest.raises(ConfigError, match="permission denied"):
        load_config(path)


def test_a_binary_file_is_not_a_config(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(path)


def _problems(model: type[BaseModel], raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(model, raw)
    return [line.strip() for line in str(info.value).splitlines()[1:]]


@pytest.mark.parametrize(
    "raw, problem",
    [
        ({"run": {"rouds": 3}}, "run.rouds: unknown field; did you mean run.rounds?"),
        ({"rnu": {"rounds": 3}}, "rnu: unknown section; did you mean run?"),
        (
            {"publish": {"gate": {"metrc": "loss"}}},
            "publish.gate.metrc: unknown field; did you mean publish.gate.metric?",
        ),
        (
            {"client": {"parms": {"lr": 0.1}}},
            "client.parms: unknown field; did you mean client.params?",
        ),
        (
            {
                "publish": {
                    "factory": "m:f",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "shap": [1]}],
                    "outputs": [{"name": "y", "datatype": "FP32", "shape": [1]}],
                }
            },
            "publish.inputs.0.shap: unknown field; did you mean publish.inputs.0.shape?",
        ),
        (
            {"run": {"xyzzy": 3}},
            "run.xyzzy: unknown field; valid fields: "
            "name, seed, rounds, clients, evaluate_every, out_dir",
        ),
        (
            {"qqq": {}},
            "qqq: unknown section; valid sections: "
            "run, data, client, strategy, backend, secagg, privacy, publish, flower, tracking, "
            "latency, drift",
        ),
    ],
)
def test_unknown_simulation_fields_suggest_the_nearest(raw: dict[str, Any], problem: str) -> None:
    assert _problems(SimulationConfig, raw) == [problem]


_SITE = {"site": {"name": "a"}, "client": {"app": "m:f"}}
_COORDINATOR = {"model": {"factory": "m:f"}}


@pytest.mark.parametrize(
    "model, raw, problem",
    [
        (
            CoordinatorConfig,
            {**_COORDINATOR, "server": {"insecure": True, "adress": "0.0.0.0:1"}},
            "server.adress: unknown field; did you mean server.address?",
        ),
        (
            CoordinatorConfig,
            {**_COORDINATOR, "server": {"insecure": True}, "publish": {"gate": {"metrc": "x"}}},
            "publish.gate.metrc: unknown field; did you mean publish.gate.metric?",
        ),
        (
            SiteConfig,
            {**_SITE, "data": {"simulated": {"alfa": 1.0}, "num_clients": 2}},
            "data.simulated.alfa: unknown field; did you mean data.simulated.alpha?",
        ),
        (
            SiteConfig,
            {**_SITE, "data": {"path": "d.npz"}, "coordinater": {}},
            "coordinater: unknown section; did you mean coordinator?",
        ),
    ],
)
def test_unknown_deployment_fields_suggest_the_nearest(
    model: type[BaseModel], raw: dict[str, Any], problem: str
) -> None:
    assert _problems(model, raw) == [problem]


def test_a_set_typo_suggests_the_field() -> None:
    with pytest.raises(ConfigError, match=r"run\.rouds: unknown field; did you mean run\.rounds\?"):
        load_config(None, {"run.rouds": 3})


class _Leaf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    speed: int = 0


class _Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: dict[str, int] | None = Field(default_factory=lambda: {"a": 1, "b": 2})
    other: _Leaf | None = None


class _Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: _Inner = Field(default_factory=_Inner)
    leaves: dict[str, _Leaf] = Field(default_factory=dict)


def test_suggestions_follow_optional_and_dict_of_model_fields() -> None:
    assert _problems(_Outer, {"inner": {"other": {"sped": 1}}}) == [
        "inner.other.sped: unknown field; did you mean inner.other.speed?"
    ]
    assert _problems(_Outer, {"leaves": {"x": {"sped": 1}}}) == [
        "leaves.x.sped: unknown field; did you mean leaves.x.speed?"
    ]


def test_set_merges_into_the_default_table() -> None:
    cfg = load_config(None, {"client.params.epochs": 1})
    assert cfg.client.params == {"epochs": 1, "batch_size": 32, "lr": 0.1}
    cfg = load_config(None, {"strategy.params.eta": 0.01, "publish.factory_params.width": 8})
    assert cfg.strategy.params == {"eta": 0.01}
    assert cfg.publish.factory_params == {"width": 8}


def test_set_merges_into_the_files_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[client]\nparams = {lr = 0.5}\n")
    assert load_config(path).client.params == {"lr": 0.5}  # a file's table replaces the default
    assert load_config(path, {"client.params.epochs": 1}).client.params == {"lr": 0.5, "epochs": 1}
    whole = load_config(path, {"client.params": {"epochs": 3}})  # setting the table replaces it
    assert whole.client.params == {"epochs": 3}


def test_set_merges_in_deployment_configs(tmp_path: Path) -> None:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        '[server]\ninsecure = true\n[model]\nfactory = "m:f"\n'
        "[strategy]\nparams = {min_train_clients = 2}\n"
    )
    cfg = load_toml(CoordinatorConfig, path, {"strategy.params.proximal_mu": 0.1})
    assert cfg.strategy.params == {"min_train_clients": 2, "proximal_mu": 0.1}
    site = tmp_path / "site.toml"
    site.write_text(
        '[site]\nname = "a"\n[data]\npath = "d.npz"\n[client]\napp = "m:f"\nparams = {lr = 0.1}\n'
    )
    assert load_toml(SiteConfig, site, {"client.params.epochs": 2}).client.params == {
        "lr": 0.1,
        "epochs": 2,
    }


def test_set_merges_into_any_dict_field_default() -> None:
    raw: dict[str, Any] = {}
    set_dotted(raw, "inner.weights.b", 5, _Outer)
    assert raw == {"inner": {"weights": {"a": 1, "b": 5}}}
    assert _Outer.model_validate(raw).inner.weights == {"a": 1, "b": 5}
    raw = {}
    set_dotted(raw, "inner.weights.b", 5)  # without the model there is no default to merge
    assert raw == {"inner": {"weights": {"b": 5}}}
