"""``fedlearn models``: list, show, promote (through the gate) and rollback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlearn.cli.main import app
from fedlearn.registry.model_registry import ModelRegistry
from serving import publish_mnist

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_list_and_show(tmp_path: Path) -> None:
    publish_mnist(tmp_path, seeds=(0, 1))
    code, out = _run("models", "list", "--registry", str(tmp_path))
    assert code == 0, out
    assert "mnist" in out and "accuracy=0.51" in out
    code, out = _run("models", "show", "mnist", "--registry", str(tmp_path))
    assert code == 0, out
    assert "2 (latest, production)" in out
    assert "clients.mnist:build_model" in out and "input FP32[-1, 1, 28, 28]" in out
    assert "v2 promoted: accuracy=0.51 vs production v1 0.5" in out
    code, out = _run("models", "show", "mnist", "1", "--registry", str(tmp_path))
    assert code == 0 and "1 (no alias)" in out


def test_promote_through_the_gate_and_rollback(tmp_path: Path) -> None:
    # v1 accuracy 0.6 is production; v2 (0.5) is published but the gate keeps it out
    publish_mnist(tmp_path, seeds=(0, 1), accuracy=(0.6, 0.5))
    code, out = _run("models", "promote", "mnist", "2", "--registry", str(tmp_path))
    assert code == 1 and "not promoted" in out
    code, out = _run(
        "models", "promote", "mnist", "2", "--tolerance", "0.2", "--registry", str(tmp_path)
    )
    assert code == 0 and "promoted" in out
    with ModelRegistry(tmp_path) as registry:
        assert registry.aliases("mnist")["production"] == 2
    code, out = _run("models", "rollback", "mnist", "--registry", str(tmp_path))
    assert code == 0 and "v1 again" in out
    with ModelRegistry(tmp_path) as registry:
        assert registry.aliases("mnist")["production"] == 1
        actions = [(d.action, d.version, d.promoted) for d in registry.decisions("mnist")]
    assert actions[-3:] == [("promote", 2, False), ("promote", 2, True), ("rollback", 1, True)]


def test_alias_sets_any_alias_but_production(tmp_path: Path) -> None:
    publish_mnist(tmp_path, seeds=(0, 1))
    code, out = _run("models", "alias", "mnist", "staging", "1", "--registry", str(tmp_path))
    assert code == 0 and "staging -> v1" in out
    with ModelRegistry(tmp_path) as registry:
        assert registry.aliases("mnist")["staging"] == 1
    code, out = _run("models", "alias", "mnist", "production", "1", "--registry", str(tmp_path))
    assert code == 2 and "use promote" in out


def test_errors_are_clear(tmp_path: Path) -> None:
    code, out = _run("models", "list", "--registry", str(tmp_path / "none"))
    assert code == 2 and "no model registry" in out
    publish_mnist(tmp_path)
    code, out = _run("models", "show", "mnist", "7", "--registry", str(tmp_path))
    assert code == 2 and "no version 7" in out
    code, out = _run("models", "rollback", "mnist", "--registry", str(tmp_path))
    assert code == 2 and "no previous production" in out


def test_the_cli_names_the_registry_production_alias() -> None:
    from fedlearn.cli import models
    from fedlearn.registry import model_registry

    assert models.PRODUCTION == model_registry.PRODUCTION


@pytest.mark.parametrize(
    "command",
    [
        ("list", "nosuch"),
        ("show", "nosuch"),
        ("show", "nosuch", "1"),
        ("promote", "nosuch", "1"),
        ("rollback", "nosuch"),
        ("alias", "nosuch", "staging", "1"),
        ("export-mlflow", "nosuch", "--tracking-uri", "sqlite:///unused.db"),
    ],
)
def test_an_unknown_model_is_named_with_the_registrys_models(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    publish_mnist(tmp_path)
    code, out = _run("models", *command, "--registry", str(tmp_path))
    assert code == 2
    assert out.strip() == f"error: model 'nosuch' does not exist in {tmp_path} (models: mnist)"


def test_an_unknown_model_in_an_empty_registry(tmp_path: Path) -> None:
    ModelRegistry(tmp_path).close()
    code, out = _run("models", "show", "mnist", "--registry", str(tmp_path))
    assert code == 2
    assert f"model 'mnist' does not exist in {tmp_path} (models: none published yet)" in out
