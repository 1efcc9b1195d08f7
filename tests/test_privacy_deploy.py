"""Central DP in a deployment over real gRPC (TLS, loopback): the coordinator accounts ε
per round in its store, and a seeded run gives the simulation's model bit for bit."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from deployment import FAULT_APP, FAULT_PARAMS, Deployment, in_process_coordinator, simulated_data
from fault_apps import make_app
from fedlearn.privacy.central import CentralPrivacy
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy

DP = {
    "privacy.mode": "central",
    "privacy.noise_multiplier": 0.8,
    "privacy.clip": 0.5,
    "privacy.delta": 1e-3,
    "privacy.noise": "seeded",
}


def test_a_central_dp_deployment_accounts_and_equals_the_simulation(tmp_path: Path) -> None:
    d = Deployment(
        tmp_path,
        num_sites=4,
        rounds=2,
        app=FAULT_APP,
        params=dict(FAULT_PARAMS),
        strategy_params={"min_train_clients": 1, "fraction_train": 0.5},
    )
    with in_process_coordinator(d, DP) as running:
        for i in range(d.num_sites):
            running.start_site(i)
        result = running.wait(120)
        store = running.store()
        try:
            rows = store.privacy_rows()
        finally:
            store.close()
    assert [r.ok for r in result.rounds] == [True, True]
    # 2 of the 4 connected sites per round, replace-one: sensitivity 2C
    event = dp_event.SampledWithoutReplacementDpEvent(4, 2, dp_event.GaussianDpEvent(0.4))
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    expected = [accountant.compose(event).get_epsilon(1e-3) for _ in range(2)]
    assert [row.epsilon for row in rows] == pytest.approx(expected, abs=1e-9)
    strategy = CentralPrivacy(
        inner=build_strategy("fedavg", {"min_train_clients": 1, "fraction_train": 0.5}),
        noise_multiplier=0.8,
        clip=0.5,
        expected_clients=2,
        noise="seeded",
        seed=d.seed,
    )
    factory = functools.partial(make_app, simulated_data(d.num_sites, d.seed), **FAULT_PARAMS)
    simulated = run_simulation(
        factory,  # type: ignore[arg-type]
        strategy,
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )
    for name, value in simulated.arrays.items():
        assert result.arrays[name].tobytes() == value.tobytes(), name


def test_a_distributed_dp_coordinator_from_its_config_accounts_the_survivors(
    tmp_path: Path,
) -> None:
    # [privacy] mode = "distributed" in coordinator.toml: the sites add Skellam shares under
    # SecAgg+, the coordinator's ledger composes each round's zCDP event for its survivors,
    # and the seeded deployment equals the simulation with the same noise bit for bit
    from fedlearn.privacy.distributed import DistributedNoise, distributed_event
    from fedlearn.secagg.stages import SecureAggregation

    d = Deployment(
        tmp_path,
        num_sites=4,
        rounds=2,
        app=FAULT_APP,
        params=dict(FAULT_PARAMS),
        strategy_params={"min_train_clients": 3},
    )
    distributed = {
        "secagg.enabled": True,
        "privacy.mode": "distributed",
        "privacy.noise_multiplier": 2.0,
        "privacy.clip": 1.0,
        "privacy.delta": 1e-3,
        "privacy.noise": "seeded",
    }
    with in_process_coordinator(d, distributed) as running:
        for i in range(d.num_sites):
            running.start_site(i)
        result = running.wait(120)
        store = running.store()
        try:
            rows = store.privacy_rows()
        finally:
            store.close()
    assert [r.ok for r in result.rounds] == [True, True]
    secure = SecureAggregation().with_noise(DistributedNoise(2.0, 4, seed=d.seed), clip=1.0)
    length = sum(int(a.size) for a in d.initial.values())
    noise = secure.planned_noise(4, length)
    assert noise is not None
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    expected = [
        accountant.compose(distributed_event(noise, 4, "replace")).get_epsilon(1e-3)
        for _ in range(2)
    ]
    assert [row.epsilon for row in rows] == pytest.approx(expected, rel=1e-9)
    factory = functools.partial(make_app, simulated_data(d.num_sites, d.seed), **FAULT_PARAMS)
    simulated = run_simulation(
        factory,  # type: ignore[arg-type]
        build_strategy("fedavg", {"min_train_clients": 3}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
        secure=secure,
    )
    for name, value in simulated.arrays.items():
        assert result.arrays[name].tobytes() == value.tobytes(), name
