"""The L2 norm the DP mechanisms clip by.

A sum of squares with numpy's pairwise summation, not BLAS: ``np.dot``/``np.linalg.norm``
go through OpenBLAS, whose threads, on a busy machine, cost milliseconds of CPU for one
18k-element vector (BENCHMARKS.md section 8); this costs microseconds and gives the same
value on every install.
"""

from __future__ import annotations

import math

import numpy as np


def sum_of_squares(x: np.ndarray, scratch: np.ndarray | None = None) -> float:
    """``sum(x**2)`` of ``x`` (any shape), in float64, by pairwise summation; the squares
    go to ``scratch`` (float64, ``x``'s size) when given, so a caller that takes many norms
    of one size allocates nothing."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    return float(np.square(flat, out=scratch).sum())


def l2_norm(x: np.ndarray) -> float:
    """``sqrt(sum(x**2))`` of ``x`` (any shape), in float64."""
    return math.sqrt(sum_of_squares(x))
