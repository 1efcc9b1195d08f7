"""Config validation: every bad field is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlearn.config.loading import parse_assignment
from fedlearn.config.simulation import load_config, parse_config
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
        ({"backend": {"kind": "ray"}}, "backend.kind"),
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
