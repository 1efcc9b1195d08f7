"""Distributed DP under SecAgg+ over real gRPC (TLS, loopback): the simulation's model."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedlearn.deploy.server as server_mod
from clients.tabular import make_app
from deployment import PARAMS, Deployment, in_process_coordinator, simulated_data
from fedlearn.privacy.distributed import DistributedNoise
from fedlearn.secagg.stages import SecureAggregation, SecureRound
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy

SECAGG = {"secagg.enabled": True, "secagg.clip": 2.0, "secagg.max_weight": 1000}
NOISE = DistributedNoise(0.5, seed=17)
CLIP = 0.8


def _with_noise(base: SecureAggregation | None, seen: list[SecureRound]) -> SecureAggregation:
    assert base is not None
    return base.with_noise(NOISE, clip=CLIP, on_round=seen.append)


def test_seeded_secure_dp_deployment_equals_the_simulation_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = Deployment(tmp_path, num_sites=5, rounds=2)
    deployed: list[SecureRound] = []
    original = server_mod.make_secure

    def make_secure(section: Any) -> SecureAggregation:
        return _with_noise(original(section), deployed)

    monkeypatch.setattr(server_mod, "make_secure", make_secure)
    with in_process_coordinator(d, SECAGG) as running:
        for i in range(d.num_sites):
            running.start_site(i)
        result = running.wait(120)
    assert [r.ok for r in result.rounds] == [True, True]

    simulated_rounds: list[SecureRound] = []
    factory = functools.partial(make_app, simulated_data(d.num_sites, d.seed), **PARAMS)
    strategy = build_strategy("fedavg", {"min_train_clients": 1})
    secure = _with_noise(SecureAggregation(clip=2.0, max_weight=1000), simulated_rounds)
    simulated = run_simulation(
        factory,  # type: ignore[arg-type]
        strategy,
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
        secure=secure,
    )
    for name, value in simulated.arrays.items():
        assert result.arrays[name].tobytes() == value.tobytes(), name
    assert [(r.round, len(r.survivors)) for r in deployed] == [(1, 5), (2, 5)]
    assert deployed == simulated_rounds
    # and the noise is really there: the plain secure run differs by about sigma C / n
    plain = run_simulation(
        factory,  # type: ignore[arg-type]
        strategy,
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
        secure=SecureAggregation(clip=2.0, max_weight=1000),
    )
    gaps = [np.abs(result.arrays[n] - plain.arrays[n]).max() for n in plain.arrays]
    assert max(gaps) > 0.01
