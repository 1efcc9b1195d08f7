"""``fedlearn models route``: set, show and clear traffic policies, with clear errors."""

from __future__ import annotations

from pathlib import Path

import traffic_models as tm
from typer.testing import CliRunner

from fedlearn.cli.main import app
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.registry.traffic import Canary, LiveGate, Shadow, Split

runner = CliRunner()


def _run(root: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(
        app, ["models", "route", *args, "--registry", str(root)], env={"COLUMNS": "200"}
    )
    return result.exit_code, result.output


def test_route_sets_shows_and_clears_each_policy(tmp_path: Path) -> None:
    tm.publish(tmp_path, (0, 1, 2), production=2)
    code, out = _run(tmp_path, "mlp")
    assert code == 0 and "no traffic policy; requests go to production (v2)" in out
    code, out = _run(tmp_path, "mlp", "--split", "1=90,2=10")
    assert code == 0 and "split v1 90.0%, v2 10.0%" in out, out
    code, out = _run(tmp_path, "mlp", "--shadow", "3", "--sample", "0.5")
    assert code == 0 and "shadow to v3 (50% of requests)" in out, out
    code, out = _run(
        tmp_path,
        "mlp",
        "--canary",
        "3",
        "--steps",
        "10,50,100",
        "--step-requests",
        "500",
        "--max-error-rate",
        "0.02",
        "--max-p95-ms",
        "25",
        "--max-disagreement",
        "0.1",
        "--reason",
        "ticket 42",
    )
    assert code == 0 and "canary v3 over v2, step 1/3 (10%" in out, out
    with ModelRegistry(tmp_path) as registry:
        stored = registry.traffic("mlp")
    assert stored is not None and isinstance(stored.policy, Canary)
    assert stored.policy.steps == (0.1, 0.5, 1.0) and stored.policy.step_requests == 500
    assert stored.policy.gate == LiveGate(0.02, 25.0, None, 0.1, 50)
    code, out = _run(tmp_path, "mlp")
    assert code == 0 and "canary v3 over v2" in out and "max_disagreement" in out, out
    code, out = _run(tmp_path, "mlp", "--clear")
    assert code == 0 and "cleared" in out
    code, out = _run(tmp_path, "mlp", "--clear")
    assert code == 2 and "has no traffic policy" in out
    with ModelRegistry(tmp_path) as registry:
        assert registry.traffic("mlp") is None
        log = [(d.action, d.reason) for d in registry.decisions("mlp")]
    assert [a for a, _ in log if a.startswith("route")] == [
        "route-set",
        "route-set",
        "route-set",
        "route-clear",
    ]
    assert "(ticket 42)" in log[-2][1]


def test_route_refuses_bad_input_and_changes_nothing(tmp_path: Path) -> None:
    tm.publish(tmp_path, (0, 1), production=2)
    with ModelRegistry(tmp_path) as registry:
        registry.set_traffic("mlp", Shadow(1))
    for args, words in [
        (("--split", "1=50,7=50"), "has no version 7"),
        (("--split", "1=0,2=0"), "must add up to a positive number"),
        (("--split", "1=5,2=abc"), "not a number"),
        (("--split", "one=5"), "VERSION=WEIGHT"),
        (("--shadow", "9"), "has no version 9"),
        (("--shadow", "1", "--sample", "1.5"), "sample must be in (0, 1]"),
        (("--canary", "2"), "already the baseline"),
        (("--canary", "1", "--steps", "50,25"), "steps must increase"),
        (("--canary", "1", "--max-error-rate", "-1"), "max_error_rate"),
        (("--split", "1=1", "--shadow", "1"), "not several"),
        (("--split", "1=1", "--steps", "5,100"), "--steps cannot be used with --split"),
        (("--sample", "0.5"), "without --split, --shadow or --canary"),
    ]:
        code, out = _run(tmp_path, "mlp", *args)
        assert code == 2 and words in out, (args, out)
    code, out = _run(tmp_path, "nope", "--shadow", "1")
    assert code == 2 and "model 'nope' does not exist" in out
    with ModelRegistry(tmp_path) as registry:
        stored = registry.traffic("mlp")
        assert stored is not None and stored.policy == Shadow(1)
        assert [d.action for d in registry.decisions("mlp")].count("route-set") == 1
    assert Split({1: 1}).describe() == "split v1 100.0%"
