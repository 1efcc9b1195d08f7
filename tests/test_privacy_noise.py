"""DP noise sources: the distribution they draw, reproducibility of the seeded one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedlearn.privacy.noise import noise_source, secure_noise, seeded_noise


@pytest.mark.parametrize("kind", ["secure", "seeded"])
def test_normal_noise_is_standard_normal(kind: str) -> None:
    source = noise_source(kind, 7, 1)
    x = source.normal(1_000_001, std=2.5)  # odd: the last Box-Muller pair is cut
    assert x.shape == (1_000_001,) and x.dtype == np.float64
    # sd of the sample sd for n = 1e6 is about 0.07 %: 1 % is > 10 of them
    assert abs(x.std() / 2.5 - 1) < 0.01
    assert abs(x.mean()) < 5 * 2.5 / 1000
    # the whole shape, not only two moments (KS on 1e5 points)
    assert stats.kstest(x[:100_000] / 2.5, "norm").pvalue > 1e-4


def test_uniforms_are_strictly_inside_the_unit_interval() -> None:
    u = secure_noise().uniform(1 << 16)
    assert u.min() > 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def test_seeded_noise_repeats_for_a_key_and_differs_across_keys() -> None:
    a = seeded_noise(0, 3, 5).normal(1000)
    b = seeded_noise(0, 3, 5).normal(1000)
    c = seeded_noise(0, 3, 6).normal(1000)
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, c)


def test_secure_noise_never_repeats_and_hides_its_key() -> None:
    a, b = secure_noise(), secure_noise()
    assert a.secure and not seeded_noise(1).secure
    assert not np.array_equal(a.bits(64), b.bits(64))
    assert repr(a) == "SecureNoise()"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'secure' or 'seeded'"):
        noise_source("fast")
    with pytest.raises(ValueError, match="std"):
        secure_noise().normal(3, std=-1.0)


def test_small_requests_are_fresh_draws_from_the_block() -> None:
    source = secure_noise()
    a, b = source.normal(100), source.normal(100)
    assert not set(a.tolist()) & set(b.tolist())  # never the same normals twice
    a[:] = 0.0  # the caller owns what it got: the next draw is unaffected
    assert np.count_nonzero(source.normal(100)) == 100


def test_a_forked_child_never_continues_its_parents_noise() -> None:
    import multiprocessing

    parent = secure_noise()
    parent.normal(8)  # the parent has a key and a block of normals drawn ahead
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def child() -> None:
        writer.send((secure_noise().normal(8).tobytes(), secure_noise().bits(4).tobytes()))

    proc = ctx.Process(target=child)
    proc.start()
    normals, bits = reader.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert normals != parent.normal(8).tobytes()
    assert bits != parent.bits(4).tobytes()


def test_each_thread_has_its_own_source() -> None:
    import threading

    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(secure_noise()))
    thread.start()
    thread.join()
    assert got[0] is not secure_noise() and secure_noise() is secure_noise()
