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


# -- every counter that should move, moves ------------------------------------------------

#: Exported samples that legitimately stay still during a round in which every site
#: answers: the failure outcomes (absent until a failure labels them, so a zero here), and
#: ``_created`` (each series' creation time). Histogram buckets below the round's duration
#: stay still too; the test asks the ``+Inf`` bucket, ``_count`` and ``_sum`` to move.
STILL = {
    ("fedlearn_rounds_total", (("status", "failed"),)),
    ("fedlearn_client_replies_total", (("stage", "train"), ("status", "failed"))),
    ("fedlearn_client_replies_total", (("stage", "evaluate"), ("status", "failed"))),
}

Sample = tuple[str, tuple[tuple[str, str], ...]]


def _scrape(port: int) -> tuple[dict[Sample, float], dict[str, str]]:
    """Every sample of ``/metrics`` and each family's type."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[Sample, float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
            types[sample.name] = family.type
    return samples, types


def test_every_exported_counter_that_should_move_moves_in_a_round(tmp_path: Path) -> None:
    """Scrape ``/metrics`` as round 2 starts and when it ends: every counter moved (the
    payload byte counters by at least the model's bytes times the sites, each way), but
    for the samples named in STILL."""
    from fedlearn.engine.messages import Stage

    d = Deployment(tmp_path, rounds=2)
    metrics_port = free_port()
    config = load_toml(
        CoordinatorConfig, d.root / "coordinator.toml", {"server.metrics_port": metrics_port}
    )
    scrapes: dict[str, tuple[dict[Sample, float], dict[str, str]]] = {}

    class Scrape:
        def stage_started(self, round, stage, num_tasks):  # type: ignore[no-untyped-def]
            if round == 2 and stage is Stage.TRAIN:
                scrapes["before"] = _scrape(metrics_port)

        def reply_received(self, record):  # type: ignore[no-untyped-def]
            pass

        def round_finished(self, record):  # type: ignore[no-untyped-def]
            if record.round == 2:
                scrapes["after"] = _scrape(metrics_port)

    sites = [build_site(load_toml(SiteConfig, d.root / f"site-{i}.toml")) for i in range(3)]
    threads = [threading.Thread(target=s.run, daemon=True) for s in sites]
    for t in threads:
        t.start()
    result = run_coordinator(config, observer=Scrape())  # type: ignore[arg-type]
    for t in threads:
        t.join(timeout=30)
    assert [r.ok for r in result.rounds] == [True, True]
    before, _ = scrapes["before"]
    after, types = scrapes["after"]

    def moved(key: Sample) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    should_move = []
    for key in after:
        name, labels = key
        kind = types[name]
        if name.endswith("_created") or key in STILL:
            continue
        if kind == "counter" or (
            kind == "histogram"
            and (name.endswith(("_count", "_sum")) or dict(labels).get("le") == "+Inf")
        ):
            should_move.append(key)
    still = [key for key in should_move if moved(key) <= 0]
    assert still == [], f"counters that did not move in round 2: {still}"
    for key in STILL:
        assert moved(key) == 0, key
    exported = {name for name, kind in types.items() if kind == "counter"}
    assert {
        "fedlearn_payload_bytes_sent_total",
        "fedlearn_payload_bytes_received_total",
        "fedlearn_rounds_total",
        "fedlearn_client_replies_total",
    } <= exported

    model_bytes = sum(a.nbytes for a in d.initial.values())
    sent = moved(("fedlearn_payload_bytes_sent_total", ()))
    received = moved(("fedlearn_payload_bytes_received_total", ()))
    # the model goes to 3 sites twice (train, evaluate) and 3 trained models come back, each
    # encoded with a header of a few hundred bytes (names, dtypes, shapes); evaluation
    # replies carry no arrays
    assert 2 * 3 * model_bytes <= sent <= 2 * 3 * (model_bytes + 1024), (sent, model_bytes)
    assert 3 * model_bytes <= received <= 3 * (model_bytes + 1024), (received, model_bytes)
