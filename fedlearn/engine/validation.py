"""Checks a client's reply against the global model before it touches any aggregate."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np

from fedlearn.engine.messages import Reply
from fedlearn.engine.records import Arrays
from fedlearn.errors import FedlearnError, RoundFailed, UpdateRejected
from fedlearn.strategy.base import ClientEvaluation, ClientUpdate

FINITE_BLOCK = 1 << 20
"""Elements checked at a time by :func:`all_finite`."""


def all_finite(a: np.ndarray) -> bool:
    """Whether a floating array holds no NaN or Inf, checked block by block so the
    boolean temporary stays small (``np.isfinite(a)`` on a 1 GiB float32 model is 256 MiB)."""
    flat = a.reshape(-1)
    for start in range(0, flat.size, FINITE_BLOCK):
        if not np.isfinite(flat[start : start + FINITE_BLOCK]).all():
            return False
    return True


def check_update(reply: Reply, global_arrays: Arrays) -> ClientUpdate:
    """A ClientUpdate from ``reply``, or UpdateRejected naming the client, round and reason."""

    def reject(reason: str) -> UpdateRejected:
        return UpdateRejected(reason, client_id=reply.client_id, round=reply.round)

    if reply.arrays is None:
        raise reject("training reply carries no arrays")
    if reply.num_examples <= 0:
        raise reject(f"num_examples must be positive, got {reply.num_examples}")
    arrays = reply.arrays
    if list(arrays) != list(global_arrays):
        missing = [k for k in global_arrays if k not in arrays]
        extra = [k for k in arrays if k not in global_arrays]
        if missing or extra:
            raise reject(
                f"array names differ from the global model (missing {missing}, extra {extra})"
            )
        raise reject("arrays are not in the global model's order")
    for name, expected in global_arrays.items():
        got = arrays[name]
        if got.shape != expected.shape:
            raise reject(f"array {name!r} has shape {got.shape}, global model has {expected.shape}")
        if got.dtype != expected.dtype:
            raise reject(f"array {name!r} has dtype {got.dtype}, global model has {expected.dtype}")
        if got.dtype.kind == "f" and not all_finite(got):
            raise reject(f"array {name!r} contains NaN or Inf")
    return ClientUpdate(reply.client_id, arrays, reply.num_examples, reply.metrics)


def check_evaluation(reply: Reply) -> ClientEvaluation:
    """A ClientEvaluation from ``reply``, or UpdateRejected."""
    if reply.num_examples <= 0:
        raise UpdateRejected(
            f"num_examples must be positive, got {reply.num_examples}",
            client_id=reply.client_id,
            round=reply.round,
        )
    if reply.loss is None or not math.isfinite(reply.loss):
        raise UpdateRejected(
            f"evaluation loss must be a finite number, got {reply.loss}",
            client_id=reply.client_id,
            round=reply.round,
        )
    return ClientEvaluation(reply.client_id, reply.num_examples, reply.loss, reply.metrics)


def check_model(new: Arrays, old: Arrays) -> Arrays:
    """The new global model in the old one's dtypes, after checking names, shapes, finiteness."""
    if list(new) != list(old):
        raise ValueError("the server update changed the model's array names")
    out: Arrays = {}
    for name, a in new.items():
        a = np.asarray(a)
        if a.shape != old[name].shape:
            raise ValueError(f"the server update changed the shape of {name!r}")
        if a.dtype.kind == "f" and not all_finite(a):
            raise ValueError(f"the new global array {name!r} contains NaN or Inf")
        if a.dtype != old[name].dtype:
            a = np.rint(a) if old[name].dtype.kind in "iub" else a
            a = a.astype(old[name].dtype)
        out[name] = a
    return out


@contextlib.contextmanager
def aggregation(round: int) -> Iterator[None]:
    """Around a round's fold and server update: a failure there (a bad fold, a strategy
    error, a model that fails :func:`check_model`) becomes RoundFailed, and the global
    model stays as it was."""
    try:
        yield
    except RoundFailed:
        raise
    except (FedlearnError, ArithmeticError, ValueError) as exc:
        raise RoundFailed(
            f"round {round}: aggregation failed ({exc}); the global model is unchanged"
        ) from exc
