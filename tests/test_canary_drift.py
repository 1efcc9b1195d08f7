"""Drift as a canary rule: ``LiveGate.max_drift_psi`` judged on the candidate's own rolling
drift statistics (the endpoint's drift monitor), through the REST app in-process as the
other traffic tests; its storage, its CLI option and the endpoint's wiring."""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import traffic_models as tm
from test_serving_traffic import Served, encode, get_json, logits, post_many
from typer.testing import CliRunner

from fedlearn.cli.main import app as cli
from fedlearn.drift.reference import Reference, save_reference
from fedlearn.drift.stats import SummarySpec, summarize
from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.registry.traffic import Canary, LiveGate, policy_from_json, policy_to_json
from fedlearn.serving.drift import DriftMonitor
from fedlearn.serving.endpoint import EndpointSettings, start_endpoint

SPEC = SummarySpec(bins=8, low=-3.0, high=3.0, features=tm.FEATURES, classes=tm.CLASSES)
MIN_ROWS = 100
MAX_PSI = 0.2


def _reference(root: Path, version: int) -> None:
    """Version ``version``'s training reference: standard normal rows (as tm.rows)."""
    rng = np.random.default_rng(77)
    x = rng.standard_normal((4000, tm.FEATURES)).astype(np.float32)
    y = rng.integers(0, tm.CLASSES, 4000)
    with ModelRegistry(root) as registry:
        save_reference(registry.get(tm.NAME, version).path, Reference(SPEC, summarize(x, y, SPEC)))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """v1 (no reference), v2 (production) and v3 with references; a drift monitor."""
    modules = tm.publish(tmp_path, (0, 1, 2), production=2)
    for version in (2, 3):
        _reference(tmp_path, version)
    monitor = DriftMonitor(threshold=MAX_PSI, window=2000, min_rows=MIN_ROWS)
    s = Served(tmp_path, modules, drift=monitor)
    s.metrics.monitor_drift(monitor)
    yield s
    s.close()


def _canary(served: Served, candidate: int, steps: tuple[float, ...] = (0.5, 1.0)) -> None:
    gate = LiveGate(min_requests=10, max_drift_psi=MAX_PSI)
    served.registry.set_traffic(
        tm.NAME, Canary(candidate, 2, steps=steps, step_requests=30, gate=gate)
    )
    served.router.refresh()


def _run(served: Served, xs: list[np.ndarray]) -> list[tuple[int, dict[str, Any]]]:
    """Send ``xs`` in rounds of 20, judging after each, until the canary is decided; every
    answer must be the answering version's own."""
    answers: list[tuple[int, dict[str, Any]]] = []
    for start in range(0, len(xs), 20):
        answers += post_many(served.app, [encode(x) for x in xs[start : start + 20]])
        served.router.refresh()
        if served.router.policy(tm.NAME) is None:
            break
    for x, (status, answer) in zip(xs, answers, strict=False):
        assert status == 200, answer
        module = served.modules[int(answer["model_version"]) - 1]
        np.testing.assert_array_equal(logits(answer), tm.predict(module, x))
    return answers


def test_a_candidate_fed_shifted_inputs_is_rolled_back_on_drift(served: Served) -> None:
    _canary(served, 3)
    xs = [tm.rows(2, seed=i) + np.float32(2.0) for i in range(1000)]  # 2 std off its reference
    _run(served, xs[:20])
    meta = get_json(served.app, f"/v2/models/{tm.NAME}")["traffic"]
    assert meta["policy"]["gate"]["max_drift_psi"] == MAX_PSI
    drift = meta["canary"]["drift"]
    # too few rows to judge yet: neither a verdict nor a step
    assert drift["judged"] is False and 0 < drift["rows"] < MIN_ROWS
    assert drift["min_rows"] == MIN_ROWS and drift["note"] is None
    answers = _run(served, xs[20:])
    assert served.router.policy(tm.NAME) is None, "the canary was not rolled back"
    assert len(answers) < len(xs) - 20
    decisions = served.registry.decisions(tm.NAME)
    last = decisions[-1]
    assert last.action == "canary-rollback" and last.version == 3 and not last.promoted
    assert "drift PSI" in last.reason and f"> {MAX_PSI:g} (v3's inputs" in last.reason
    psi = float(last.reason.split("drift PSI ")[1].split()[0])
    assert psi > MAX_PSI
    rows = int(last.reason.split(" rows")[0].rsplit(" ", 1)[1])
    assert rows >= MIN_ROWS
    # the candidate had its step's requests long before; the drift rule held the step
    assert "canary-step" not in [d.action for d in decisions]
    assert served.registry.aliases(tm.NAME)["production"] == 2
    assert served.registry.traffic(tm.NAME) is None
    errors = served.metrics.registry.get_sample_value(
        "fedlearn_serving_requests_total",
        {"model": tm.NAME, "protocol": "rest", "outcome": "error"},
    )
    assert errors is None


def test_the_same_canary_on_in_distribution_inputs_is_promoted(served: Served) -> None:
    _canary(served, 3)
    xs = [tm.rows(2, seed=5000 + i) for i in range(1000)]
    _run(served, xs)
    assert served.router.policy(tm.NAME) is None, "the canary was not decided"
    decisions = served.registry.decisions(tm.NAME)
    actions = [(d.action, d.version, d.promoted) for d in decisions]
    assert actions[-4:] == [
        ("route-set", 3, False),
        ("canary-step", 3, False),
        ("canary-promote", 3, True),
        ("promote", 3, True),
    ]
    for decision in decisions[-3:-1]:
        psi = float(decision.reason.split("drift PSI ")[1].split()[0])
        rows = int(decision.reason.split(" rows")[0].rsplit(" ", 1)[1])
        assert psi <= MAX_PSI and rows >= MIN_ROWS, decision.reason
    assert served.registry.aliases(tm.NAME)["production"] == 3


@pytest.mark.parametrize("monitored", [True, False])
def test_a_candidate_without_a_reference_is_not_judged_on_drift(
    served: Served, monitored: bool
) -> None:
    """v1 has no reference; v3 has one but the endpoint keeps no drift statistics."""
    if not monitored:
        served.router.drift = None
    candidate = 1 if monitored else 3
    _canary(served, candidate, steps=(1.0,))
    xs = [tm.rows(2, seed=i) + np.float32(2.0) for i in range(200)]  # drifted: not judged
    _run(served, xs[:20])
    drift = get_json(served.app, f"/v2/models/{tm.NAME}")["traffic"]["canary"]["drift"]
    assert drift["judged"] is False
    _run(served, xs[20:])
    last = served.registry.decisions(tm.NAME)[-2]
    assert last.action == "canary-promote" and last.version == candidate
    note = (
        "drift not judged: v1: the version was published without a training reference"
        if monitored
        else "drift not judged: the endpoint keeps no drift statistics"
    )
    assert note in last.reason and note.split(": ", 1)[1] in drift["note"]


def test_the_drift_rule_round_trips_and_old_policies_load(tmp_path: Path) -> None:
    canary = Canary(3, 2, gate=LiveGate(max_drift_psi=0.25))
    assert policy_from_json(policy_to_json(canary)) == canary
    assert "max_drift_psi" not in policy_to_json(Canary(3, 2))  # unset: as before
    for bad in (-0.1, math.nan, math.inf, True, "0.2"):
        with pytest.raises(ConfigError, match="max_drift_psi"):
            LiveGate(max_drift_psi=bad)  # type: ignore[arg-type]
    tm.publish(tmp_path, (0, 1, 2), production=2)
    with ModelRegistry(tmp_path) as registry:
        registry.set_traffic(tm.NAME, canary)
    # a policy as an earlier fedlearn stored it: a gate of five fields
    old = {
        "kind": "canary",
        "candidate": 3,
        "baseline": 2,
        "steps": [0.05, 1.0],
        "step_requests": 200,
        "step_seconds": None,
        "gate": {
            "max_error_rate": 0.01,
            "max_p95_ms": None,
            "p95_tolerance_ms": None,
            "max_disagreement": None,
            "min_requests": 50,
        },
        "tolerance": 1e-4,
        "step": 0,
        "step_started": 12.5,
    }
    with sqlite3.connect(tmp_path / "registry.db") as db:
        db.execute("UPDATE traffic SET policy = ? WHERE name = ?", (json.dumps(old), tm.NAME))
    with ModelRegistry(tmp_path) as registry:
        stored = registry.traffic(tm.NAME)
    assert stored is not None and isinstance(stored.policy, Canary)
    assert stored.policy.gate == LiveGate() and stored.policy.gate.max_drift_psi is None
    assert stored.policy.steps == (0.05, 1.0) and stored.policy.step_started == 12.5


def _route(root: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, ["models", "route", *args, "--registry", str(root)], env={"COLUMNS": "200"}
    )
    return result.exit_code, result.output


def test_route_max_drift_psi_round_trips_and_refuses_bad_values(tmp_path: Path) -> None:
    tm.publish(tmp_path, (0, 1, 2), production=2)
    for value, words in [
        ("-0.5", "max_drift_psi must be >= 0"),
        ("nan", "max_drift_psi must be a finite number"),
        ("inf", "max_drift_psi must be a finite number"),
    ]:
        code, out = _route(tmp_path, tm.NAME, "--canary", "3", "--max-drift-psi", value)
        assert code == 2 and words in out, (value, out)
    code, out = _route(tmp_path, tm.NAME, "--split", "1=1", "--max-drift-psi", "0.2")
    assert code == 2 and "--max-drift-psi cannot be used with --split" in out, out
    with ModelRegistry(tmp_path) as registry:
        assert registry.traffic(tm.NAME) is None
    code, out = _route(tmp_path, tm.NAME, "--canary", "3", "--max-drift-psi", "0.15")
    assert code == 0 and "canary v3 over v2" in out, out
    with ModelRegistry(tmp_path) as registry:
        stored = registry.traffic(tm.NAME)
    assert stored is not None and isinstance(stored.policy, Canary)
    assert stored.policy.gate == LiveGate(max_drift_psi=0.15)
    code, out = _route(tmp_path, tm.NAME)
    assert code == 0 and '"max_drift_psi": 0.15' in out, out


def test_the_endpoint_hands_its_drift_monitor_to_the_router(tmp_path: Path) -> None:
    tm.publish(tmp_path, (0, 1), production=2)
    _reference(tmp_path, 1)
    with ModelRegistry(tmp_path) as registry:
        registry.set_traffic(tm.NAME, Canary(1, 2, gate=LiveGate(max_drift_psi=0.3)))
    settings = EndpointSettings(
        tmp_path, http_port=0, grpc_port=0, allowed_factories=tm.ALLOWED, poll_interval_s=3600
    )
    with start_endpoint(settings) as ep:
        assert ep.traffic is not None and ep.traffic.drift is ep.metrics.drift
        meta = httpx.get(ep.http_url + f"/v2/models/{tm.NAME}", timeout=10).json()
    drift = meta["traffic"]["canary"]["drift"]
    assert drift == {"judged": False, "psi": 0.0, "rows": 0, "min_rows": 100, "note": None}
    assert meta["traffic"]["policy"]["gate"]["max_drift_psi"] == 0.3
