"""The run's event bus and the live page's state, without a browser (real runs, real HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlearn.config.simulation import load_config
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.run.job import run_job
from fedlearn.ui.events import Event, EventBus

ROOT = Path(__file__).resolve().parents[1]


def test_a_bus_without_subscribers_builds_nothing() -> None:
    bus = EventBus()

    class Exploding(ClientRecord):
        @property
        def stage(self) -> Stage:  # type: ignore[override]
            raise AssertionError("a payload was built with nobody listening")

    record = Exploding.__new__(Exploding)
    bus.reply_received(record)
    bus.round_finished(RoundRecord(1, True, 2, 2))
    bus.stage_started(1, Stage.TRAIN, 2)
    assert not bus.active


def test_subscribers_get_every_event_in_order_and_a_round_start() -> None:
    bus = EventBus()
    seen: list[Event] = []
    unsubscribe = bus.subscribe(seen.append)
    bus.stage_started(1, Stage.TRAIN, 2)
    bus.reply_received(ClientRecord(1, Stage.TRAIN, 0, False, error="boom"))
    bus.stage_started(1, Stage.EVALUATE, 2)
    bus.reply_received(ClientRecord(1, Stage.EVALUATE, 1, True, 5, float("nan"), {"a": 1.0}))
    bus.round_finished(RoundRecord(1, True, 2, 1))
    bus.published(1, "m", 3, False, "worse than v2")
    unsubscribe()
    bus.status("finished", 1)
    kinds = [e.kind for e in seen]
    assert kinds == [
        "round_started",
        "stage",
        "client",
        "stage",
        "client",
        "round_ended",
        "published",
    ]
    assert [e.seq for e in seen] == list(range(1, 8))
    assert seen[2].data["error"] == "boom" and seen[2].data["ok"] is False
    assert seen[4].data["loss"] is None  # NaN has no JSON
    json.dumps([e.data for e in seen], allow_nan=False)


def test_a_failing_subscriber_does_not_reach_the_run() -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("watcher bug")

    bus.subscribe(broken)
    bus.subscribe(lambda e: seen.append(e.kind))
    bus.status("finished", 3)
    assert seen == ["status"]


def test_a_simulation_emits_its_rounds_clients_failures_and_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    config = load_config(
        None,
        {
            "run.rounds": 2,
            "run.clients": 3,
            "run.out_dir": str(tmp_path / "run"),
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "ui_apps:make_app",
            "client.params": {"fail_client": 2, "sleep_s": 0.0},
            "strategy.params.min_train_clients": 1,
            "backend.kind": "inprocess",
            "publish.model": "bc",
        },
    )
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    job = run_job(config, events=bus)
    assert job.outcome.status == "finished"
    kinds = [e.kind for e in seen]
    assert kinds[0] == "run" and kinds[-1] == "status"
    assert kinds.count("round_started") == 2 and kinds.count("round_ended") == 2
    failures = [e.data for e in seen if e.kind == "client" and not e.data["ok"]]
    assert {(f["round"], f["stage"], f["client"]) for f in failures} == {
        (1, "train", 2),
        (2, "train", 2),
    }
    assert all("client 2 refuses to train" in f["error"] for f in failures)
    [published] = [e.data for e in seen if e.kind == "published"]
    assert (published["model"], published["version"], published["round"]) == ("bc", 1, 2)
    assert seen[-1].data["status"] == "finished"


def test_simulate_ui_serves_the_page_and_a_snapshot_that_matches_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.testclient import TestClient
    from typer.testing import CliRunner

    from fedlearn.cli.main import app
    from fedlearn.engine.store import RunStore
    from fedlearn.report.summary import summarize
    from fedlearn.ui.app import build_app
    from fedlearn.ui.state import LiveState

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    args = [
        "simulate",
        "--out",
        str(out),
        "--rounds",
        "2",
        "--clients",
        "3",
        "--backend",
        "inprocess",
        "--set",
        "data.dataset=breast_cancer",
        "--set",
        "client.app=ui_apps:make_app",
        "--set",
        "client.params.fail_client=1",
        "--set",
        "strategy.params.min_train_clients=1",
        "--no-check-serving",
        "--ui",
        "--ui-port",
        "0",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "live page: http://127.0.0.1:" in result.output
    # the finished run, from its store, over real HTTP (Starlette's TestClient)
    with TestClient(build_app(LiveState(out / "run.db", None))) as http:
        page = http.get("/")
        assert (
            page.status_code == 200
            and "default-src 'self'" in page.headers["content-security-policy"]
        )
        assert '<script src="/static/app.js"' in page.text
        assert http.get("/static/app.js").status_code == 200
        snap = http.get("/api/snapshot").json()
        assert http.get("/api/events").text.startswith("event: end")
    store = RunStore(out / "run.db", read_only=True)
    store.run_id = store.run_ids()[0]
    report = summarize(store)
    store.close()
    assert snap["live"] is False and snap["run"]["status"] == "finished"
    assert [r["round"] for r in snap["rounds"]] == [1, 2]
    for shown, expected in zip(snap["rounds"], report.rounds, strict=True):
        acc = expected.metrics["accuracy"]
        assert shown["metrics"]["accuracy"]["mean"] == pytest.approx(acc.mean)
        assert shown["metrics"]["accuracy"]["worst_client"] == acc.worst_client
        assert shown["metrics"]["accuracy"]["p10"] == pytest.approx(acc.p10)
        assert sorted(d["client"] for d in shown["dots"]) == [0, 1, 2]
    assert {(f["round"], f["client"]) for f in snap["failures"]} == {(1, 1), (2, 1)}
    assert [p["version"] for p in snap["publications"]] == [1]


def test_a_page_gets_the_events_it_missed_then_the_new_ones_then_the_end(
    tmp_path: Path,
) -> None:
    import asyncio

    from fedlearn.ui.state import LiveState

    bus = EventBus()
    state = LiveState(tmp_path / "run.db", None, bus, clients=range(2))
    bus.run_started("r", 2, 1)
    bus.stage_started(1, Stage.TRAIN, 2)  # events 2 (round_started) and 3 (stage)

    async def page() -> tuple[list[int], list[int | None], dict[str, object]]:
        listener, missed = state.listen(asyncio.get_running_loop(), after=1)
        bus.reply_received(ClientRecord(1, Stage.TRAIN, 0, True, 5))  # from the run's thread
        await asyncio.to_thread(bus.reply_received, ClientRecord(1, Stage.TRAIN, 1, False))
        await asyncio.wait_for(listener.ready.wait(), 5)
        got: list[int | None] = [e.seq for e in listener.take() if e is not None]
        snapshot = state.snapshot()
        state.close()
        await asyncio.wait_for(listener.ready.wait(), 5)
        got += [None if e is None else e.seq for e in listener.take()]
        return [e.seq for e in missed], got, snapshot

    missed, got, snapshot = asyncio.run(page())
    assert missed == [2, 3] and got == [4, 5, None]
    assert snapshot["seq"] == 5 and snapshot["round"] == 1
    assert snapshot["stages"] == [{"stage": "train", "tasks": 2, "ok": 1, "failed": 1}]
    assert [f["client"] for f in snapshot["failures"]] == [1]  # not committed yet: live
    assert state.listeners == 0


def test_secure_aggregation_stages_dropouts_and_epsilon_reach_the_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Distributed DP under SecAgg+: the stages' progress, a client that drops out of
    the setup stage, and each round's ε, in the events and in the page's state."""
    from fedlearn.engine.store import RunStore
    from fedlearn.ui.state import LiveState

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    config = load_config(
        None,
        {
            "run.out_dir": str(out),
            "run.rounds": 2,
            "run.clients": 6,
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "fault_apps:make_app",
            "client.params": {"fail_rounds": "2", "fail_client": 3},
            "strategy.params.min_train_clients": 4,
            "backend.kind": "inprocess",
            "publish.enabled": False,
            "secagg.enabled": True,
            "privacy.mode": "distributed",
            "privacy.noise_multiplier": 1.0,
            "privacy.clip": 1.0,
            "privacy.delta": 1e-3,
            "privacy.noise": "seeded",
        },
    )
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    state = LiveState(out / "run.db", None, bus)
    assert run_job(config, events=bus).outcome.status == "finished"
    stages = [e.data["stage"] for e in seen if e.kind == "stage" and e.data["round"] == 2]
    assert stages[:4] == ["secagg-setup", "secagg-keys", "secagg-shares", "secagg-unmask"]
    [dropout] = [e.data for e in seen if e.kind == "client" and not e.data["ok"]]
    assert (dropout["round"], dropout["stage"], dropout["client"]) == (2, "secagg-setup", 3)
    assert "injected training failure" in dropout["error"]
    store = RunStore(out / "run.db", read_only=True)
    store.run_id = store.run_ids()[0]
    expected = [row.epsilon for row in store.privacy_rows()]
    store.close()
    emitted = [e.data["epsilon"] for e in seen if e.kind == "privacy"]
    assert emitted == expected and len(expected) == 2 and expected[0] < expected[1]
    snapshot = state.snapshot()
    assert snapshot["epsilon"] == expected[-1] and snapshot["delta"] == 1e-3
    assert [r["epsilon"] for r in snapshot["rounds"]] == expected
    setup = next(s for s in snapshot["stages"] if s["stage"] == "secagg-setup")
    assert (setup["ok"], setup["failed"]) == (5, 1)
    state.close()
