"""Local differential privacy: each update is clipped and noised before it leaves the client.

The client runtime (:class:`fedlearn.engine.runtime.ClientRuntime`) wraps every ClientApp
in :class:`PrivateTraining`, so this works for any app, in every transport (in-process,
worker pool, a site daemon over gRPC, the setup stage of secure aggregation). When a
training task's config carries ``dp.mode = "local"`` (:mod:`fedlearn.privacy.keys`), or
the site sets a floor of its own (:class:`LocalDPFloor`, ``[privacy]`` in ``site.toml``),
the app's new arrays become::

    delta  = new - global                          (float arrays, as one float64 vector)
    delta *= min(1, C / ||delta||_2)                (clip)
    delta += N(0, (sigma * C)^2) per coordinate     (noise)
    new    = global + delta                         (cast back to each array's dtype)

Arrays that are not floating point (counters such as BatchNorm's ``num_batches_tracked``)
go back as the global model's values: noise cannot protect them, so they carry nothing.
The reply keeps only the ``dp.*`` metrics (the app's own training metrics, say a loss on
the training data, are not privatized, so they stay on the client) and reports
``dp.noise_multiplier`` and ``dp.clip``. ``num_examples`` still leaves: weighting needs
it, and it reveals the size of the client's training set.

Noise comes from :mod:`fedlearn.privacy.noise`: the ChaCha20 stream under a fresh key
(``dp.noise = "secure"``), or, only when asked, PCG64 keyed by the task seed (``"seeded"``),
which makes a seeded run reproducible and protects nobody who knows the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from fedlearn.engine.client_app import ClientApp, ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.records import Arrays, Config, Metrics
from fedlearn.privacy import keys
from fedlearn.privacy.keys import NoiseKind, TaskDP
from fedlearn.privacy.noise import noise_source
from fedlearn.privacy.norms import l2_norm

LOCAL_DP_STREAM = 0x4C4450
"""Second word of a seeded local-DP noise key ``(task seed, LOCAL_DP_STREAM)``: keeps the
noise apart from ``ClientContext.rng``, which PCG64 draws from the task seed alone."""


@dataclass(frozen=True)
class LocalDPFloor:
    """The least local DP a site applies to every update it sends, whatever it is asked.

    ``noise_multiplier`` is the smallest sigma the site sends with (its guarantee depends
    on sigma alone: the noise's std is ``sigma * C`` and the update moves by at most
    ``2C``); ``clip`` is C when the coordinator asks for no local DP. Seeded noise only
    when the site says ``noise = "seeded"`` too.
    """

    noise_multiplier: float
    clip: float = 1.0
    noise: NoiseKind = "secure"

    def __post_init__(self) -> None:
        """Reject values no mechanism can run with."""
        TaskDP("local", self.noise_multiplier, self.clip, self.noise)


def local_dp(config: Mapping[str, object], floor: LocalDPFloor | None = None) -> TaskDP | None:
    """The local DP to apply to a training task's update (None: none).

    The task's own request (``dp.mode = "local"``), raised to the site's ``floor``: sigma
    is at least the floor's; C is the task's when it asks for local DP (else the floor's);
    the noise is seeded only when both ask for seeded noise (or the floor alone, when the
    task asks for no local DP).
    """
    asked = keys.task_dp(config)
    if asked is not None and asked.mode != "local":
        asked = None
    if floor is None:
        return asked
    if asked is None:
        return TaskDP("local", floor.noise_multiplier, floor.clip, floor.noise)
    seeded = asked.noise == "seeded" and floor.noise == "seeded"
    return replace(
        asked,
        noise_multiplier=max(asked.noise_multiplier, floor.noise_multiplier),
        noise="seeded" if seeded else "secure",
    )


def clip_update(delta: np.ndarray, clip: float) -> np.ndarray:
    """A float64 copy of ``delta`` scaled to L2 norm at most ``clip`` (unchanged if within).

    The norm of the result (:func:`~fedlearn.privacy.norms.l2_norm`) never exceeds
    ``clip``: a rescale that rounding left a hair above is shrunk again.
    """
    return _clip_in_place(np.array(delta, dtype=np.float64).reshape(-1), clip)


def _clip_in_place(out: np.ndarray, clip: float) -> np.ndarray:
    """:func:`clip_update` on a float64 vector the caller owns."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    norm = l2_norm(out)
    if not math.isfinite(norm):
        raise ValueError("the update has a NaN or infinite coordinate")
    while norm > clip:
        out *= np.nextafter(clip / norm, 0.0)
        norm = l2_norm(out)
    return out


def privatize(new: Arrays, global_arrays: Arrays, dp: TaskDP, seed: int) -> Arrays:
    """``new`` after clipping its change from ``global_arrays`` to ``dp.clip`` and adding
    Gaussian noise of std ``dp.noise_multiplier * dp.clip`` to every float coordinate."""
    if list(new) != list(global_arrays):
        raise ValueError("local DP: the app's arrays differ from the global model's names")
    olds: list[np.ndarray] = []
    news: list[np.ndarray] = []
    for name, old in global_arrays.items():
        if old.dtype.kind != "f":
            continue
        updated = np.asarray(new[name])
        if updated.shape != old.shape:
            raise ValueError(f"local DP: array {name!r} changed shape")
        olds.append(old.ravel())
        news.append(updated.ravel())
    if not olds:  # nothing noise could protect: the global model's values go back
        return {name: old.copy() for name, old in global_arrays.items()}
    # the float arrays as two float64 vectors (exact), the change computed in place
    base = np.concatenate(olds, dtype=np.float64)
    delta = np.concatenate(news, dtype=np.float64)
    delta -= base
    delta = _clip_in_place(delta, dp.clip)
    delta += noise_source(dp.noise, seed, LOCAL_DP_STREAM).normal(
        delta.size, dp.noise_multiplier * dp.clip
    )
    delta += base
    out: Arrays = {}
    offset = 0
    for name, old in global_arrays.items():
        if old.dtype.kind != "f":
            out[name] = old.copy()
            continue
        end = offset + old.size
        out[name] = delta[offset:end].reshape(old.shape).astype(old.dtype, copy=False)
        offset = end
    return out


def dp_metrics(metrics: Metrics, dp: TaskDP) -> Metrics:
    """The ``dp.*`` entries of ``metrics`` plus what local DP applied.

    An update that example-level DP already made (``dp.sample_rate`` present) keeps its
    ``dp.noise_multiplier``; the local step then reports ``dp.local.noise_multiplier`` and
    ``dp.local.clip``.
    """
    out = {k: v for k, v in metrics.items() if k.startswith(keys.PREFIX)}
    prefix = "dp.local." if keys.SAMPLE_RATE in out else keys.PREFIX
    out[prefix + "noise_multiplier"] = dp.noise_multiplier
    out[prefix + "clip"] = dp.clip
    return out


class PrivateTraining:
    """A ClientApp whose training replies get local DP when the task (or the site) asks.

    Without a ``dp.mode = "local"`` task config and without a floor, ``train`` returns the
    app's own result object untouched.
    """

    def __init__(self, app: ClientApp, floor: LocalDPFloor | None = None) -> None:
        self.app = app
        self.floor = floor

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        """The app's training result, clipped and noised when local DP applies."""
        dp = local_dp(config, self.floor)  # a bad dp.* config fails before training
        result = self.app.train(arrays, config, ctx)
        if dp is None or not isinstance(result, TrainResult):
            return result  # the runtime reports a result of the wrong type
        return TrainResult(
            privatize(result.arrays, arrays, dp, ctx.seed),
            result.num_examples,
            dp_metrics(result.metrics, dp),
        )

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        """The app's own evaluation."""
        return self.app.evaluate(arrays, config, ctx)
