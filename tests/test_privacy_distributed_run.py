"""Distributed DP in whole simulations: the config builds it, every round's ε in the run
store is dp-accounting's composition of the Skellam rounds with the clients that actually
survived, and dropouts cost more ε.

Small real runs: breast_cancer over 10 clients, the numpy logistic regression of
``fault_apps`` through the real SecAgg+ state machines, real SQLite, seeded noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dp_accounting import NeighboringRelation
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedlearn.config.simulation import load_config
from fedlearn.engine.store import RunStore
from fedlearn.errors import ConfigError
from fedlearn.privacy.distributed import DistributedNoise, distributed_event
from fedlearn.run.job import run_job
from fedlearn.secagg.stages import SecureAggregation

ROOT = Path(__file__).resolve().parents[1]
SIGMA, DELTA, CLIENTS, ROUNDS = 2.0, 1e-3, 10, 3


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # client apps are named by module


def _config(out: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    settings: dict[str, Any] = {
        "run.out_dir": str(out),
        "run.rounds": ROUNDS,
        "run.clients": CLIENTS,
        "data.dataset": "breast_cancer",
        "data.partitioner": "iid",
        "client.app": "fault_apps:make_app",
        "client.params": {},
        "strategy.params.min_train_clients": 5,
        "backend.kind": "inprocess",
        "publish.enabled": False,
        "secagg.enabled": True,
        "privacy.mode": "distributed",
        "privacy.noise_multiplier": SIGMA,
        "privacy.clip": 1.0,
        "privacy.delta": DELTA,
        "privacy.noise": "seeded",
    }
    settings.update(overrides)
    return load_config(None, settings)


def _epsilons(out: Path) -> list[float]:
    store = RunStore(out / "run.db", run_id="mnist-fedavg", read_only=True)
    try:
        return [row.epsilon for row in store.privacy_rows()]
    finally:
        store.close()


def _reference(survivors: list[int]) -> list[float]:
    """dp-accounting called directly on each round's Skellam zCDP event (replace-one, as
    fixed-size sampling is accounted), for the model of ``fault_apps`` (31 parameters)."""
    secure = SecureAggregation().with_noise(DistributedNoise(SIGMA, CLIENTS), clip=1.0)
    noise = secure.planned_noise(CLIENTS, 31)
    assert noise is not None
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    out = []
    for n in survivors:
        accountant.compose(distributed_event(noise, n, "replace"))
        out.append(float(accountant.get_epsilon(DELTA)))
    return out


def test_each_rounds_epsilon_is_the_survivors_skellam_composition(tmp_path: Path) -> None:
    job = run_job(_config(tmp_path / "run"))
    assert job.result is not None and all(r.ok for r in job.result.rounds)
    assert [r.train_ok for r in job.result.rounds] == [CLIENTS] * ROUNDS
    got = _epsilons(tmp_path / "run")
    assert got == pytest.approx(_reference([CLIENTS] * ROUNDS), rel=1e-9)
    assert got[0] < got[1] < got[2]


def test_dropouts_leave_less_noise_and_cost_more_epsilon(tmp_path: Path) -> None:
    full = run_job(_config(tmp_path / "full"))
    dropped = run_job(
        _config(
            tmp_path / "dropped",
            **{"client.params": {"fail_rounds": "1", "fail_clients": "3,4,7"}},
        )
    )
    assert full.result is not None and dropped.result is not None
    assert dropped.result.rounds[0].ok  # 7 survivors are above the quorum of 5
    eps_full, eps_dropped = _epsilons(tmp_path / "full"), _epsilons(tmp_path / "dropped")
    assert eps_dropped == pytest.approx(_reference([7, CLIENTS, CLIENTS]), rel=1e-9)
    assert eps_dropped[0] > eps_full[0] and eps_dropped[-1] > eps_full[-1]


def test_pld_cannot_account_distributed_dp(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pld"):
        run_job(_config(tmp_path / "run", **{"privacy.accountant": "pld"}))
    assert not (tmp_path / "run").exists()
