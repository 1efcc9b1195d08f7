"""The client-side DP wrapper: each training task asks for local DP or DP-SGD, and the
wrapped strategy aggregates as before (weighted mean, holistic rule, or its own fold)."""

from __future__ import annotations

import numpy as np
import pytest

from fedlearn.errors import ConfigError
from fedlearn.privacy.strategy import ClientPrivacy, client_privacy
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.strategy import FedMedian, FedProx, QFedAvg
from fedlearn.strategy.base import ClientUpdate, CollectFold, RoundContext, WeightedMeanFold


def _ctx() -> RoundContext:
    return RoundContext(1, 3, np.random.default_rng(0))


def test_every_training_task_carries_the_dp_keys_on_top_of_the_strategys() -> None:
    wrapped = client_privacy(FedProx(proximal_mu=0.5, fraction_train=0.3), "example", 1.5, 0.9)
    assert wrapped.train_config(_ctx()) == {
        "proximal_mu": 0.5,
        "dp.mode": "example",
        "dp.clip": 1.5,
        "dp.noise_multiplier": 0.9,
        "dp.noise": "secure",
        "dp.delta": 1e-5,
    }
    assert wrapped.evaluate_config(_ctx()) == {}
    assert wrapped.fraction_train == 0.3 and wrapped.train_clients_per_round(10) == 3
    fold = wrapped.start_fold(_ctx(), {"w": np.zeros(2)})
    assert isinstance(fold, WeightedMeanFold)
    # secure aggregation accepts it wherever it accepts the wrapped strategy
    SecureAggregation().check(wrapped, 5)


def test_robust_and_own_fold_strategies_keep_their_rule() -> None:
    median = client_privacy(FedMedian(), "local", 1.0, 2.0, "seeded")
    assert type(median) is ClientPrivacy and not median.linear
    g = {"w": np.zeros(1)}
    fold = median.start_fold(_ctx(), g)
    assert isinstance(fold, CollectFold)
    for i, v in enumerate([1.0, 5.0, 2.0]):
        fold.add(ClientUpdate(i, {"w": np.array([v])}, 1))
    assert fold.result()["w"].tolist() == [2.0]  # the median, not the mean
    with pytest.raises(ConfigError):
        SecureAggregation().check(median, 5)
    q = client_privacy(QFedAvg(client_learning_rate=0.1), "local", 1.0, 2.0)
    assert type(q.start_fold(_ctx(), g)) is type(
        QFedAvg(client_learning_rate=0.1).start_fold(_ctx(), g)
    )


def test_distributed_dp_counts_the_survivors_and_accounts_each_round_with_them() -> None:
    from dp_accounting import dp_event

    from fedlearn.engine.results import RoundRecord
    from fedlearn.privacy.strategy import CountedSum
    from fedlearn.privacy.tracker import PrivacySettings, PrivacyTracker

    counted = CountedSum(inner=FedProx(proximal_mu=0.1))
    SecureAggregation().check(counted, 5)  # the secure path takes it like FedProx
    updates = [ClientUpdate(i, {}, 10, {"loss": 1.0}) for i in range(3)]
    assert counted.summarize_train(_ctx(), updates) == {"loss": 1.0, "dp.survivors": 3}

    def distributed_event(survivors: int) -> dp_event.DpEvent:
        # stand-in for the distributed part's calibration: fewer survivors, less noise
        return dp_event.GaussianDpEvent(0.5 * survivors)

    settings = PrivacySettings("distributed", 1.0, 1e-5, worst_survivors=2)
    tracker = PrivacyTracker(settings, distributed_event)
    ok = RoundRecord(1, True, 5, 5, train_metrics={"dp.survivors": 3})
    failed = RoundRecord(2, False, 5, 1, train_metrics={})
    assert tracker.round_events(ok, []) == (dp_event.GaussianDpEvent(1.5), {})
    assert tracker.round_events(failed, []) == (None, {})  # nothing was unmasked
    tracker.record(ok, [])
    # the budget's worst case: the fewest survivors a round can apply with
    worst = tracker.ledger.compose([dp_event.GaussianDpEvent(1.5), dp_event.GaussianDpEvent(1.0)])
    assert tracker.next_epsilon() == worst
    with pytest.raises(ConfigError, match="needs the distributed mechanism"):
        PrivacyTracker(settings)
