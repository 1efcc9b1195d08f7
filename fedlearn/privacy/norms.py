"""The L2 norm the DP mechanisms clip by.

A sum of squares with numpy's pairwise summation, not BLAS: ``np.dot``/``np.linalg.norm``
go through OpenBLAS, whose threads, on a busy machine, cost milliseconds of CPU for one
18k-element vector (BENCHMARKS.md section 8); this costs microseconds and gives the same
value on every install.
"""

from __future__ import annotations

import math

import numpy as np


def sum_of_squares(x: np.ndarray) -> float:
    """``sum(x**2)`` of ``x`` (any shape), in float64, by pairwise summation."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    return float(np.square(flat).sum())


def l2_norm(x: np.ndarray) -> float:
    """``sqrt(sum(x**2))`` of ``x`` (any shape), in float64."""
    return math.sqrt(sum_of_squares(x))
