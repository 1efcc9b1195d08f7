"""A real coordinator and real site processes over TLS on loopback."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployment import FAULT_APP, FAULT_PARAMS, Deployment, simulated_data
from fedlearn.engine.messages import Stage
from fedlearn.engine.references import resolve
from fedlearn.engine.store import RunStore
from fedlearn.engine.weights import load_weights
from fedlearn.simulation import run_simulation
from fedlearn.strategy import build_strategy


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path)
    yield d
    d.stop_all()


def _simulated(d: Deployment, strategy: str = "fedavg"):  # type: ignore[no-untyped-def]
    make_app = resolve(d.app, "client.app")  # the sites' own app and params
    factory = functools.partial(make_app, simulated_data(d.num_sites, d.seed), **d.params)
    return run_simulation(
        factory,  # type: ignore[arg-type]
        build_strategy(strategy, {"min_train_clients": 1}),
        num_clients=d.num_sites,
        rounds=d.rounds,
        initial_arrays=d.initial,
        seed=d.seed,
    )


def _assert_same(a: dict, b: dict) -> None:  # type: ignore[type-arg]
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


def test_tls_run_matches_in_process_simulation(deployment: Deployment) -> None:
    _run_matches_simulation(deployment)


def test_mutual_tls_run_matches_in_process_simulation(tmp_path: Path) -> None:
    """The coordinator requires client certificates (server.client_ca); each site presents
    its own (coordinator.cert/key) and the run is the same as without them (the numpy
    fault-test app without faults: sites start faster than with torch)."""
    d = Deployment(tmp_path, mtls=True, app=FAULT_APP, params=dict(FAULT_PARAMS))
    try:
        assert "client_ca = " in (d.root / "coordinator.toml").read_text()
        assert "site-1-tls.pem" in (d.root / "site-1.toml").read_text()
        _run_matches_simulation(d)
    finally:
        d.stop_all()


def _run_matches_simulation(d: Deployment) -> None:
    coordinator = d.start_coordinator()
    sites = [d.start_site(i) for i in range(d.num_sites)]
    code, out = d.wait(coordinator)
    assert code == 0, out
    for site in sites:
        site_code, site_out = d.wait(site)
        assert site_code == 0, site_out
    final = load_weights(d.state_dir / "model.safetensors")
    _assert_same(final, _simulated(d).arrays)
    store = RunStore(d.state_dir / "run.db", run_id="run")
    rounds = store.rounds()
    evals = store.clients(Stage.EVALUATE)
    store.close()
    assert [r.ok for r in rounds] == [True] * d.rounds
    assert sorted({c.client_id for c in evals}) == [0, 1, 2]
    assert all(c.ok for c in evals)


def test_unknown_site_is_refused(deployment: Deployment) -> None:
    from fedlearn.security.keys import generate_site_key, save_private_key

    d = deployment
    stranger = d.root / "stranger.key"
    save_private_key(stranger, generate_site_key())
    d.write_site_config(0, key=stranger)
    coordinator = d.start_coordinator()
    d.wait_for_port()
    code, out = d.wait(d.start_site(0), timeout=60)
    assert code == 2
    assert "unknown site key" in out
    assert coordinator.poll() is None  # the coordinator keeps serving


def test_plaintext_needs_insecure(deployment: Deployment) -> None:
    d = deployment
    text = (d.root / "coordinator.toml").read_text()
    (d.root / "coordinator.toml").write_text(text.replace(f'cert = "{d.pki.server_cert}"\n', ""))
    code, out = d.wait(d.start_coordinator(), timeout=60)
    assert code == 2 and "TLS is on by default" in out
