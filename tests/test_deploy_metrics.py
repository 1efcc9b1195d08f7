"""The coordinator in-process with site daemons as threads; Prometheus /metrics."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

from deployment import Deployment, free_port
from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
from fedlearn.config.loading import load_toml
from fedlearn.deploy.launch import build_site
from fedlearn.deploy.server import run_coordinator


def test_metrics_endpoint_counts_rounds_and_replies(tmp_path: Path) -> None:
    d = Deployment(tmp_path, rounds=2)
    metrics_port = free_port()
    config = load_toml(
        CoordinatorConfig, d.root / "coordinator.toml", {"server.metrics_port": metrics_port}
    )
    scraped: list[str] = []

    class Scrape:
        def stage_started(self, round, stage, num_tasks):  # type: ignore[no-untyped-def]
            pass

        def reply_received(self, record):  # type: ignore[no-untyped-def]
            pass

        def round_finished(self, record):  # type: ignore[no-untyped-def]
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as response:
                scraped.append(response.read().decode())

    sites = [build_site(load_toml(SiteConfig, d.root / f"site-{i}.toml")) for i in range(3)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in sites]
    for t in threads:
        t.start()
    result = run_coordinator(config, observer=Scrape())  # type: ignore[arg-type]
    for t in threads:
        t.join(timeout=30)
    assert [r.ok for r in result.rounds] == [True, True]
    assert all(s.tasks_done == 4 for s in sites)  # 2 rounds x (train + evaluate)
    last = scraped[-1]
    assert "fedlearn_connected_clients 3.0" in last
    assert 'fedlearn_rounds_total{status="ok"} 2.0' in last
    assert 'fedlearn_client_replies_total{stage="train",status="ok"} 6.0' in last
    assert 'fedlearn_client_replies_total{stage="evaluate",status="ok"} 6.0' in last
    assert "fedlearn_round_duration_seconds_count 2.0" in last
