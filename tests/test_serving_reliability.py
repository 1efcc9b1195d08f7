"""RELIABILITY.md (d), small: many clients across hot swaps, and hostile bodies next to
ordinary clients, against a real endpoint (REST and gRPC on loopback) in this process.

The full figure is ``python benchmarks/reliability/serving.py`` (2000 requests at
concurrency 200 across 10 swaps; 200 MB bodies; a 30 s body timeout).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability.serving import (
    hostile_clients,
    others_window,
    refused,
    swap_load,
)
from fedlearn.serving.endpoint import EndpointSettings, start_endpoint
from serving import publish_mnist

LIMIT_MB = 2
BODY_TIMEOUT_S = 2.0


@pytest.mark.xdist_group("serving-reliability")
def test_many_clients_across_hot_swaps_and_hostile_bodies(tmp_path: Path) -> None:
    modules = publish_mnist(tmp_path, seeds=(0, 1))
    settings = EndpointSettings(
        tmp_path,
        http_port=0,
        grpc_port=0,
        poll_interval_s=0.02,
        max_request_mb=LIMIT_MB,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    with start_endpoint(settings) as ep:
        run = swap_load(
            ep.http_url, ep.grpc_address, tmp_path, modules, requests=300, concurrency=60, swaps=3
        )
        assert run.passed, run
        assert run.answered == 300 and run.failed == 0 and run.mismatched == 0
        assert run.swaps_in_metrics == 3 and run.swaps_seen_under_load == 3
        assert set(run.by_version) == {"1", "2"}  # clients saw both versions

        window = others_window(
            ep.http_url,
            ep.grpc_address,
            clients=4,
            duration_s=BODY_TIMEOUT_S + 1.0,
            hostile=hostile_clients("127.0.0.1", ep.rest.port, ep.grpc_address, 4 * LIMIT_MB << 20),
        )
    assert window.failed == 0, window.failures
    assert window.answered > 0
    kinds = sorted(h.kind.split()[0] for h in window.hostile)
    assert kinds == ["REST", "REST", "gRPC", "slow"]
    for hostile in window.hostile:
        assert refused(hostile), hostile
    slow = next(h for h in window.hostile if h.kind.startswith("slow"))
    assert BODY_TIMEOUT_S <= slow.answered_s < BODY_TIMEOUT_S + 2
    # nobody else waited for the slow body (a stall would last the body timeout)
    assert window.latency["max_ms"] < BODY_TIMEOUT_S * 1e3 * 0.8, window.latency
