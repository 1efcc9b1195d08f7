"""No command deletes or overwrites a committed round or a published version unasked.

One run publishes a version every round; then every command a user might run against its
directory and registry runs in turn — starting it again, resuming it with an identity
change, resuming it finished, continuing it, reporting on it, the registry commands, and
finally starting over with the explicit ``--new-run``. After each, every committed round
and client row is still there unchanged (in the run directory, or after ``--new-run`` in
the directory it moved to), and every published version's row and file are unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlearn.cli.main import app
from run_state import table_rows

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SETS = {
    "run.rounds": "2",
    "run.clients": "4",
    "data.dataset": "breast_cancer",
    "data.partitioner": "iid",
    "client.app": "clients.tabular:make_app",
    "client.params.epochs": "1",
    "strategy.params.min_train_clients": "2",
    "backend.kind": "inprocess",
    "publish.every": "1",
    "publish.model": "tab",
}


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def _committed(run_dirs: list[Path]) -> set[tuple[str, str]]:
    """Round and client rows of every run directory (the run and where it moved)."""
    rows: set[tuple[str, str]] = set()
    for d in run_dirs:
        if (d / "run.db").exists():
            tables = table_rows(d / "run.db", ("rounds", "client_results", "published"))
            rows |= {(table, row) for table, found in tables.items() for row in found}
    return rows


def _published(registry: Path) -> tuple[set[tuple[str, str]], dict[str, str]]:
    files = {
        str(p.relative_to(registry)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in registry.rglob("*")
        if p.is_file() and not p.name.startswith("registry.db")
    }
    versions = table_rows(registry / "registry.db", ("versions",))["versions"]
    return {("versions", row) for row in versions}, files


def _simulate(out: Path, *extra: str, **sets: str) -> tuple[int, str]:
    args = ["simulate", "--out", str(out), "--no-check-serving", *extra]
    for key, value in {**SETS, **sets}.items():
        args += ["--set", f"{key}={value}"]
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def test_no_command_deletes_or_overwrites_committed_rounds_or_versions(tmp_path: Path) -> None:
    out, registry = tmp_path / "run", tmp_path / "registry"
    code, output = _simulate(out)
    assert code == 0, output
    rounds = _committed([out])
    versions, files = _published(registry)
    assert len({r for r in rounds if r[0] == "rounds"}) == 2 and len(versions) == 2

    def unchanged(what: str) -> None:
        assert rounds <= _committed([out, tmp_path / "run.1"]), what
        now_versions, now_files = _published(registry)
        assert versions <= now_versions, what
        assert {k: now_files.get(k) for k in files} == files, what

    steps: list[tuple[str, list[str], dict[str, str], int]] = [
        ("the same run again", [], {}, 2),
        ("another strategy, same directory", [], {"strategy.name": "fedavgm"}, 2),
        ("resume with another seed", ["--resume"], {"run.seed": "4"}, 2),
        ("resume a finished run", ["--resume"], {}, 0),
        ("resume with more rounds", ["--resume"], {"run.rounds": "3"}, 0),
    ]
    for what, extra, sets, expected in steps:
        code, output = _simulate(out, *extra, **sets)
        assert code == expected, (what, output)
        unchanged(what)
    rounds, (versions, files) = _committed([out]), _published(registry)  # round 3 added

    for args in (
        ["report", str(out)],
        ["models", "list", "--registry", str(registry)],
        ["models", "show", "tab", "--registry", str(registry)],
        ["models", "promote", "tab", "1", "--force", "--registry", str(registry)],
        ["models", "rollback", "tab", "--registry", str(registry)],
        ["models", "alias", "tab", "staging", "2", "--registry", str(registry)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
        unchanged(" ".join(args))

    code, output = _simulate(out, "--new-run")  # the explicit flag: moves, still deletes none
    assert code == 0, output
    assert (tmp_path / "run.1" / "run.db").is_file()
    unchanged("--new-run")
    assert len(_published(registry)[0]) == len(versions) + 2  # the new run's versions added
