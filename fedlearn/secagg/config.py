"""A secure-aggregation round's public parameters, its stages and the sizes it relies on."""

from __future__ import annotations

import base64
import binascii
import enum
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedlearn.errors import (
    ConfigError,
    SerializationError,
)
from fedlearn.privacy.distributed import DistributedNoise, RoundNoise, calibrate
from fedlearn.secagg import crypto, shamir
from fedlearn.secagg.graph import (
    check_params,
    recommended_degree,
    recommended_threshold,
)
from fedlearn.secagg.quantize import (
    check_capacity,
    error_bound,
    max_scale_bits,
)

MAX_ID = 2**63 - 2
SHARE_PLAIN = struct.Struct(">QQ")
PLAINTEXT_SIZE = SHARE_PLAIN.size + 2 * shamir.SHARE_SIZE
CIPHERTEXT_SIZE = crypto.NONCE_SIZE + PLAINTEXT_SIZE + crypto.TAG_SIZE
"""Exact size of one encrypted share bundle (owner, holder, s_sk-share, b-share)."""


class Stage(enum.IntEnum):
    """Where a round stands; a stage is named after the reply it waits for."""

    SETUP = 0
    ADVERTISE = 1
    SHARE = 2
    MASKED = 3
    UNMASK = 4
    DONE = 5
    ABORTED = 6


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one secure-aggregation round (sent to every client).

    ``clients``: the selected client ids. ``vector_length``: length of the flat update.
    ``num_neighbours`` (k): degree of the neighbour graph; ``len(clients) - 1`` gives the
    original complete-graph SecAgg. ``threshold`` (t): shares needed to reconstruct a
    secret; each client has ``k + 1`` share holders (its neighbours and itself) and ``t``
    must be a strict majority of them, ``(k + 1) / 2 < t <= k + 1``, so that a server
    that lies about who dropped cannot collect both secrets of a client.
    ``clip``/``scale_bits``/``modulus_bits``/``max_weight``: quantization (see
    :mod:`fedlearn.secagg.quantize`); the capacity check runs here, before any round.
    ``graph_seed``: public randomness of the neighbour graph, fresh per round.
    ``min_survivors``: fewest clients that may be left at any stage (default ``t``).
    ``noise``: distributed DP (:mod:`fedlearn.privacy.distributed`): every client then
    clips its update to L2 norm ``clip``, rounds it conditionally, adds its Skellam share
    and sends weight 1; the capacity check is then the noised one (signal plus noise tails).
    """

    clients: tuple[int, ...]
    vector_length: int
    num_neighbours: int
    threshold: int
    clip: float = 1.0
    scale_bits: int = 16
    modulus_bits: int = 32
    max_weight: int = 1
    graph_seed: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    min_survivors: int = 0
    noise: DistributedNoise | None = None
    _round_noise: RoundNoise | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", tuple(self.clients))
        n = len(self.clients)
        for name in (
            "vector_length",
            "num_neighbours",
            "threshold",
            "scale_bits",
            "modulus_bits",
            "max_weight",
            "min_survivors",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"secagg {name} must be an int, got {value!r}")
        if not isinstance(self.graph_seed, bytes) or not 16 <= len(self.graph_seed) <= 64:
            raise ConfigError("secagg graph_seed must be 16 to 64 bytes")
        if self.vector_length < 1:
            raise ConfigError("secagg vector_length must be positive")
        check_params(self.clients, self.num_neighbours, self.graph_seed)
        holders = self.num_neighbours + 1
        t = self.threshold
        if not 2 <= t <= holders:
            raise ConfigError(f"secagg threshold must be in 2..k+1 = {holders}, got {t}")
        if 2 * t <= holders:
            raise ConfigError(
                f"secagg threshold {t} must be a strict majority of the {holders} share "
                f"holders (k + 1); use at least {holders // 2 + 1}"
            )
        if self.min_survivors == 0:
            object.__setattr__(self, "min_survivors", t)
        if not t <= self.min_survivors <= n:
            raise ConfigError(f"secagg min_survivors must be in {t}..{n}")
        if self.modulus_bits < 8:
            raise ConfigError("secagg modulus_bits must be at least 8")
        if self.noise is None:
            check_capacity(n, self.max_weight, self.clip, self.scale_bits, self.modulus_bits)
            return
        if not isinstance(self.noise, DistributedNoise):
            raise ConfigError("secagg noise must be a DistributedNoise")
        round_noise = calibrate(
            self.noise,
            clip=self.clip,
            dimension=self.vector_length,
            clients=n,
            modulus_bits=self.modulus_bits,
            scale_bits=self.scale_bits,
        )
        object.__setattr__(self, "_round_noise", round_noise)

    @property
    def round_noise(self) -> RoundNoise | None:
        """The round's distributed-DP calibration (None without ``noise``)."""
        return self._round_noise

    @classmethod
    def create(
        cls,
        clients: Iterable[int],
        vector_length: int,
        *,
        max_weight: int,
        clip: float = 1.0,
        num_neighbours: int | None = None,
        threshold: int | None = None,
        scale_bits: int | None = None,
        modulus_bits: int = 32,
        graph_seed: bytes | None = None,
        min_survivors: int = 0,
        noise: DistributedNoise | None = None,
    ) -> SecAggConfig:
        """A config with SecAgg+ defaults: ``k = min(n-1, 2 ceil(log2 n))``, ``t`` a strict
        majority of ``k + 1``, and the largest ``scale_bits`` that cannot wrap."""
        ids = tuple(clients)
        k = recommended_degree(len(ids)) if num_neighbours is None else num_neighbours
        t = recommended_threshold(k) if threshold is None else threshold
        if scale_bits is None and noise is not None:
            scale_bits = calibrate(
                noise,
                clip=clip,
                dimension=vector_length,
                clients=len(ids),
                modulus_bits=modulus_bits,
            ).scale_bits
        if scale_bits is None:
            best = max_scale_bits(len(ids), max_weight, clip, modulus_bits)
            if best is None:
                raise ConfigError(
                    f"{len(ids)} clients with max_weight {max_weight} do not fit a "
                    f"{modulus_bits}-bit modulus"
                )
            scale_bits = best
        return cls(
            clients=ids,
            vector_length=vector_length,
            num_neighbours=k,
            threshold=t,
            clip=clip,
            scale_bits=scale_bits,
            modulus_bits=modulus_bits,
            max_weight=max_weight,
            graph_seed=secrets.token_bytes(32) if graph_seed is None else graph_seed,
            min_survivors=min_survivors,
            noise=noise,
        )

    @property
    def error_bound(self) -> float:
        """Per-coordinate bound on the error of the decoded weighted sum (all clients in)."""
        return error_bound(len(self.clients), self.scale_bits)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clients": list(self.clients),
            "vector_length": self.vector_length,
            "num_neighbours": self.num_neighbours,
            "threshold": self.threshold,
            "clip": self.clip,
            "scale_bits": self.scale_bits,
            "modulus_bits": self.modulus_bits,
            "max_weight": self.max_weight,
            "graph_seed": b64(self.graph_seed),
            "min_survivors": self.min_survivors,
        }
        if self.noise is not None:  # absent without noise: plain rounds keep their bytes
            out["noise"] = self.noise.to_json()
        return out

    @classmethod
    def from_json(cls, raw: Any) -> SecAggConfig:
        keys = {
            "clients",
            "vector_length",
            "num_neighbours",
            "threshold",
            "clip",
            "scale_bits",
            "modulus_bits",
            "max_weight",
            "graph_seed",
            "min_survivors",
        }
        if not isinstance(raw, dict) or set(raw) - {"noise"} != keys:
            raise SerializationError(
                f"secagg config must have exactly the keys {sorted(keys)} (and maybe noise)"
            )
        noise = None if "noise" not in raw else DistributedNoise.from_json(raw["noise"])
        clip = raw["clip"]
        if not isinstance(clip, int | float) or isinstance(clip, bool):
            raise SerializationError("secagg config clip must be a number")
        try:
            return cls(
                clients=tuple(uints(raw["clients"], "clients")),
                vector_length=uint(raw["vector_length"], "vector_length"),
                num_neighbours=uint(raw["num_neighbours"], "num_neighbours"),
                threshold=uint(raw["threshold"], "threshold"),
                clip=float(clip),
                scale_bits=uint(raw["scale_bits"], "scale_bits"),
                modulus_bits=uint(raw["modulus_bits"], "modulus_bits"),
                max_weight=uint(raw["max_weight"], "max_weight"),
                graph_seed=unb64(raw["graph_seed"], "graph_seed"),
                min_survivors=uint(raw["min_survivors"], "min_survivors"),
                noise=noise,
            )
        except ConfigError as exc:
            raise SerializationError(f"invalid secagg config: {exc}") from exc


def pairwise_sign(me: int, peer: int) -> int:
    """The smaller id adds the pairwise mask and the larger subtracts it."""
    return 1 if me < peer else -1


# ------------------------------------------------------------------ field codecs


def b64(data: bytes) -> str:
    """``data`` as base64 text."""
    return base64.b64encode(data).decode("ascii")


def unb64(raw: Any, what: str) -> bytes:
    """Decode the base64 text ``raw`` (field ``what``); SerializationError otherwise."""
    if not isinstance(raw, str):
        raise SerializationError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SerializationError(f"{what} is not valid base64") from exc


def uint(raw: Any, what: str) -> int:
    """``raw`` as a protocol id or count (0..2**63-2); SerializationError otherwise."""
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= MAX_ID:
        raise SerializationError(f"{what} must be an int in 0..{MAX_ID}")
    return raw


def uints(raw: Any, what: str) -> tuple[int, ...]:
    """A list of :func:`uint` values."""
    if not isinstance(raw, list):
        raise SerializationError(f"{what} must be a list of ints")
    return tuple(uint(v, what) for v in raw)
