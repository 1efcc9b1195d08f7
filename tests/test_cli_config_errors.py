"""Config mistakes on the command line end in one line that names the problem."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedlearn.cli.main import app

runner = CliRunner()


def _run(*args: str) -> tuple[int, list[str]]:
    result = runner.invoke(app, list(args), env={"COLUMNS": "200"})
    return result.exit_code, result.output.strip().splitlines()


def test_a_directory_given_as_config_is_one_line(tmp_path: Path) -> None:
    expected = [f"error: config {tmp_path} is a directory, not a TOML file"]
    assert _run("simulate", str(tmp_path)) == (2, expected)
    assert _run("server", "--config", str(tmp_path)) == (2, expected)
    assert _run("client", "--config", str(tmp_path)) == (2, expected)


def test_a_set_typo_names_the_field_it_meant(tmp_path: Path) -> None:
    code, lines = _run("simulate", "--out", str(tmp_path / "run"), "--set", "run.rouds=3")
    assert code == 2
    assert lines == [
        "error: invalid config:",
        "  run.rouds: unknown field; did you mean run.rounds?",
    ]
