"""Differential privacy in whole simulations: config errors, ε in the store, the report and
the registry, the budget, the gate, resume, identity.

Small real runs: breast_cancer split over a few clients, a numpy logistic regression
(``fault_apps``) or the torch tabular app where a published model must be servable, real
SQLite, seeded noise so that runs repeat bit for bit.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedlearn.config.simulation import load_config
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.errors import ConfigError, RunConflict
from fedlearn.privacy.central import CLIP_STATE
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.run.job import run_job

ROOT = Path(__file__).resolve().parents[1]
RUN = "mnist-fedavg"  # the default run name
SIGMA, DELTA = 1.0, 1e-3


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # client apps are named by module


def _config(out: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    settings: dict[str, Any] = {
        "run.out_dir": str(out),
        "run.rounds": 4,
        "run.clients": 10,
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "fault_apps:make_app",
        "client.params": {},
        "strategy.params.fraction_train": 0.5,
        "backend.kind": "inprocess",
        "publish.enabled": False,
        "privacy.mode": "central",
        "privacy.noise_multiplier": SIGMA,
        "privacy.clip": 1.0,
        "privacy.delta": DELTA,
        "privacy.noise": "seeded",
    }
    settings.update(overrides)
    return load_config(None, settings)


@functools.cache
def _fixed_epsilon(rounds: int, population: int = 10, sample: int = 5) -> float:
    """dp-accounting called directly: m of n clients without replacement, sensitivity 2C."""
    event = dp_event.SampledWithoutReplacementDpEvent(
        population, sample, dp_event.GaussianDpEvent(SIGMA / 2)
    )
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    return float(accountant.compose(event, rounds).get_epsilon(DELTA))


def _store(out: Path) -> RunStore:
    return RunStore(out / "run.db", run_id=RUN, read_only=True)


def _epsilons(out: Path) -> list[float]:
    store = _store(out)
    try:
        return [row.epsilon for row in store.privacy_rows()]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy.delta": 0.1}, r"privacy\.delta = 0\.1 must be below 1/clients"),
        ({"strategy.name": "krum"}, "needs a linear weighted-mean strategy"),
        ({"secagg.enabled": True}, "secure aggregation hides"),
        ({"privacy.accountant": "pld"}, "only the RDP accountant supports"),
        ({"privacy.budget": 1.0}, r"privacy\.budget = 1 is exceeded by round 1 alone"),
        ({"privacy.adaptive_clip": True}, r"clipped_count_stddev > 0\.5"),
        ({"privacy.mode": "local", "privacy.adaptive_clip": True}, "for mode = 'central' only"),
        ({"privacy.mode": "distributed"}, "set secagg.enabled = true"),
        ({"privacy.noise_multiplier": 0}, "noise_multiplier"),
        ({"privacy.clip": -1}, "clip"),
    ],
)
def test_impossible_privacy_settings_fail_before_any_round(
    tmp_path: Path, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        run_job(_config(tmp_path / "run", **overrides))
    assert not (tmp_path / "run" / "run.db").exists()


class StopAfter:
    """Raises once round ``round`` has committed (a crash between rounds)."""

    def __init__(self, round: int) -> None:
        self.round = round

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        if round > self.round:
            raise KeyError("stopped")

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        pass


def test_epsilon_per_round_in_the_store_and_the_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    job = run_job(_config(out))
    assert job.outcome.status == "finished"
    expected = [_fixed_epsilon(r) for r in range(1, 5)]
    assert _epsilons(out) == pytest.approx(expected, abs=1e-9)
    assert all(a < b for a, b in itertools.pairwise(expected))
    report = json.loads((out / "report.json").read_text())
    assert [r["epsilon"] for r in report["rounds"]] == pytest.approx(expected, abs=1e-9)
    assert report["delta"] == DELTA
    assert report["epsilon"] == pytest.approx(expected[-1], abs=1e-9)
    header, *rows = (out / "rounds.csv").read_text().splitlines()
    column = header.split(",").index("epsilon")
    assert [float(r.split(",")[column]) for r in rows] == pytest.approx(expected, abs=1e-9)
    assert (out / "privacy_per_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the clip each round used is in its train metrics
    assert [r.train_metrics["dp.clip"] for r in job.outcome.rounds] == [1.0] * 4


def test_budget_stops_before_it_is_exceeded_and_raising_it_continues(tmp_path: Path) -> None:
    out = tmp_path / "run"
    budget = (_fixed_epsilon(2) + _fixed_epsilon(3)) / 2
    job = run_job(_config(out, **{"privacy.budget": budget}))
    assert job.outcome.status == "finished"
    assert [r.round for r in job.outcome.rounds] == [1, 2]
    assert max(_epsilons(out)) <= budget
    assert any("privacy budget reached: round 3 would bring" in n for n in job.outcome.notes)
    store = _store(out)
    kinds = [(e.kind, e.round) for e in store.events()]
    store.close()
    assert kinds == [("started", 0), ("stopped", 2), ("finished", 2)]
    # the budget is operational: raised, the run continues where it stopped
    more = run_job(_config(out, **{"privacy.budget": 100.0}), resume=True)
    assert [r.round for r in more.outcome.rounds] == [1, 2, 3, 4]
    assert _epsilons(out) == pytest.approx([_fixed_epsilon(r) for r in range(1, 5)], abs=1e-9)
    assert any("privacy.budget" in n for n in more.outcome.notes)


def test_resume_after_a_crash_keeps_the_epsilon_series_clip_and_model(tmp_path: Path) -> None:
    adaptive = {
        "privacy.adaptive_clip": True,
        "privacy.clipped_count_stddev": 1.0,
        "privacy.clip": 0.05,
        "privacy.sampling": "poisson",
    }
    full = run_job(_config(tmp_path / "full", **adaptive))
    with pytest.raises(KeyError):
        run_job(_config(tmp_path / "cut", **adaptive), observer=StopAfter(2))  # type: ignore[arg-type]
    assert len(_epsilons(tmp_path / "cut")) == 2
    resumed = run_job(_config(tmp_path / "cut", **adaptive), resume=True)
    assert resumed.result is not None and full.result is not None
    assert [r.round for r in resumed.result.rounds] == [3, 4]
    assert _epsilons(tmp_path / "cut") == _epsilons(tmp_path / "full")
    clips = [r.train_metrics["dp.clip"] for r in full.outcome.rounds]
    assert clips[0] == 0.05 and len(set(clips)) == 4  # the clip adapted every round
    assert [r.train_metrics["dp.clip"] for r in resumed.outcome.rounds] == clips
    assert float(resumed.result.state[CLIP_STATE]) == float(full.result.state[CLIP_STATE])
    a = load_weights(tmp_path / "full" / "model.safetensors")
    b = load_weights(tmp_path / "cut" / "model.safetensors")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    # Poisson sampling: q = 0.5 each round, whatever the sample size
    event = dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(SIGMA))
    reference = RdpAccountant().compose(event, 4).get_epsilon(DELTA)
    assert _epsilons(tmp_path / "full")[-1] == pytest.approx(reference, abs=1e-9)


def test_privacy_settings_are_identity(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_job(_config(out, **{"run.rounds": 1}))
    with pytest.raises(RunConflict, match=r"privacy\.noise_multiplier: 1\.0 -> 2\.0"):
        run_job(_config(out, **{"privacy.noise_multiplier": 2.0}), resume=True)


def test_local_dp_asks_clients_and_accounts_each_one(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = {"privacy.mode": "local", "privacy.noise_multiplier": 4.0}
    run_job(_config(out, **overrides))
    store = _store(out)
    try:
        train = [c for c in store.clients(Stage.TRAIN) if c.ok]
        rows = store.privacy_rows()
    finally:
        store.close()
    # every client's runtime applied what its task asked and reported only that (its app's
    # own training metrics stay on the client)
    assert {tuple(sorted(c.metrics.items())) for c in train} == {
        (("dp.clip", 1.0), ("dp.noise_multiplier", 4.0))
    }
    counts = np.bincount([c.client_id for c in train])
    local = dp_event.GaussianDpEvent(2.0)  # sigma * C noise, sensitivity 2C
    expected = RdpAccountant().compose(local, int(counts.max())).get_epsilon(DELTA)
    assert rows[-1].epsilon == pytest.approx(expected, abs=1e-9)
    assert set(rows[-1].events["clients"]) == {
        str(c.client_id) for c in train if c.round == rows[-1].round
    }


def test_a_client_that_reports_no_dp_leaves_the_run_without_a_guarantee() -> None:
    # fedlearn's client runtime always reports what it applied; a client that does not (a
    # foreign or tampered runtime) gives the run no guarantee at all, never a made-up one
    from fedlearn.config.simulation import PrivacySection
    from fedlearn.run.builders import make_privacy
    from fedlearn.strategy import build_strategy

    _, tracker = make_privacy(
        PrivacySection(mode="local", delta=DELTA),
        build_strategy("fedavg", {}),
        num_clients=10,
        seed=0,
        secure=None,
    )
    assert tracker is not None
    reports = ClientRecord(1, Stage.TRAIN, 0, True, 10, metrics={"dp.noise_multiplier": 4.0})
    silent = ClientRecord(1, Stage.TRAIN, 1, True, 10, metrics={"loss": 0.3})
    row = tracker.record(RoundRecord(1, True, 2, 2), [reports, silent])
    assert row.epsilon == float("inf")


def test_registry_versions_carry_epsilon_and_the_gate_refuses_above_max(tmp_path: Path) -> None:
    out = tmp_path / "run"
    limit = (_fixed_epsilon(1) + _fixed_epsilon(2)) / 2
    config = _config(
        out,
        **{
            "run.rounds": 2,
            "client.app": "clients.tabular:make_app",
            "client.params": {"epochs": 1, "batch_size": 32, "lr": 0.05},
            "publish.enabled": True,
            "publish.every": 1,
            "publish.model": "dp",
            "publish.gate.max_epsilon": limit,
            "publish.gate.tolerance": 1.0,
        },
    )
    job = run_job(config)
    with ModelRegistry(tmp_path / "registry") as registry:
        versions = registry.versions("dp")
    assert [v.metrics["dp.epsilon"] for v in versions] == pytest.approx(
        [_fixed_epsilon(1), _fixed_epsilon(2)], abs=1e-9
    )
    assert all(v.metrics["dp.delta"] == DELTA for v in versions)
    decisions = [p.decision for p in job.published]
    assert decisions[0].promoted
    assert not decisions[1].promoted and "exceeds the gate's max_epsilon" in decisions[1].reason


def test_a_seeded_central_dp_run_replays_exactly_and_a_secure_one_is_refused(
    tmp_path: Path,
) -> None:
    from fedlearn.run.replay import replay_run

    out = tmp_path / "run"
    run_job(
        _config(
            out,
            **{"run.rounds": 2, "privacy.adaptive_clip": True, "privacy.clipped_count_stddev": 1.0},
        )
    )
    replay = replay_run(out)
    assert replay.differences == []
    secure = tmp_path / "secure"
    run_job(_config(secure, **{"run.rounds": 1, "privacy.noise": "secure"}))
    with pytest.raises(ConfigError, match="secure differential-privacy noise cannot be replayed"):
        replay_run(secure)


def test_the_round_table_shows_epsilon(tmp_path: Path) -> None:
    from rich.console import Console

    from fedlearn.report.console import print_report
    from fedlearn.report.summary import summarize

    out = tmp_path / "run"
    run_job(_config(out, **{"run.rounds": 2}))
    store = _store(out)
    try:
        report = summarize(store)
    finally:
        store.close()
    console = Console(record=True, width=160)
    print_report(report, console)
    text = console.export_text()
    assert "ε" in text and f"ε at δ = {DELTA:g}" in text
    assert f"{_fixed_epsilon(2):.4g}" in text and f"{_fixed_epsilon(1):.4g}" in text
    assert report.epsilon == pytest.approx(_fixed_epsilon(2), abs=1e-9)


def _toml(config: dict[str, Any]) -> str:
    """A config as TOML (JSON's strings, numbers and booleans are TOML's; nulls left out)."""

    def value(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items() if x is not None) + "}"
        return json.dumps(v)

    lines = []
    for section, fields in config.items():
        if fields is None:  # an optional section left out
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in fields.items() if v is not None]
    return "\n".join(lines) + "\n"


def test_kill_9_mid_run_then_resume_keeps_the_epsilon_series(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys
    import time

    from run_state import committed_round

    settings: dict[str, Any] = {
        "run.rounds": 4,
        "client.params": {"sleep_round": 3, "sleep_s": 0.4},  # round 3 is slow: kill it
        "privacy.adaptive_clip": True,
        "privacy.clipped_count_stddev": 1.0,
        "privacy.clip": 0.05,
    }
    run_job(_config(tmp_path / "full", **settings))
    config = _config(tmp_path / "cut", **settings).model_dump(mode="json")
    (tmp_path / "cut.toml").write_text(_toml(config))
    sets = [str(tmp_path / "cut.toml")]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    cli = [sys.executable, "-m", "fedlearn.cli", "simulate"]
    proc = subprocess.Popen(
        [*cli, *sets], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    db = tmp_path / "cut" / "run.db"
    try:
        deadline = time.monotonic() + 120
        while committed_round(db, RUN) < 2:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no round committed in time"
            time.sleep(0.02)
    finally:
        proc.kill()  # SIGKILL: no clean point, no goodbye
        proc.wait(timeout=30)
    cut = _epsilons(tmp_path / "cut")
    assert 2 <= len(cut) < 4
    assert cut == _epsilons(tmp_path / "full")[: len(cut)]
    resumed = subprocess.run(
        [*cli, "--out", str(tmp_path / "cut"), "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _epsilons(tmp_path / "cut") == _epsilons(tmp_path / "full")
    a = load_weights(tmp_path / "full" / "model.safetensors")
    b = load_weights(tmp_path / "cut" / "model.safetensors")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
