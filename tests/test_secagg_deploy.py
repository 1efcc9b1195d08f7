"""Secure aggregation over real gRPC (TLS, loopback): same model as the simulation."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from clients.tabular import make_app
from deployment import PARAMS, Deployment, in_process_coordinator, simulated_data
from fedlearn.engine.messages import Stage
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy

SECAGG = {"secagg.enabled": True, "secagg.clip": 2.0, "secagg.max_weight": 1000}


def _simulated(d: Deployment, secure: SecureAggregation | None):  # type: ignore[no-untyped-def]
    factory = functools.partial(make_app, simulated_data(d.num_sites, d.seed), **PARAMS)
    return run_simulation(
        factory,  # type: ignore[arg-type]
        build_strategy("fedavg", {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
        secure=secure,
    )


def test_secure_deployment_equals_secure_simulation_and_plain_within_bound(
    tmp_path: Path,
) -> None:
    d = Deployment(tmp_path, num_sites=5, rounds=2)
    with in_process_coordinator(d, SECAGG) as running:
        for i in range(d.num_sites):
            running.start_site(i)
        result = running.wait(120)
    assert [r.ok for r in result.rounds] == [True, True]
    secure = SecureAggregation(clip=2.0, max_weight=1000)
    simulated = _simulated(d, secure)
    for name, value in simulated.arrays.items():
        assert result.arrays[name].tobytes() == value.tobytes(), name
    plain = _simulated(d, None)
    for name, value in plain.arrays.items():
        np.testing.assert_allclose(result.arrays[name], value, atol=1e-5)
    stages = {c.stage for c in result.clients}
    assert Stage.TRAIN in stages and Stage.EVALUATE in stages


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_secure_deployment_survives_a_site_that_disappears(tmp_path: Path) -> None:
    d = Deployment(tmp_path, num_sites=6, rounds=1, stage_timeout_s=5.0, min_clients=6)
    d.write_coordinator_config()
    with in_process_coordinator(d, SECAGG) as running:
        sites = [running.start_site(i) for i in range(d.num_sites)]
        # site 5 answers the setup stage, then stops answering (its stream is cut)
        original = sites[5].runtime.handle

        def vanish(task, arrays):  # type: ignore[no-untyped-def]
            if task.stage is Stage.SECAGG_SHARES:
                for _, _, stop in running.sites[5:6]:
                    stop.set()
                raise SystemExit  # never answers
            return original(task, arrays)

        sites[5].runtime.handle = vanish  # type: ignore[method-assign]
        result = running.wait(120)
    record = result.rounds[0]
    assert record.ok, record.error
    failed = {(c.stage, c.client_id) for c in result.clients if not c.ok}
    assert (Stage.SECAGG_SHARES, 5) in failed
