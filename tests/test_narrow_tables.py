"""Tables stay readable in an 80-column terminal: no line longer, no word cut in two."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from fedlearn.cli.main import app
from fedlearn.engine.messages import Stage
from fedlearn.registry.model_registry import Gate, ModelRegistry
from fedlearn.report.console import first_fitting, print_report
from fedlearn.report.summary import ClientFailure, MetricSummary, Report, RoundSummary
from fedlearn.strategy import STRATEGIES

runner = CliRunner()


def _cli(columns: int, *args: str) -> list[str]:
    result = runner.invoke(app, list(args), env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def _tokens(lines: list[str]) -> set[str]:
    return {word.rstrip(",.") for line in lines for word in line.split()}


# --------------------------------------------------------------------------- strategies


def test_strategies_fit_80_columns_with_every_setting_whole() -> None:
    lines = _cli(80, "strategies")
    assert max(len(line) for line in lines) <= 80
    assert re.match(r"strategy +kind +settings", lines[0])
    assert any(
        re.match(r"fedyogi +linear +eta=0\.01, eta_l=0\.0316, tau=0\.001,", s) for s in lines
    )
    assert any(re.match(r"fedtrimmedavg +holistic +beta=0\.2", line) for line in lines)
    tokens = _tokens(lines)
    for cls in STRATEGIES.values():
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert f"{f.name}={f.default!r}" in tokens
    assert "Every strategy also takes fraction_train=1.0, fraction_evaluate=1.0," in lines[-2]


def test_strategies_on_a_wide_terminal_keep_each_row_on_one_line() -> None:
    lines = _cli(160, "strategies")
    yogi = [line for line in lines if line.startswith("fedyogi ")]
    assert len(yogi) == 1 and yogi[0].rstrip().endswith("beta_1=0.9, beta_2=0.99")
    assert lines[-1] == (
        "Every strategy also takes fraction_train=1.0, fraction_evaluate=1.0, "
        "min_train_clients=1, min_evaluate_clients=1."
    )


# --------------------------------------------------------------------------- models list

LONG_MODEL = "shakespeare-fedadam-dirichlet"
LONG_RUN = "shakespeare-fedadam-dirichlet-run-2"
SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}],
}


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    with ModelRegistry(tmp_path) as reg:
        for name, run in (("mnist-fedavg", "mnist-fedavg"), (LONG_MODEL, LONG_RUN)):
            for i in range(3):
                v = reg.publish(
                    name,
                    {"w": np.zeros(2, np.float32)},
                    run=run,
                    round=10 * (i + 1),
                    metrics={"accuracy": 0.9123 + i / 100, "loss": 0.2345},
                    client_summary=None,
                    factory="clients.mnist:build_model",
                    signature=SIGNATURE,
                )
                reg.promote(name, v.version, Gate("accuracy"))
    return tmp_path


def test_models_list_fits_80_columns(registry: Path) -> None:
    lines = _cli(80, "models", "list", "--registry", str(registry))
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == ["model", "version", "aliases", "metrics"]
    rows = [line.split() for line in lines if line.startswith(("mnist-fedavg ", LONG_MODEL))]
    assert [(row[0], row[1]) for row in rows] == [
        ("mnist-fedavg", "1"),
        ("mnist-fedavg", "2"),
        ("mnist-fedavg", "3"),
        (LONG_MODEL, "1"),
        (LONG_MODEL, "2"),
        (LONG_MODEL, "3"),
    ]
    assert rows[2][2:5] == ["latest,", "production", "accuracy=0.9323,"]
    assert {"accuracy=0.9123", "loss=0.2345"} <= _tokens(lines)
    assert "not shown at this width: published, round, run (see models show)" in " ".join(
        " ".join(lines).split()
    )


def test_models_list_on_a_wide_terminal_shows_every_column(registry: Path) -> None:
    lines = _cli(200, "models", "list", "--registry", str(registry))
    assert lines[0].split() == [
        "model",
        "version",
        "aliases",
        "run",
        "round",
        "metrics",
        "published",
    ]
    row = [line for line in lines if line.startswith(LONG_MODEL)][2].split()
    assert row[:7] == [LONG_MODEL, "3", "latest,", "production", LONG_RUN, "30", "accuracy=0.9323,"]
    assert not any("not shown" in line for line in lines)


# --------------------------------------------------------------------------- report


def _metric(name: str, mean: float, worst: float, client: int) -> MetricSummary:
    lower = name == "loss"
    return MetricSummary(name, lower, 1000, 50_000, mean, worst, client, 0.4667, mean, 0.9623)


def _round(number: int) -> RoundSummary:
    metrics = {
        "accuracy": _metric("accuracy", 0.9123, 0.4567, 1234),
        "loss": _metric("loss", 0.2345, 123.4567, 987),
    }
    return RoundSummary(number, True, None, 1.0, 1000, 998, 2, 1000, 1000, 0, metrics, {}, {})


REPORT = Report(
    run_id="mnist-fedavg",
    status="finished",
    seed=0,
    created=None,
    config={},
    metric_names=("loss", "accuracy"),
    rounds=tuple(_round(n) for n in range(1, 4)),
    failures=(ClientFailure(2, Stage.TRAIN, 17, "timeout after 30s"),),
    clients=(),
)


def _report_lines(width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    print_report(REPORT, console)
    return console.export_text().splitlines()


def test_report_rounds_fit_80_columns() -> None:
    lines = _report_lines(80)
    assert max(len(line) for line in lines) <= 80
    header = {word for line in lines[1:4] for word in line.split()}  # headers wrap at words
    assert header == {"round", "status", "train", "eval", "acc", "mean", "worst", "(client)",
                      "p50", "p90", "loss"}  # fmt: skip
    assert lines[4] == "─" * 80
    assert lines[5].split() == [
        "1", "ok", "998/1000", "1000/1000", "0.9123", "0.4567", "0.9123", "0.9623", "0.2345",
        "123.4567",
    ]  # fmt: skip
    assert lines[6].split() == ["(#1234)", "(#987)"]  # worst: value, then client below it
    caption = " ".join(" ".join(lines[11:13]).split())
    assert caption.endswith("not shown at this width: acc p10")


def test_report_on_a_wide_terminal_shows_every_column() -> None:
    lines = _report_lines(200)
    row = [line for line in lines if line.startswith("    1")]
    assert len(row) == 1 and re.split(r"\s{2,}", row[0].strip()) == [
        "1", "ok", "998/1000", "1000/1000", "0.9123", "0.4567 (#1234)", "0.4667", "0.9123",
        "0.9623", "0.2345", "123.4567 (#987)",
    ]  # fmt: skip
    assert not any("not shown" in line for line in lines)


# --------------------------------------------------------------------------- fitting


def test_fitting_never_cuts_a_word_where_rich_would() -> None:
    # rich alone narrows the widest wrapping column first: at 40 columns it cuts the
    # 28-letter word to "aaaaaaaaaaaaaaaaa…"; fitted, the other column wraps instead
    table = Table("long", "short", box=None)
    table.add_row("a" * 28 + " bbb", " ".join(["cc"] * 8))
    console = Console(width=40, record=True, color_system=None)
    console.print(first_fitting(console, [table]))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 40
    assert [line.split() for line in lines] == [
        ["long", "short"],
        ["a" * 28, "cc", "cc"],
        ["bbb", "cc", "cc"],
        ["cc", "cc"],
        ["cc", "cc"],
    ]
