"""The live page's traffic panel: what the registry says ``fedlearn serve`` routes (the
production version, aliases, the policy in force, the latest decisions), read again when
the registry changes, through the registry's own API as ``fedlearn models route`` uses it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import traffic_models as tm

from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.registry.traffic import Canary, Shadow, Split
from fedlearn.ui.events import EventBus
from fedlearn.ui.traffic import RegistryWatcher, traffic_view


def test_the_view_follows_route_canary_and_promotion(tmp_path: Path) -> None:
    tm.publish(tmp_path, (0, 1, 2), production=2)
    with ModelRegistry(tmp_path) as registry:
        (model,) = traffic_view(registry)
        assert model["model"] == "mlp" and model["production"] == 2
        assert model["aliases"] == {"production": 2, "latest": 3}
        assert model["policy"] is None
        assert [d["action"] for d in model["decisions"]] == ["promote"]

        registry.set_traffic("mlp", Split({1: 3, 2: 1}), reason="ticket 7")
        (model,) = traffic_view(registry)
        policy = model["policy"]
        assert policy["kind"] == "split" and policy["shares"] == {"1": 0.75, "2": 0.25}
        assert policy["describe"] == "split v1 75.0%, v2 25.0%"
        newest = model["decisions"][0]
        assert newest["action"] == "route-set" and "(ticket 7)" in newest["reason"]

        registry.set_traffic("mlp", Shadow(3, sample=0.5))
        policy = traffic_view(registry)[0]["policy"]
        assert (policy["kind"], policy["candidate"], policy["sample"]) == ("shadow", 3, 0.5)

        stored = registry.set_traffic("mlp", Canary(3, 2, steps=(0.1, 0.5, 1.0)))
        policy = traffic_view(registry)[0]["policy"]
        assert (policy["candidate"], policy["baseline"]) == (3, 2)
        assert (policy["step"], policy["share"], policy["steps"]) == (1, 0.1, [0.1, 0.5, 1.0])
        assert isinstance(stored.policy, Canary)
        stepped = registry.advance_traffic(
            "mlp", stored.revision, stored.policy.advanced(time.time()), "canary-step", "step 2"
        )
        assert stepped is not None
        policy = traffic_view(registry)[0]["policy"]
        assert (policy["step"], policy["share"], policy["revision"]) == (2, 0.5, stepped.revision)
        assert registry.end_traffic("mlp", stepped.revision, "canary-promote", "healthy", promote=3)
        (model,) = traffic_view(registry, decisions=3)
        assert model["policy"] is None and model["production"] == 3
        # newest first, the last three only
        assert [d["action"] for d in model["decisions"]] == [
            "promote",
            "canary-promote",
            "canary-step",
        ]
        registry.rollback("mlp")
        (model,) = traffic_view(registry)
        assert model["production"] == 2 and model["decisions"][0]["action"] == "rollback"


def test_the_watcher_reads_again_only_when_the_registry_changes(tmp_path: Path) -> None:
    seen: list[list[dict[str, Any]]] = []
    changed = threading.Event()

    def on_change(view: list[dict[str, Any]]) -> None:
        seen.append(view)
        changed.set()

    watcher = RegistryWatcher(tmp_path, on_change, poll_s=0.05)
    try:
        assert watcher.view == [] and not (tmp_path / "registry.db").exists()  # not made
        tm.publish(tmp_path, (0, 1), production=1)
        assert changed.wait(5)
        deadline = time.monotonic() + 5
        while watcher.view[0]["production"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.view[0]["production"] == 1
        time.sleep(0.3)  # several polls, no change: no new view
        count = len(seen)
        time.sleep(0.3)
        assert len(seen) == count
        changed.clear()
        with ModelRegistry(tmp_path) as registry:
            registry.set_traffic("mlp", Split({1: 1, 2: 1}))
        assert changed.wait(5)
        assert seen[-1][0]["policy"]["shares"] == {"1": 0.5, "2": 0.5}
    finally:
        watcher.close()


def test_the_page_serves_the_traffic_and_sends_it_when_it_changes(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    from fedlearn.ui.page import start_live_page

    registry = tmp_path / "registry"
    tm.publish(registry, (0, 1), production=2)
    bus = EventBus()
    with start_live_page(tmp_path, "run", bus, registry=registry) as page:
        snap = httpx.get(page.url + "api/snapshot", timeout=10).json()
        assert [(m["model"], m["production"], m["policy"]) for m in snap["traffic"]] == [
            ("mlp", 2, None)
        ]
        with ModelRegistry(registry) as writer:
            writer.set_traffic("mlp", Split({1: 1, 2: 9}))
        # the page's process reads the registry again (polled every second) and tells
        # the pages through their event stream
        url = page.url + f"api/events?after={snap['seq']}"
        traffic = None
        with httpx.stream("GET", url, timeout=10) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["kind"] == "traffic":
                    traffic = json.loads(line[6:])["data"]
                    break
        assert traffic is not None
        assert traffic["models"][0]["policy"]["shares"] == {"1": 0.1, "2": 0.9}
        got = httpx.get(page.url + "api/traffic", timeout=10).json()
        assert got["models"][0]["decisions"][0]["action"] == "route-set"


def test_the_endpoints_counts_per_answering_version_come_from_its_metrics(
    tmp_path: Path,
) -> None:
    """A real ``fedlearn serve`` of the registry under a split: the watcher's counts per
    answering version are the answers the client saw."""
    pytest.importorskip("uvicorn")
    from fedlearn.serving.endpoint import EndpointSettings, start_endpoint

    tm.publish(tmp_path, (0, 1), production=2)
    with ModelRegistry(tmp_path) as registry:
        registry.set_traffic("mlp", Split({1: 1, 2: 1}))
    settings = EndpointSettings(
        registry=tmp_path, http_port=0, grpc_port=0, allowed_factories=tm.ALLOWED
    )
    endpoint = start_endpoint(settings)
    try:
        with pytest.raises(ConfigError, match="loopback only"):
            RegistryWatcher(tmp_path, endpoint="http://10.0.0.1:8000")
        x = tm.rows(2, seed=3)
        answered: dict[str, int] = {}
        with httpx.Client(base_url=endpoint.http_url, timeout=10) as client:
            for _ in range(30):
                r = client.post(f"/v2/models/{tm.NAME}/infer", json=tm.body(x))
                assert r.status_code == 200, r.text
                version = r.json()["model_version"]
                answered[version] = answered.get(version, 0) + 1
            bad = client.post(f"/v2/models/{tm.NAME}/infer", json={"inputs": []})
            assert bad.status_code == 400
        assert set(answered) == {"1", "2"}  # 30 requests at 50/50 reach both
        watcher = RegistryWatcher(tmp_path, endpoint=endpoint.http_url)
        try:
            (model,) = watcher.view
            assert model["served"] == {"versions": answered, "ok": 30, "error": 1}
            assert model["policy"]["shares"] == {"1": 0.5, "2": 0.5}
        finally:
            watcher.close()
        # an endpoint that does not answer: no counts, the registry's view still there
        silent = RegistryWatcher(tmp_path, endpoint="http://127.0.0.1:9")
        try:
            assert silent.view[0]["served"] is None and silent.view[0]["production"] == 2
        finally:
            silent.close()
    finally:
        endpoint.close()
