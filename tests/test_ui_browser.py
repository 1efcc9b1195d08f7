"""The live run page in a real browser (Playwright driving headless Chromium).

A small, slowed simulation and a coordinator with three gRPC site processes run while a
page watches them. Chromium is the system's (Debian's ``chromium`` package, which
``scripts/setup.sh test`` installs when it runs as root); without it, or without the
``playwright`` package, these tests skip and say why. Screenshots are written to
``test-artifacts/ui/`` (ignored by git).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedlearn.config.simulation import load_config
from fedlearn.engine.store import RunStore
from fedlearn.run.job import JobResult, run_job
from fedlearn.ui.events import Event, EventBus

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
CLIENTS, ROUNDS, FAILING = 4, 3, 2

pytestmark = pytest.mark.xdist_group("ui-browser")


def chromium() -> str | None:
    """A Chromium (or Chrome) executable: $FEDLEARN_CHROMIUM, else one on PATH."""
    named = os.environ.get("FEDLEARN_CHROMIUM")
    if named:
        return named if os.access(named, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed (test extra)"
    )
    executable = chromium()
    if executable is None:
        pytest.skip(
            "no Chromium found (apt-get install chromium, or set FEDLEARN_CHROMIUM); "
            "Playwright's own browser download is not used"
        )
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Watch:
    """Records the bus's events and lets a test wait for one."""

    def __init__(self, bus: EventBus) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()
        bus.subscribe(self._add)

    def _add(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait(self, kind: str, timeout: float = 60, **data: object) -> Event:
        def found() -> Event | None:
            for e in self.events:
                if e.kind == kind and all(e.data.get(k) == v for k, v in data.items()):
                    return e
            return None

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, timeout), (kind, data)
            event = found()
        assert event is not None
        return event


def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="module")
def simulation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A 4-client, 3-round simulation (client 2 always fails to train, a version is
    published every round) with its live page, started but not waited for."""
    from fedlearn.ui.page import start_live_page

    cwd = Path.cwd()
    os.chdir(ROOT)  # the client app is named by module (tests/ui_apps.py)
    out = tmp_path_factory.mktemp("ui") / "run"
    config = load_config(
        None,
        {
            "run.name": "live",
            "run.rounds": ROUNDS,
            "run.clients": CLIENTS,
            "run.out_dir": str(out),
            "data.dataset": "breast_cancer",
            "data.partitioner": "iid",
            "client.app": "ui_apps:make_app",
            "client.params": {"sleep_s": 0.35, "fail_client": FAILING, "epochs": 1},
            "strategy.params.min_train_clients": 1,
            "backend.kind": "inprocess",
            "publish.model": "bc",
            "publish.every": 1,
        },
    )
    bus = EventBus()
    watch = Watch(bus)
    result: dict[str, Any] = {}
    page = start_live_page(out, "live", bus, clients=range(CLIENTS))

    def target() -> None:
        try:
            result["job"] = run_job(config, events=bus)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, name="ui-simulation", daemon=True)
    thread.start()
    try:
        yield {"url": page.url, "watch": watch, "thread": thread, "result": result, "out": out}
    finally:
        thread.join(120)
        page.stop()
        os.chdir(cwd)


def test_the_page_follows_a_running_simulation(browser: Any, simulation: dict[str, Any]) -> None:
    watch: Watch = simulation["watch"]
    watch.wait("round_started", round=1)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    problems: list[str] = []  # script errors and content-policy violations
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(simulation["url"])
    # loads while the run runs, and lists every client
    page.wait_for_selector("body[data-status=running]", timeout=10_000)
    assert page.locator("#clients-table tbody tr").count() == CLIENTS
    assert page.inner_text("#round").endswith(f"of {ROUNDS}")
    # a round's end reaches the page within 1 s
    for rnd in (1, 2):
        ended = watch.wait("round_ended", round=rnd)
        page.wait_for_function(f"() => +document.body.dataset.rounds >= {rnd}", timeout=5_000)
        latency = time.time() - ended.at
        assert latency < 1.0, f"round {rnd} reached the page {latency:.2f} s after it ended"
    # the failing client and its reason
    row = page.locator(f'#clients-table tr[data-client="{FAILING}"]')
    assert "refuses to train" in row.locator("td.reason").inner_text()
    assert row.locator("td").nth(4).inner_text() != "0"  # failures
    # a published version with its gate decision
    page.wait_for_selector('#versions-table tr[data-version="bc:1"]', timeout=5_000)
    assert "promoted" in page.inner_text('#versions-table tr[data-version="bc:1"]')
    # the per-round chart has its band, mean and worst lines; one dot per evaluated client
    assert page.locator("#rounds-chart polygon.band").count() == 1
    assert page.locator("#rounds-chart polyline").count() == 2
    assert page.locator("#clients-chart circle").count() == CLIENTS
    assert page.locator("#clients-chart circle.worst-pt").count() == 1
    shot(page, "simulation-running-1280x800")
    # the end of the run
    page.wait_for_selector("body[data-status=finished]", timeout=60_000)
    page.wait_for_function(f"() => +document.body.dataset.rounds === {ROUNDS}", timeout=5_000)
    assert page.inner_text("#eta") == "done"
    shot(page, "simulation-finished-1280x800")
    # keyboard: the metric and round choices are reachable with Tab and change the chart
    page.focus("#metric")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "round-select"
    page.select_option("#round-select", "1")
    assert page.inner_text("#dots-desc").startswith("round 1,")
    assert problems == []
    page.close()
    simulation["thread"].join(60)
    assert "error" not in simulation["result"], simulation["result"].get("error")
    job: JobResult = simulation["result"]["job"]
    assert job.outcome.status == "finished"


def test_a_finished_run_is_shown_from_its_store_at_phone_width(
    browser: Any, simulation: dict[str, Any]
) -> None:
    from fedlearn.ui.page import start_live_page

    simulation["thread"].join(120)
    with start_live_page(simulation["out"], None) as served:
        page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
        page.goto(served.url)
        page.wait_for_selector("body[data-status=finished]", timeout=10_000)
        assert page.inner_text("#round") == f"{ROUNDS} of {ROUNDS}"
        assert page.locator("#clients-table tbody tr").count() == CLIENTS
        assert "refuses to train" in page.inner_text("#failures-list")
        assert page.locator("#versions-table tbody tr").count() == ROUNDS
        # nothing wider than the screen but the tables' own scroll boxes
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide at phone width"
        shot(page, "finished-from-store-390")
        page.close()


def test_the_page_shows_a_killed_site_as_disconnected(browser: Any, tmp_path: Path) -> None:
    """A coordinator with three gRPC sites (two in threads, one a process); the process
    is killed in the middle of round 3's training and its row says so."""
    from deployment import FAULT_APP, FAULT_PARAMS, Deployment, free_port, in_process_coordinator

    d = Deployment(tmp_path, num_sites=3, rounds=3, app=FAULT_APP, params=dict(FAULT_PARAMS))
    d.write_site_config(2, sleep_round=3, sleep_s=60)  # busy in round 3 until killed
    port = free_port()
    proc = None
    with in_process_coordinator(d, {"server.ui_port": port}) as c:
        try:
            c.start_site(0)
            c.start_site(1)
            proc = d.start_site(2)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"http://127.0.0.1:{port}/")
            for site in ("site-0", "site-1", "site-2"):
                row = page.locator("#clients-table tbody tr", has_text=site)
                row.locator(".conn-yes").wait_for(timeout=30_000)
            page.wait_for_function("() => +document.body.dataset.rounds >= 2", timeout=60_000)
            row = page.locator("#clients-table tbody tr", has_text="site-2")
            assert row.locator(".conn-yes").count() == 1
            time.sleep(0.5)  # inside round 3's training (site-2 sleeps there)
            proc.kill()
            proc.wait(10)
            row.locator(".conn-no").wait_for(timeout=10_000)
            assert "disconnected (stream ended)" in row.inner_text()
            shot(page, "coordinator-site-killed-1280x800")
            c.wait(60)
            page.wait_for_selector("body[data-status=finished]", timeout=10_000)
            failures = page.inner_text("#failures-list")
            expected = "round 3, client 2, train: site 'site-2' disconnected during the task"
            assert expected in failures
            page.close()
        finally:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_a_secure_private_run_shows_its_epsilon_and_dropouts(
    browser: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Distributed DP under SecAgg+ (client 3 drops out of round 2's setup), from its store."""
    from fedlearn.ui.page import start_live_page

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    config = load_config(
        None,
        {
            "run.out_dir": str(out),
            "run.rounds": 2,
            "run.clients": 6,
            "data.dataset": "breast_cancer",
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
    assert run_job(config).outcome.status == "finished"
    store = RunStore(out / "run.db", read_only=True)
    store.run_id = store.run_ids()[0]
    epsilon = store.privacy_rows()[-1].epsilon
    store.close()
    with start_live_page(out, None) as served:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(served.url)
        page.wait_for_selector("body[data-status=finished]", timeout=10_000)
        assert page.locator("#privacy").is_visible()
        assert page.inner_text("#epsilon") == f"{epsilon:.4g} at δ=0.001"
        assert page.locator("#secagg").is_visible()
        assert "round 2: 3 (secagg-setup)" in page.inner_text("#dropouts")
        shot(page, "secure-private-run")
        page.close()


def test_the_traffic_panel_shows_production_and_the_policy_as_it_changes(
    browser: Any, tmp_path: Path
) -> None:
    """A registry with a split in force; a canary set while the page is open replaces it."""
    import traffic_models as tm

    from fedlearn.registry.model_registry import ModelRegistry
    from fedlearn.registry.traffic import Canary, Split
    from fedlearn.ui.page import start_live_page

    registry = tmp_path / "registry"
    tm.publish(registry, (0, 1, 2), production=2)
    with ModelRegistry(registry) as writer:
        writer.set_traffic("mlp", Split({1: 1, 2: 3}))
    with start_live_page(tmp_path, "run", EventBus(), registry=registry) as served:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(served.url)
        card = page.locator("#traffic article[data-model=mlp]")
        card.wait_for(timeout=10_000)
        assert "production v2" in card.locator("h3").inner_text()
        shares = card.locator(".split .share").all_inner_texts()
        assert shares == ["v1 25%", "v2 75%"]
        assert card.locator("table.decisions tbody tr").first.inner_text().count("route-set") == 1
        with ModelRegistry(registry) as writer:
            writer.set_traffic("mlp", Canary(3, 2, steps=(0.1, 1.0)))
        card.locator(".policy[data-kind=canary]").wait_for(timeout=5_000)
        assert card.locator(".split .share").all_inner_texts() == ["v2 90%", "v3 (canary) 10%"]
        widths = [card.locator(".split .share").nth(i).bounding_box()["width"] for i in (0, 1)]
        assert 8 < widths[0] / widths[1] < 10, widths  # drawn to scale
        shot(page, "traffic-panel-1280x800")
        page.close()
