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
