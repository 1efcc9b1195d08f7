"""The L2 norm the DP mechanisms clip by.

A sum of squares with numpy's pairwise summation, not BLAS: ``np.dot``/``np.linalg.norm``
go through OpenBLAS, whose threads, on a busy machine, cost milliseconds of CPU for one
18k-element vector (BENCHMARKS.md section 8); this costs microseconds and gives the same
value on every install.
"""

from __future__ import annotations

import math

import numpy as np


def l2_norm(x: np.ndarray) -> float:
    """``sqrt(sum(x**2))`` of ``x`` (any shape), in float64."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    return math.sqrt(float(np.square(flat).sum()))
