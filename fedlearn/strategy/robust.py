"""Byzantine-robust aggregation rules: Krum, MultiKrum, Bulyan, FedMedian, FedTrimmedAvg.

These rules are holistic (``linear = False``): they need every update of the round at
once, so the coordinator collects them (:class:`~fedlearn.strategy.base.CollectFold`) and
calls :meth:`combine`. Everything is vectorized with NumPy: the pairwise squared distances
come from the Gram-matrix product of the flattened, stacked updates (accumulated over
column blocks to bound memory); medians, trimmed
means and "closest to the median" selections run along the client axis of each stacked
array. Loops run over clients or over named arrays, never over coordinates.

``validate(num_clients)`` checks a rule can run with the number of clients sampled per
round; ``combine`` checks again with the number of updates that actually arrived (some
clients may have failed) and raises :class:`~fedlearn.errors.RoundFailed` if it cannot.

Integer and bool arrays are aggregated in float64 and rounded back to their dtype.

Flower reference (1.42): ``flwr.server.strategy.aggregate`` (legacy) and
``flwr.serverapp.strategy`` (Message-API). They agree on Krum, MultiKrum, FedMedian and
FedTrimmedAvg (MultiKrum averages the selected updates weighted by ``num_examples``; the
others are unweighted). For Bulyan they differ in the first stage, see :class:`Bulyan`.
Flower computes distances in the arrays' dtype; we use float64 after centering, which
only matters for near ties.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from fedlearn.engine.records import Arrays
from fedlearn.errors import ConfigError, RoundFailed
from fedlearn.strategy.base import ClientUpdate, RoundContext, WeightedMeanFold
from fedlearn.strategy.fedavg import FedAvg, check_range, is_float_array, restore_dtype

BULYAN_SELECTIONS = ("multikrum", "krum")


GRAM_BLOCK_ELEMENTS = 1 << 24
"""How many float64 values (clients x columns) one block of the Gram product may hold."""


def pairwise_sq_distances(
    updates: Sequence[ClientUpdate], *, block_elements: int = GRAM_BLOCK_ELEMENTS
) -> np.ndarray:
    """Squared Euclidean distances between the updates, each flattened to one vector.

    Uses ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` with the Gram matrix of the stacked,
    flattened updates (a matrix product, float64). The columns are centered first:
    distances do not change, and the cancellation in the formula stays at the scale of
    the spread between clients rather than of the model's norm. To bound memory the
    product is accumulated over blocks of columns (at most ``block_elements`` values at a
    time) instead of materializing the whole ``clients x parameters`` matrix.
    """
    n = len(updates)
    gram = np.zeros((n, n))
    width = max(1, block_elements // max(n, 1))
    block = np.empty((n, width))
    for name in updates[0].arrays:
        flat = [np.ravel(u.arrays[name]) for u in updates]
        size = flat[0].size
        for start in range(0, size, width):
            stop = min(size, start + width)
            cols = block[:, : stop - start]
            for row, values in zip(cols, flat, strict=True):
                row[:] = values[start:stop]
            cols -= cols.mean(axis=0)
            gram += cols @ cols.T
    norms = np.diag(gram).copy()
    dist: np.ndarray = norms[:, None] + norms[None, :] - 2.0 * gram
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def krum_scores(dist: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum score of each row: the sum of its ``n - f - 2`` smallest distances to others.

    As in Flower the count is at least 1 (and at most ``n - 1``).
    """
    n = dist.shape[0]
    k = min(max(1, n - num_malicious - 2), n - 1)
    if k <= 0:
        return np.zeros(n)
    others = dist.copy()
    np.fill_diagonal(others, np.inf)
    scores: np.ndarray = np.partition(others, k - 1, axis=1)[:, :k].sum(axis=1)
    return scores


def multikrum_select(dist: np.ndarray, num_malicious: int, count: int) -> list[int]:
    """Indices of the ``count`` lowest Krum scores, best first (scores computed once)."""
    scores = krum_scores(dist, num_malicious)
    return [int(i) for i in np.argsort(scores, kind="stable")[:count]]


def iterated_krum_select(dist: np.ndarray, num_malicious: int, count: int) -> list[int]:
    """Pick by Krum ``count`` times, removing each pick and rescoring the rest."""
    remaining = list(range(dist.shape[0]))
    chosen: list[int] = []
    for _ in range(count):
        sub = dist[np.ix_(remaining, remaining)]
        best = int(np.argmin(krum_scores(sub, num_malicious)))
        chosen.append(remaining.pop(best))
    return chosen


def stacked(updates: Sequence[ClientUpdate], name: str) -> np.ndarray:
    """Array ``name`` of every update, stacked along a new first (client) axis.

    Non-floating arrays are converted to float64.
    """
    stack = np.stack([np.asarray(u.arrays[name]) for u in updates])
    return stack if is_float_array(stack) else stack.astype(np.float64)


def mean_closest_to_median(stack: np.ndarray, count: int) -> np.ndarray:
    """Per coordinate, the mean of the ``count`` values closest to the coordinate's median."""
    median = np.median(stack, axis=0)
    gap = np.abs(stack - median)
    nearest = np.argpartition(gap, count - 1, axis=0)[:count]
    return np.asarray(np.take_along_axis(stack, nearest, axis=0).mean(axis=0))


def trimmed_mean(stack: np.ndarray, beta: float) -> np.ndarray:
    """Per coordinate, the mean after dropping the ``int(beta * n)`` lowest and highest."""
    n = stack.shape[0]
    cut = int(beta * n)
    kept = np.partition(stack, (cut, n - cut - 1), axis=0)[cut : n - cut]
    return np.asarray(kept.mean(axis=0))


def _copy_arrays(arrays: Arrays) -> Arrays:
    return {name: np.array(a, copy=True) for name, a in arrays.items()}


def _weighted_mean(updates: Sequence[ClientUpdate]) -> Arrays:
    fold = WeightedMeanFold()
    for update in updates:
        fold.add(update)
    first = updates[0].arrays
    return {name: restore_dtype(a, first[name].dtype) for name, a in fold.result().items()}


@dataclass(frozen=True, kw_only=True)
class RobustStrategy(FedAvg):
    """Base of the holistic rules: collects every update and calls :meth:`combine`."""

    linear: ClassVar[bool] = False

    def min_updates(self) -> int:
        """The fewest updates the rule can run on."""
        return 1

    def requirement(self) -> str:
        """The rule's client requirement, in words (for error messages)."""
        return f"at least {self.min_updates()} updates"

    def validate(self, num_clients: int) -> None:
        """Also check the rule can run with the clients sampled per round."""
        super().validate(num_clients)
        per_round = self.train_clients_per_round(num_clients)
        if per_round < self.min_updates():
            raise ConfigError(
                f"{type(self).__name__}: {self._settings()} needs {self.requirement()} per "
                f"round, but only {per_round} of the {num_clients} clients are sampled per "
                f"round (fraction_train={self.fraction_train}, "
                f"min_train_clients={self.min_train_clients})"
            )

    def _settings(self) -> str:
        return "this rule"

    def _check_count(self, updates: Sequence[ClientUpdate]) -> None:
        if len(updates) < self.min_updates():
            raise RoundFailed(
                f"{type(self).__name__}: {self._settings()} needs {self.requirement()}, "
                f"but only {len(updates)} client updates arrived this round"
            )

    def combine(
        self, ctx: RoundContext, global_arrays: Arrays, updates: Sequence[ClientUpdate]
    ) -> Arrays:
        """Check the number of updates, then apply :meth:`aggregate`."""
        self._check_count(updates)
        return self.aggregate(updates)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Arrays:
        """The rule itself, on enough updates."""
        raise NotImplementedError(f"{type(self).__name__} has no aggregation rule")


@dataclass(frozen=True, kw_only=True)
class Krum(RobustStrategy):
    """Krum (Blanchard et al., 2017): the single update closest to its neighbours.

    Each update's score is the sum of squared distances to its ``n - f - 2`` nearest other
    updates; the update with the lowest score becomes the new model. Requires
    ``n > 2 f + 2`` updates. Field: ``num_malicious`` (``f``, default 0, >= 0).
    """

    num_malicious: int = 0

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "num_malicious", low=0)

    def min_updates(self) -> int:
        """``2 f + 3``, i.e. ``n > 2 f + 2``."""
        return 2 * self.num_malicious + 3

    def requirement(self) -> str:
        """In words."""
        return f"more than 2*f+2 = {2 * self.num_malicious + 2} clients"

    def _settings(self) -> str:
        return f"num_malicious={self.num_malicious}"

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Arrays:
        """A copy of the arrays of the best-scoring update."""
        dist = pairwise_sq_distances(updates)
        best = multikrum_select(dist, self.num_malicious, 1)[0]
        return _copy_arrays(updates[best].arrays)


@dataclass(frozen=True, kw_only=True)
class MultiKrum(RobustStrategy):
    """MultiKrum (El Mhamdi et al., 2018): average the ``num_to_keep`` best Krum scores.

    Scores as in :class:`Krum`; the ``num_to_keep`` updates with the lowest scores are
    averaged weighted by ``num_examples`` (as Flower does). Requires ``n > 2 f + 2`` and
    ``1 <= num_to_keep <= n``. Fields: ``num_malicious`` (default 0, >= 0),
    ``num_to_keep`` (default 1, as in Flower, which makes it Krum).
    """

    num_malicious: int = 0
    num_to_keep: int = 1

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "num_malicious", low=0)
        check_range(self, "num_to_keep", low=1)

    def min_updates(self) -> int:
        """``max(2 f + 3, num_to_keep)``."""
        return max(2 * self.num_malicious + 3, self.num_to_keep)

    def requirement(self) -> str:
        """In words."""
        return (
            f"more than 2*f+2 = {2 * self.num_malicious + 2} clients and at least "
            f"num_to_keep = {self.num_to_keep}"
        )

    def _settings(self) -> str:
        return f"num_malicious={self.num_malicious}, num_to_keep={self.num_to_keep}"

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Arrays:
        """Weighted mean of the selected updates."""
        dist = pairwise_sq_distances(updates)
        chosen = multikrum_select(dist, self.num_malicious, self.num_to_keep)
        return _weighted_mean([updates[i] for i in chosen])


@dataclass(frozen=True, kw_only=True)
class Bulyan(RobustStrategy):
    """Bulyan (El Mhamdi et al., 2018): a Krum-based selection, then a trimmed mean.

    With ``n`` updates and ``f = num_malicious``: select ``theta = n - 2f`` updates with a
    Krum-based rule; then, per coordinate, average the ``beta = theta - 2f`` selected
    values closest to the selected values' median. Requires ``n >= 4f + 3``.

    ``selection`` picks the first stage:

    * ``"multikrum"`` (default): the ``theta`` lowest Krum scores, computed once over all
      ``n`` updates. This is Flower's Message-API ``flwr.serverapp.strategy.Bulyan``.
    * ``"krum"``: Krum applied ``theta`` times, each time removing the pick and rescoring
      the remaining updates (neighbour count ``max(1, r - f - 2)`` for ``r`` remaining), as
      in the paper and Flower's legacy ``flwr.server.strategy.aggregate.aggregate_bulyan``.

    Both stages are unweighted.
    """

    num_malicious: int = 0
    selection: str = "multikrum"

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "num_malicious", low=0)
        if self.selection not in BULYAN_SELECTIONS:
            raise ConfigError(
                f"Bulyan: selection must be one of {', '.join(BULYAN_SELECTIONS)}, "
                f"got {self.selection!r}"
            )

    def min_updates(self) -> int:
        """``4 f + 3``."""
        return 4 * self.num_malicious + 3

    def requirement(self) -> str:
        """In words."""
        return f"at least 4*f+3 = {self.min_updates()} clients"

    def _settings(self) -> str:
        return f"num_malicious={self.num_malicious}"

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Arrays:
        """Select ``n - 2f`` updates, then average around the coordinate-wise median."""
        f = self.num_malicious
        theta = len(updates) - 2 * f
        beta = theta - 2 * f
        dist = pairwise_sq_distances(updates)
        select = multikrum_select if self.selection == "multikrum" else iterated_krum_select
        chosen = [updates[i] for i in select(dist, f, theta)]
        out: Arrays = {}
        for name, a in updates[0].arrays.items():
            values = mean_closest_to_median(stacked(chosen, name), beta)
            out[name] = restore_dtype(values, np.asarray(a).dtype)
        return out


@dataclass(frozen=True, kw_only=True)
class FedMedian(RobustStrategy):
    """Coordinate-wise median of the updates (Yin et al., 2018); unweighted."""

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Arrays:
        """Median along the client axis of each array."""
        out: Arrays = {}
        for name, a in updates[0].arrays.items():
            values = np.median(stacked(updates, name), axis=0)
            out[name] = restore_dtype(values, np.asarray(a).dtype)
        return out


@dataclass(frozen=True, kw_only=True)
class FedTrimmedAvg(RobustStrategy):
    """Coordinate-wise trimmed mean (Yin et al., 2018); unweighted.

    Per coordinate, the ``int(beta * n)`` smallest and largest values are dropped and the
    rest averaged (scipy's ``trim_mean`` convention, as in Flower). Field: ``beta``
    (default 0.2, in [0, 0.5)).
    """

    beta: float = 0.2

    def _check_settings(self) -> None:
        super()._check_settings()
        check_range(self, "beta", low=0.0, high=0.5, high_open=True)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> Arrays:
        """Trimmed mean along the client axis of each array."""
        out: Arrays = {}
        for name, a in updates[0].arrays.items():
            values = trimmed_mean(stacked(updates, name), self.beta)
            out[name] = restore_dtype(values, np.asarray(a).dtype)
        return out
