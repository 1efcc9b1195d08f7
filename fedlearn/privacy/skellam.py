"""Discrete noise for distributed DP: Poisson and Skellam samplers on a :class:`NoiseSource`.

Every random bit comes from the source's :meth:`~fedlearn.privacy.noise.NoiseSource.uniform`
(the ChaCha20 keystream of :func:`~fedlearn.privacy.noise.secure_noise`, or a seeded PCG64
for tests and replays), never from numpy's global state, so a secure run's noise is as
unpredictable as its masks.

* Poisson(lam), ``lam < 10``: inversion against the exact cumulative table (one uniform
  per sample, a binary search).
* Poisson(lam), ``lam >= 10``: Hörmann's transformed rejection with squeeze ("PTRS",
  Hörmann 1993, *The transformed rejection method for generating Poisson random
  variables*), two uniforms per trial, about 1.1 trials per sample, vectorized: a pass
  draws candidates for all the samples still needed, with a margin for rejections. The
  acceptance test compares against
  ``log P(k)`` written as ``(k - lam) - k log1p((k - lam)/lam) - log sqrt(2 pi k) - S(k)``
  (Stirling with three correction terms, exact table below 16), which stays accurate to
  about 1e-12 even for ``lam`` near 2^50 where ``k log lam - lam - lgamma(k + 1)`` would
  lose five digits to cancellation.
* Skellam(v): the difference of two independent Poisson(v / 2); mean 0, variance ``v``,
  and the sum of independent Skellams is Skellam with the summed variance (what makes it
  the noise of choice when an unknown subset of clients survives).

Floating point makes these samplers exact only up to double rounding (about 2^-50 in
each probability), like every floating-point sampler in DP libraries; the distributions
are checked by tests against their moments and pmf.
"""

from __future__ import annotations

import math

import numpy as np

from fedlearn.privacy.noise import NoiseSource

_SMALL = 10.0
_BLOCK = 1 << 15
_TABLE = 16
_LOG_FACTORIAL = np.array([math.lgamma(k + 1) for k in range(_TABLE)])
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_pmf(k: np.ndarray, lam: float) -> np.ndarray:
    """``log P(K = k)`` for ``K ~ Poisson(lam)``, ``k >= 0`` (float array of integers)."""
    out = np.empty_like(k)
    small = k < _TABLE
    if small.any():
        ks = k[small]
        out[small] = ks * math.log(lam) - lam - _LOG_FACTORIAL[ks.astype(np.int64)]
    big = ~small
    if big.any():
        kb = k[big]
        diff = kb - lam
        inv = 1.0 / kb
        inv2 = inv * inv
        stirling = inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 / 1260.0))
        out[big] = diff - kb * np.log1p(diff / lam) - _HALF_LOG_2PI - 0.5 * np.log(kb) - stirling
    return out


def _poisson_inversion(source: NoiseSource, lam: float, size: int) -> np.ndarray:
    """Poisson(lam) by inversion of the cumulative table (``lam < 10``)."""
    probs = [math.exp(-lam)]
    cdf = [probs[0]]
    k = 0
    while cdf[-1] < 1.0 and probs[-1] > 1e-300 and k < 400:
        k += 1
        probs.append(probs[-1] * lam / k)
        cdf.append(cdf[-1] + probs[-1])
    table = np.array(cdf)
    u = source.uniform(size)
    out = np.searchsorted(table, u, side="left")
    np.minimum(out, table.size - 1, out=out)
    return out.astype(np.int64)


def _ptrs_trial(
    source: NoiseSource, lam: float, n: int, shape: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """One PTRS trial for ``n`` samples: candidate ``k`` (float) and which are accepted."""
    a, b, log_inv_alpha, vr = shape
    draws = source.uniform(2 * n)
    u, v = draws[:n], draws[n:]
    u -= 0.5
    us = np.abs(u)
    np.subtract(0.5, us, out=us)
    k = np.divide(2.0 * a, us)
    k += b
    k *= u
    k += lam + 0.43
    np.floor(k, out=k)
    accept = us >= 0.07
    accept &= v <= vr
    slow = np.flatnonzero(~accept)  # about 12 %: the squeeze failed, test exactly
    if slow.size:
        ks, uss, vs = k[slow], us[slow], v[slow]
        keep = (ks >= 0) & ~((uss < 0.013) & (vs > uss))
        idx = np.flatnonzero(keep)
        if idx.size:
            ui = uss[idx]
            lhs = np.log(vs[idx]) + log_inv_alpha - np.log(a / (ui * ui) + b)
            keep[idx] = lhs <= _log_pmf(ks[idx], lam)
        keep[np.flatnonzero(~(ks >= 0))] = False
        accept[slow] = keep
    return k, accept


def _poisson_ptrs(source: NoiseSource, lam: float, size: int) -> np.ndarray:
    """Poisson(lam) by Hörmann's transformed rejection (``lam >= 10``).

    The first pass draws enough candidates that, at PTRS's acceptance rate (above 0.88
    for every ``lam >= 10``), it nearly always yields ``size`` accepted samples: the
    accepted ones are the sample, in order; only a short pass tops up a rare shortfall.
    (Each pass costs a dozen numpy calls, so for the few dozen coordinates of a small
    model one pass instead of three is most of the sampler's time.)
    """
    b = 0.931 + 2.53 * math.sqrt(lam)
    a = -0.059 + 0.02483 * b
    shape = (a, b, math.log(1.1239 + 1.1328 / (b - 3.4)), 0.9277 - 3.6224 / (b - 2.0))
    out = np.empty(size, np.int64)
    done = 0
    while done < size:
        need = size - done
        k, accept = _ptrs_trial(source, lam, int(need / 0.88 + 4.0 * math.sqrt(need)) + 8, shape)
        got = k[accept][:need]
        out[done : done + got.size] = got
        done += got.size
    return out


def poisson(source: NoiseSource, lam: float, size: int) -> np.ndarray:
    """``size`` independent Poisson(``lam``) samples (``int64``) from ``source``."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if not (math.isfinite(lam) and 0.0 <= lam <= 2.0**52):
        raise ValueError(f"Poisson rate must be in [0, 2^52], got {lam}")
    if size == 0 or lam == 0.0:
        return np.zeros(size, np.int64)
    sample = _poisson_inversion if lam < _SMALL else _poisson_ptrs
    if size <= _BLOCK:
        return sample(source, lam, size)
    out = np.empty(size, np.int64)
    for start in range(0, size, _BLOCK):  # bounded temporaries, cache-sized blocks
        stop = min(size, start + _BLOCK)
        out[start:stop] = sample(source, lam, stop - start)
    return out


def skellam(source: NoiseSource, variance: float, size: int) -> np.ndarray:
    """``size`` independent symmetric Skellam samples of variance ``variance`` (``int64``):
    ``Poisson(variance / 2) - Poisson(variance / 2)``."""
    both = poisson(source, variance / 2.0, 2 * size)
    out: np.ndarray = both[:size] - both[size:]
    return out


__all__ = ["poisson", "skellam"]
