"""The privacy ledger against dp-accounting called directly (acceptance 1).

For a grid of (σ, q, rounds, δ) the ledger, fed one round at a time, reports the ε that
dp-accounting gives for the same mechanism composed ``rounds`` times, to 1e-9, with the
RDP and the PLD accountant; fixed-size sampling (RDP, replace-one, sensitivity 2C) too.
Per-client events give each client its own ε and the run the largest.
"""

from __future__ import annotations

import itertools
import math

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedlearn.errors import ConfigError, SerializationError
from fedlearn.privacy.accountant import (
    Ledger,
    client_event,
    event_from_json,
    event_to_json,
    relation_for,
    round_event,
)
from fedlearn.privacy.tracker import PrivacySettings, PrivacyTracker

SIGMAS = (0.8, 2.0)
RATES = (0.05, 0.3)
ROUNDS = (1, 40)
DELTAS = (1e-5, 1e-3)


def _ledger(kind: str, event: dp_event.DpEvent, rounds: int, delta: float, sampling: str) -> float:
    ledger = Ledger(kind, delta, relation_for(sampling))  # type: ignore[arg-type]
    for _ in range(rounds):
        ledger.add_round(event)
    return ledger.epsilon()


def _ledger_epsilons(
    kind: str, event: dp_event.DpEvent, sampling: str
) -> dict[tuple[int, float], float]:
    """The ledger's ε after each of ROUNDS rounds at each of DELTAS, fed round by round."""
    out: dict[tuple[int, float], float] = {}
    for delta in DELTAS:
        ledger = Ledger(kind, delta, relation_for(sampling))  # type: ignore[arg-type]
        for r in range(1, max(ROUNDS) + 1):
            ledger.add_round(event)
            if r in ROUNDS:
                out[r, delta] = ledger.epsilon()
    return out


@pytest.mark.parametrize(("sigma", "q"), list(itertools.product(SIGMAS, RATES)))
def test_rdp_poisson_equals_dp_accounting(sigma: float, q: float) -> None:
    event = round_event(sigma, "poisson", rate=q)
    assert event == dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    ours = _ledger_epsilons("rdp", event, "poisson")
    for rounds in ROUNDS:
        reference = RdpAccountant().compose(event, rounds)
        for delta in DELTAS:
            eps = reference.get_epsilon(delta)
            assert ours[rounds, delta] == pytest.approx(eps, abs=1e-9)
            assert 0 < eps < math.inf


@pytest.mark.parametrize(
    ("sigma", "q", "rounds", "delta"),
    [(2.0, 0.05, 40, 1e-5), (2.0, 0.3, 1, 1e-3), (0.8, 0.05, 1, 1e-3), (1.2, 0.1, 10, 1e-5)],
)
def test_pld_poisson_equals_dp_accounting(
    sigma: float, q: float, rounds: int, delta: float
) -> None:
    event = round_event(sigma, "poisson", rate=q)
    reference = PLDAccountant().compose(event, rounds).get_epsilon(delta)
    ours = _ledger("pld", event, rounds, delta, "poisson")
    assert ours == pytest.approx(reference, abs=1e-9)
    # a different accountant: PLD is tighter than RDP's bound
    assert ours < RdpAccountant().compose(event, rounds).get_epsilon(delta)


@pytest.mark.parametrize(("sigma", "m"), list(itertools.product(SIGMAS, (2, 15))))
def test_rdp_fixed_size_sampling_equals_dp_accounting(sigma: float, m: int) -> None:
    event = round_event(sigma, "fixed", population=50, sample_size=m)
    # replace-one: one client swapped for another moves the clipped sum by up to 2C
    expected = dp_event.SampledWithoutReplacementDpEvent(50, m, dp_event.GaussianDpEvent(sigma / 2))
    assert event == expected
    ours = _ledger_epsilons("rdp", event, "fixed")
    for rounds in ROUNDS:
        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        reference = accountant.compose(expected, rounds)
        for delta in DELTAS:
            assert ours[rounds, delta] == pytest.approx(reference.get_epsilon(delta), abs=1e-9)


def test_mixed_rounds_compose_in_any_order() -> None:
    a = round_event(2.0, "poisson", rate=0.1)
    b = round_event(3.0, "poisson", rate=0.2)
    ledger = Ledger("rdp", 1e-5, relation_for("poisson"))
    for event in (a, b, a, a, b):
        ledger.add_round(event)
    direct = RdpAccountant()
    for event in (a, b, a, a, b):
        direct.compose(event)
    assert ledger.epsilon() == pytest.approx(direct.get_epsilon(1e-5), abs=1e-9)


def test_example_level_client_event_is_opacus_style_dp_sgd() -> None:
    metrics = {"dp.noise_multiplier": 1.1, "dp.sample_rate": 0.02, "dp.steps": 50, "dp.epsilon": 1}
    event = client_event(metrics)
    inner = dp_event.PoissonSampledDpEvent(0.02, dp_event.GaussianDpEvent(1.1))
    assert event == dp_event.SelfComposedDpEvent(inner, 50)
    ledger = Ledger("rdp", 1e-5, relation_for("poisson"))
    for _ in range(3):  # three rounds of 50 steps = 150 steps of DP-SGD
        ledger.add_round(client_events={4: event})
    reference = RdpAccountant().compose(inner, 150).get_epsilon(1e-5)
    assert ledger.epsilon() == pytest.approx(reference, abs=1e-9)
    assert ledger.client_epsilons() == {4: ledger.epsilon()}


def test_local_client_event_has_sensitivity_two_c_and_run_epsilon_is_the_worst_client() -> None:
    local = client_event({"dp.noise_multiplier": 4.0, "dp.clip": 1.0})
    assert local == dp_event.GaussianDpEvent(2.0)
    ledger = Ledger("rdp", 1e-5, relation_for("poisson"))
    ledger.add_round(client_events={0: local, 1: local})
    ledger.add_round(client_events={1: local})
    one = RdpAccountant().compose(local, 1).get_epsilon(1e-5)
    two = RdpAccountant().compose(local, 2).get_epsilon(1e-5)
    assert ledger.client_epsilons() == pytest.approx({0: one, 1: two}, abs=1e-12)
    assert ledger.epsilon() == pytest.approx(two, abs=1e-12)
    # the budget's question: if any client takes part next round, the worst is client 1's
    three = RdpAccountant().compose(local, 3).get_epsilon(1e-5)
    assert ledger.epsilon_if(any_client=[local]) == pytest.approx(three, abs=1e-12)


def test_a_client_without_dp_metrics_has_no_guarantee() -> None:
    assert client_event({"loss": 0.3}) == dp_event.NonPrivateDpEvent()
    assert client_event({"dp.noise_multiplier": -1.0}) == dp_event.NonPrivateDpEvent()
    assert client_event({"dp.noise_multiplier": 1.0, "dp.steps": 3}) == dp_event.NonPrivateDpEvent()
    ledger = Ledger("rdp", 1e-5, relation_for("poisson"))
    ledger.add_round(client_events={0: client_event({})})
    assert ledger.epsilon() == math.inf


def test_events_round_trip_through_json_and_only_dp_accounting_types_load() -> None:
    event = client_event({"dp.noise_multiplier": 1.1, "dp.sample_rate": 0.02, "dp.steps": 5})
    composed = dp_event.ComposedDpEvent([event, round_event(1.0, "fixed", population=9)])
    for e in (event, composed, dp_event.NonPrivateDpEvent()):
        assert event_from_json(event_to_json(e)) == e
    with pytest.raises(SerializationError, match="unknown DP event type"):
        event_from_json({"type": "os.system", "command": "true"})
    with pytest.raises(SerializationError):
        event_from_json({"type": "GaussianDpEvent", "sigma": 1.0})


def test_pld_with_fixed_size_sampling_is_a_config_error() -> None:
    settings = PrivacySettings("central", 1.0, 1e-5, accountant="pld", sampling="fixed")
    with pytest.raises(ConfigError, match="only the RDP accountant supports"):
        PrivacyTracker(settings)
    # Poisson sampling under PLD is fine
    PrivacyTracker(PrivacySettings("central", 1.0, 1e-5, accountant="pld", sampling="poisson"))


def test_next_round_epsilon_answers_the_budget_question() -> None:
    settings = PrivacySettings(
        "central", 2.0, 1e-5, sampling="poisson", rate=0.2, num_clients=100, budget=3.0
    )
    tracker = PrivacyTracker(settings)
    event = round_event(2.0, "poisson", rate=0.2)
    assert tracker.next_epsilon() == pytest.approx(
        RdpAccountant().compose(event, 1).get_epsilon(1e-5), abs=1e-12
    )
    rounds = 0
    while tracker.stop_reason(rounds + 1) is None:
        tracker.ledger.add_round(event)
        rounds += 1
    reason = tracker.stop_reason(rounds + 1)
    assert reason is not None and f"round {rounds + 1} would bring" in reason
    # the last round allowed stays within the budget, the next one would not
    assert RdpAccountant().compose(event, rounds).get_epsilon(1e-5) <= 3.0
    after = RdpAccountant().compose(event, rounds + 1).get_epsilon(1e-5)
    assert after > 3.0
    assert tracker.next_epsilon() == pytest.approx(after, abs=1e-12)
    assert rounds > 1
