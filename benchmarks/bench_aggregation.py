"""Linear aggregation throughput: ``WeightedMeanFold`` versus the machine's memory bandwidth.

Folds ``--updates`` client updates of ``--size`` float32 each (weights = num_examples)
through fedlearn's streaming :class:`~fedlearn.strategy.base.WeightedMeanFold` and
compares, in the same run, with

* memory copy bandwidth: ``np.copyto`` of a 512 MiB array, counting read + write
  (as ``shared/peers/limits/sum_bench.py`` does);
* a bare ``np.add(acc, v, out=acc)`` loop (an unweighted sum: the floor of any fold);
* alternative weighted folds that keep the result bit-identical to the reference
  ``sum(w_i * x_i)`` taken in arrival order, then ``/ sum(w_i)`` (the operation order of
  Flower's ``aggregate``): cache-blocked multiply-add, the same split over threads.

Effective bandwidth = input bytes (updates x size x 4) / time. Every variant's result
is checked bit for bit against the reference. Prints ``aggregation/memcopy = X``.

Usage (from the repo root)::

    python benchmarks/bench_aggregation.py [--updates 100 --size 1000000 --reps 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from fedlearn.strategy.base import ClientUpdate, WeightedMeanFold  # noqa: E402


def median_time(fn: Callable[[], object], reps: int) -> tuple[float, list[float]]:
    """Median wall time of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


MEMCOPY_BYTES = 2**29  # 512 MiB


def memcopy_times(reps: int) -> list[float]:
    """Times of ``np.copyto`` of a 512 MiB float32 array (after a warm-up copy)."""
    a = np.ones(MEMCOPY_BYTES // 4, dtype=np.float32)
    b = np.empty_like(a)
    return median_time(lambda: np.copyto(b, a), reps)[1]


# --------------------------------------------------------------------------- folds
def reference(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """``sum(w_i * x_i)`` in order, then ``/ total``: Flower's ``aggregate`` formula."""
    total = sum(u.num_examples for u in updates)
    weighted = [u.arrays["x"] * u.num_examples for u in updates]
    acc = weighted[0]
    for w in weighted[1:]:
        acc = np.add(acc, w)
    return acc / total


def fedlearn_fold(updates: Sequence[ClientUpdate]) -> np.ndarray:
    """fedlearn's WeightedMeanFold, one update at a time."""
    fold = WeightedMeanFold()
    for u in updates:
        fold.add(u)
    return fold.result()["x"]


def bare_add(vectors: Sequence[np.ndarray], acc: np.ndarray) -> np.ndarray:
    """Unweighted in-place sum (not a mean): the floor a fold can approach."""
    acc[:] = 0
    for v in vectors:
        np.add(acc, v, out=acc)
    return acc


class BlockedFold:
    """Streaming weighted mean with the multiply-add done in cache-sized blocks.

    Same operations and order as WeightedMeanFold (``acc = w0*x0``; ``acc += w_i*x_i``
    with the product rounded to the dtype first; one division at the end), but the
    temporary ``w_i*x_i`` is only ``block`` elements long, so it stays in L1/L2 instead
    of streaming a full-size scratch array through memory on every update.
    """

    def __init__(self, block: int, threads: int = 1, pool: ThreadPoolExecutor | None = None):
        self.block = block
        self.threads = threads
        self.pool = pool
        self._acc: np.ndarray | None = None
        self._scratch: list[np.ndarray] = []
        self._total = 0.0

    def _ranges(self, n: int) -> list[tuple[int, int]]:
        step = -(-n // self.threads)
        return [(s, min(n, s + step)) for s in range(0, n, step)]

    def _span(
        self, x: np.ndarray, w: np.ndarray, lo: int, hi: int, tmp: np.ndarray, first: bool
    ) -> None:
        acc, b = self._acc, self.block
        assert acc is not None
        for s in range(lo, hi, b):
            e = min(hi, s + b)
            if first:
                np.multiply(x[s:e], w, out=acc[s:e])
            else:
                t = tmp[: e - s]
                np.multiply(x[s:e], w, out=t)
                np.add(acc[s:e], t, out=acc[s:e])

    def add(self, update: ClientUpdate) -> None:
        x = update.arrays["x"].reshape(-1)
        first = self._acc is None
        if first:
            self._acc = np.empty(x.shape, x.dtype)
            self._scratch = [np.empty(self.block, x.dtype) for _ in range(self.threads)]
        w = np.asarray(float(update.num_examples), x.dtype)
        spans = self._ranges(x.size)
        if self.pool is None or len(spans) == 1:
            for (lo, hi), tmp in zip(spans, self._scratch, strict=True):
                self._span(x, w, lo, hi, tmp, first)
        else:
            futures = [
                self.pool.submit(self._span, x, w, lo, hi, tmp, first)
                for (lo, hi), tmp in zip(spans, self._scratch, strict=True)
            ]
            for f in futures:
                f.result()
        self._total += float(update.num_examples)

    def result(self) -> np.ndarray:
        assert self._acc is not None
        return self._acc / np.asarray(self._total, self._acc.dtype)


def blocked_fold(
    updates: Sequence[ClientUpdate],
    block: int,
    threads: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    fold = BlockedFold(block, threads, pool)
    for u in updates:
        fold.add(u)
    return fold.result()


def chunk_major(updates: Sequence[ClientUpdate], block: int) -> np.ndarray:
    """Not streaming (needs all updates at once): block-outer, update-inner, for reference."""
    n = updates[0].arrays["x"].size
    acc = np.empty(n, np.float32)
    tmp = np.empty(block, np.float32)
    ws = [np.asarray(float(u.num_examples), np.float32) for u in updates]
    xs = [u.arrays["x"] for u in updates]
    for s in range(0, n, block):
        e = min(n, s + block)
        a, t = acc[s:e], tmp[: e - s]
        np.multiply(xs[0][s:e], ws[0], out=a)
        for x, w in zip(xs[1:], ws[1:], strict=True):
            np.multiply(x[s:e], w, out=t)
            np.add(a, t, out=a)
    return acc / np.asarray(float(sum(u.num_examples for u in updates)), np.float32)


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=100)
    p.add_argument("--size", type=int, default=1_000_000, help="float32 elements per update")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument(
        "--blocks",
        default="16384,32768,65536,131072",
        help="block sizes (elements) for the blocked variants",
    )
    args = p.parse_args()

    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(args.size, dtype=np.float32) for _ in range(args.updates)]
    weights = rng.integers(50, 5000, size=args.updates)
    pairs = zip(vectors, weights, strict=True)
    updates = [ClientUpdate(i, {"x": v}, int(n)) for i, (v, n) in enumerate(pairs)]
    in_bytes = args.updates * args.size * 4
    threads = os.cpu_count() or 1
    print(
        f"machine: {platform.machine()}, {threads} cores; numpy {np.__version__}; "
        f"{args.updates} updates x {args.size:,} float32 = {in_bytes / 1e6:.0f} MB input; "
        f"medians of {args.reps}"
    )

    copy_before = memcopy_times(args.reps)
    copy_t = statistics.median(copy_before)
    copy_bw = 2 * MEMCOPY_BYTES / copy_t / 1e9
    print(f"memcopy 512 MiB: {copy_t * 1e3:.1f} ms -> {copy_bw:.1f} GB/s (read+write)", flush=True)

    expected = reference(updates)
    acc = np.zeros(args.size, np.float32)
    variants: list[tuple[str, Callable[[], np.ndarray], bool]] = [
        ("bare np.add loop (unweighted sum)", lambda: bare_add(vectors, acc), False),
        ("WeightedMeanFold (fedlearn)", lambda: fedlearn_fold(updates), True),
        ("reference list formula", lambda: reference(updates), True),
    ]
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    for b in (int(s) for s in args.blocks.split(",") if s):
        variants.append(
            (f"blocked fold, block={b // 1024}K", lambda b=b: blocked_fold(updates, b), True)
        )
    if pool is not None:
        variants.append(
            (
                f"blocked fold, block=64K, {threads} threads",
                lambda: blocked_fold(updates, 65536, threads, pool),
                True,
            )
        )
    variants.append(
        ("block-major (all updates at once), block=64K", lambda: chunk_major(updates, 65536), True)
    )

    # Warm up and check every variant, then time them round-robin (rep by rep) so that
    # noise from other tenants of this shared machine spreads over all variants alike.
    checks: list[bool | None] = []
    errors: list[float] = []
    for _, fn, check in variants:
        out = fn()
        checks.append(bool(np.array_equal(out, expected)) if check else None)
        scale = float(np.max(np.abs(expected)))
        errors.append(float(np.max(np.abs(out - expected))) / scale if check else 0.0)
        del out
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(args.reps):
        for i, (_, fn, _) in enumerate(variants):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    results = []
    for (name, _, _), ts, same, err in zip(variants, times, checks, errors, strict=True):
        t = statistics.median(ts)
        bw = in_bytes / t / 1e9
        results.append((name, t, bw, same))
        tag = (
            ""
            if same is None
            else ("  bit-identical" if same else f"  max abs diff / max abs value {err:.1e}")
        )
        print(
            f"{name:<48} {t * 1e3:8.1f} ms  {bw:6.1f} GB/s  {bw / copy_bw:5.2f} x memcopy{tag}"
            f"   (min {min(ts) * 1e3:.1f} ms)",
            flush=True,
        )
    if pool is not None:
        pool.shutdown()

    copy_after = memcopy_times(args.reps)
    copy_t = statistics.median(copy_before + copy_after)
    copy_bw = 2 * MEMCOPY_BYTES / copy_t / 1e9
    print(
        f"memcopy 512 MiB again: {statistics.median(copy_after) * 1e3:.1f} ms; median of "
        f"both sets {copy_t * 1e3:.1f} ms -> {copy_bw:.1f} GB/s (read+write), used below"
    )
    fold_bw = next(bw for name, _, bw, _ in results if name.startswith("WeightedMeanFold"))
    bare_bw = results[0][2]
    best = max((r for r in results if r[3]), key=lambda r: r[2])
    print()
    print(f"aggregation/memcopy = {fold_bw / copy_bw:.2f}   (WeightedMeanFold; target >= 0.5)")
    print(f"bare-add/memcopy = {bare_bw / copy_bw:.2f}   (the floor: an unweighted sum)")
    print(
        f"best bit-identical variant: {best[0]}: {best[1] * 1e3:.1f} ms, "
        f"{best[2]:.1f} GB/s, {best[2] / copy_bw:.2f} x memcopy, "
        f"{fold_bw and best[2] / fold_bw:.2f} x WeightedMeanFold"
    )


if __name__ == "__main__":
    main()
