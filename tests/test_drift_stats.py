"""Drift statistics: hand-computed bins, PSI, KS and mean shift; summaries add up across
data sets; the wire, store and secure-sum encodings round-trip; the rule flags what moved."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from fedlearn.drift.codec import (
    from_bytes,
    pack_secure,
    reply_bytes,
    secure_length,
    split_reply,
    to_bytes,
    to_reply_arrays,
    unpack_secure,
)
from fedlearn.drift.rule import POPULATION, DriftRule, score_rounds
from fedlearn.drift.stats import (
    DataSummary,
    SummarySpec,
    bin_index,
    ks,
    label_psi,
    mean_shift,
    psi,
    psi_per_feature,
    summarize,
)
from fedlearn.engine.records import encode_arrays
from fedlearn.errors import ConfigError, DataError

SPEC = SummarySpec(bins=4, low=0.0, high=2.0, features=2, classes=3)


def test_bins_by_hand() -> None:
    # width 0.5: below 0 (and NaN) -> underflow 0; [0, .5) -> 1; ...; [1.5, 2) -> 4;
    # 2 and above -> overflow 5; float32 input is binned in float32, alike
    x = np.array([-1.0, 0.0, 0.49, 0.5, 1.99, 2.0, 2.01, np.nan])
    assert bin_index(x, SPEC).tolist() == [0, 1, 1, 2, 4, 5, 5, 0]
    assert bin_index(x.astype(np.float32), SPEC).tolist() == [0, 1, 1, 2, 4, 5, 5, 0]
    assert bin_index(np.array([3, -2]), SPEC).tolist() == [5, 0]  # integers: as float64
    offsets = np.array([0.0, 6.0])
    assert bin_index(np.array([[0.1, 0.1]]), SPEC, offsets).tolist() == [[1, 7]]


def test_summary_by_hand() -> None:
    x = np.array([[0.25, 3.0], [0.75, -1.0], [1.25, 1.0]])
    y = np.array([0, 2, 2])
    s = summarize(x, y, SPEC)
    assert s.count == 3
    assert s.hist.tolist() == [[0, 1, 1, 1, 0, 0], [1, 0, 0, 1, 0, 1]]  # 3.0 overflows
    assert s.labels.tolist() == [1, 0, 2]
    # winsorized to [0, 2]: the second feature counts as 2, 0, 1
    assert s.sums.tolist() == [2.25, 3.0]
    assert s.sumsq.tolist() == [0.0625 + 0.5625 + 1.5625, 5.0]
    assert s.mean().tolist() == [0.75, 1.0]
    assert np.allclose(s.var(), [(0.25 + 0 + 0.25) / 3, 2 / 3])


def test_psi_by_hand() -> None:
    # proportions (0.5, 0.5) -> (0.25, 0.75): -0.25 ln 0.5 + 0.25 ln 1.5
    expected = -0.25 * math.log(0.5) + 0.25 * math.log(1.5)
    assert psi_per_feature(np.array([[50, 50]]), np.array([[25, 75]]))[0] == pytest.approx(expected)
    assert label_psi(np.array([50, 50]), np.array([1, 3])) == pytest.approx(expected)
    assert psi_per_feature(np.array([[3, 7]]), np.array([[30, 70]]))[0] == pytest.approx(0.0)
    # an empty bin's proportion is floored at 1e-4 instead of making the index infinite
    floored = 0.5 * math.log(1 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
    got = psi_per_feature(np.array([[5, 5]]), np.array([[10, 0]]))[0]
    assert got == pytest.approx(floored)


def test_psi_of_summaries_is_the_mean_over_features() -> None:
    a = DataSummary(4, np.zeros(2), np.zeros(2), np.array([[2.0, 2, 0], [4, 0, 0]]), np.zeros(1))
    b = DataSummary(4, np.zeros(2), np.zeros(2), np.array([[1.0, 3, 0], [4, 0, 0]]), np.zeros(1))
    expected = -0.25 * math.log(0.5) + 0.25 * math.log(1.5)
    assert psi(a, b) == pytest.approx(expected / 2)


def test_mean_shift_by_hand() -> None:
    ref = summarize(np.array([[0.0], [2.0]]), None, SummarySpec(4, 0.0, 2.0))  # mean 1, var 1
    cur = summarize(np.array([[1.0], [2.0]]), None, SummarySpec(4, 0.0, 2.0))  # 1.5, 0.25
    assert mean_shift(ref, cur) == pytest.approx(0.5 / math.sqrt((1 + 0.25) / 2))
    assert mean_shift(ref, ref) == 0.0


def test_ks_equals_scipy_when_each_bin_holds_one_value() -> None:
    spec = SummarySpec(bins=10, low=0.0, high=10.0)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, 200) + 0.5  # bin centres: the binned CDF is the exact one
    b = rng.integers(2, 10, 150) + 0.5
    result = ks(summarize(a[:, None], None, spec).hist, summarize(b[:, None], None, spec).hist)
    reference = sps.ks_2samp(a, b, method="asymp")
    assert result.statistic[0] == pytest.approx(reference.statistic)
    assert result.pvalue[0] == pytest.approx(reference.pvalue)
    same = ks(summarize(a[:, None], None, spec).hist, summarize(a[:, None], None, spec).hist)
    assert same.max_statistic == 0.0 and same.min_pvalue == 1.0


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_sum_of_summaries_is_the_summary_of_the_union(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    parts = [(rng.normal(1.0, 1.5, (n, 2)), rng.integers(0, 3, n)) for n in sizes]
    total = summarize(
        np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), SPEC
    )
    summed = summarize(*parts[0], SPEC)
    for x, y in parts[1:]:
        summed = summed + summarize(x, y, SPEC)
    assert summed.count == total.count == sum(sizes)
    assert summed.hist.tolist() == total.hist.tolist()
    assert summed.labels.tolist() == total.labels.tolist()
    assert np.allclose(summed.sums, total.sums) and np.allclose(summed.sumsq, total.sumsq)


def test_reply_and_store_encodings_round_trip() -> None:
    s = summarize(np.array([[0.25, 3.0], [0.75, -1.0]]), np.array([1, 2]), SPEC)
    model = {"w": np.ones(3, np.float32)}
    arrays, back = split_reply({**model, **to_reply_arrays(s)}, SPEC)
    assert list(arrays) == ["w"] and back is not None
    for a, b in ((s, back), (s, from_bytes(to_bytes(s)))):
        assert a.count == b.count and a.hist.tolist() == b.hist.tolist()
        assert a.sums.tolist() == b.sums.tolist() and a.labels.tolist() == b.labels.tolist()
    assert split_reply(model, SPEC) == (model, None)


def test_a_malformed_summary_is_refused() -> None:
    s = to_reply_arrays(summarize(np.array([[0.25, 3.0]]), np.array([1]), SPEC))
    with pytest.raises(DataError, match="bins"):
        split_reply(s, SummarySpec(bins=5, low=0.0, high=2.0))
    bad = dict(s)
    bad["drift/count"] = np.array([7], np.uint32)  # histograms hold 1 row
    with pytest.raises(DataError, match="row count"):
        split_reply(bad, SPEC)
    with pytest.raises(DataError, match="uint32"):
        split_reply({**s, "drift/hist": s["drift/hist"].astype(np.float64)}, SPEC)
    with pytest.raises(DataError, match="exactly"):
        split_reply({k: v for k, v in s.items() if k != "drift/labels"}, SPEC)
    with pytest.raises(ConfigError):
        SummarySpec(bins=4, low=1.0, high=1.0)


def test_secure_packing_decodes_the_sum_of_the_clients_summaries() -> None:
    rng = np.random.default_rng(1)
    clip = 0.5
    clients = [summarize(rng.normal(1, 1, (n, 2)), rng.integers(0, 3, n), SPEC) for n in (5, 9)]
    assert secure_length(SPEC) == 2 * (4 + 4) + 3
    # the secure sum weights each client's vector by its num_examples (= its rows here)
    packed = [pack_secure(c, SPEC, clip) for c in clients]
    assert max(float(np.abs(p).max()) for p in packed) <= clip  # nothing is clipped away
    weighted = sum(c.count * p for c, p in zip(clients, packed, strict=True))
    population = unpack_secure(np.asarray(weighted), 14, SPEC, clip)
    total = clients[0] + clients[1]
    assert population.count == 14
    for name in ("hist", "labels", "sums", "sumsq"):
        assert np.allclose(getattr(population, name), getattr(total, name))


def _const(value: float, n: int = 10) -> DataSummary:
    return summarize(np.full((n, 2), value), np.zeros(n, np.int64), SPEC)


def test_the_rule_flags_the_site_that_moved_in_the_round_it_moved() -> None:
    stats = {
        1: {0: _const(0.2), 1: _const(0.2)},
        2: {0: _const(0.2), 1: _const(0.2)},
        3: {0: _const(0.2), 1: _const(1.7)},  # site 1 moved
        4: {0: _const(0.2), 1: _const(1.7)},  # and stayed there
        5: {0: _const(0.2)},  # site 1 sat out
    }
    scores = score_rounds(stats, DriftRule())
    assert [(s.round, s.site) for s in scores if s.flagged] == [(3, 1)]
    assert [(s.round, s.site, s.previous_round) for s in scores if s.round == 2] == [
        (2, 0, 1),
        (2, 1, 1),
    ]
    population = score_rounds(
        {1: {POPULATION: _const(0.2)}, 2: {POPULATION: _const(1.2)}}, DriftRule()
    )
    assert [(s.site, s.flagged) for s in population] == [(POPULATION, True)]
    with pytest.raises(ConfigError):
        DriftRule(psi_threshold=0)


def test_the_reply_limit_covers_a_summary() -> None:
    spec = SummarySpec(bins=12, low=0.0, high=1.0, features=784, classes=10)
    rng = np.random.default_rng(2)
    s = summarize(rng.random((50, 784)), rng.integers(0, 10, 50), spec)
    model = {"w": np.zeros(10, np.float32)}
    extra = len(encode_arrays({**model, **to_reply_arrays(s)})) - len(encode_arrays(model))
    assert extra <= reply_bytes(spec) < extra + 1024
    assert reply_bytes(SummarySpec()) == 0  # shape not fixed: the reply's slack holds it
