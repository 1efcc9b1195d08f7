"""SecAgg+ (Bell et al. 2020) as sans-IO state machines, semi-honest server.

The server and every client exchange the frozen message dataclasses below and nothing
else: no sockets, threads, sleeps or clocks. A driver (a transport, or
:mod:`fedlearn.secagg.simulate`) moves messages and decides when a stage's deadline has
passed by calling :meth:`SecAggServer.advance`; a client that has not answered by then
has dropped out.

Stages (server side; ``U0 ⊇ U1 ⊇ U2 ⊇ U3 ⊇ U4`` are the clients still in)::

    start()   -> Setup            to U0  (config + the client's neighbours)
    ADVERTISE <- AdvertiseKeys    c_pk (share encryption), s_pk (masking)       => U1
              -> PeerKeys         to each of U1: its neighbours' keys in U1
    SHARE     <- ShareKeys        per neighbour: AEAD(shares of s_sk and of b)    => U2
              -> EncryptedShares  to each of U2: ciphertexts from neighbours in U2
    MASKED    <- MaskedInput      q(w*x) ++ [w] + b-mask + sum(+-pairwise masks)  => U3
              -> UnmaskRequest    to each of U3: b-shares of neighbours in U3 (and its
                                  own), s_sk-shares of neighbours in U2 \\ U3
    UNMASK    <- UnmaskShares                                                    => U4
              -> result: sum over U3 of w*x, sum over U3 of w

Every client shares its two secrets ``t``-of-``(d + 1)`` among its ``d`` live neighbours
and itself (share index = holder id + 1). After each stage the server prunes clients
whose live neighbourhood (plus themselves) is smaller than ``t`` - they could never be
unmasked - and aborts with :class:`RoundFailed` when fewer than ``min_survivors`` remain
or some needed secret has fewer than ``t`` live holders. An aborted round outputs
nothing. The server keeps only the running modular sum of masked inputs, never an
individual input. A client reveals, per peer, the b-share or the s_sk-share, never both,
and only for a request that partitions exactly the peers it exchanged shares with.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import secrets
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeAlias

import numpy as np

from fedlearn.errors import (
    ConfigError,
    FedlearnError,
    RoundFailed,
    SecAggError,
    SerializationError,
    UpdateRejected,
)
from fedlearn.records import decode_arrays, encode_arrays
from fedlearn.secagg import crypto, shamir
from fedlearn.secagg.graph import (
    check_params,
    neighbour_graph,
    neighbours_of,
    recommended_degree,
    recommended_threshold,
)
from fedlearn.secagg.quantize import (
    ArraySpec,
    check_capacity,
    dequantize,
    error_bound,
    flatten,
    max_scale_bits,
    quantize,
    unflatten,
)

__all__ = [
    "AdvertiseKeys",
    "ArraySpec",
    "ClientMessage",
    "EncryptedShares",
    "MaskedInput",
    "PeerKey",
    "PeerKeys",
    "SecAggClient",
    "SecAggConfig",
    "SecAggResult",
    "SecAggServer",
    "ServerMessage",
    "Setup",
    "ShareKeys",
    "Stage",
    "UnmaskRequest",
    "UnmaskShares",
    "decode_message",
    "encode_message",
    "flatten",
    "unflatten",
]

_MAX_ID = 2**63 - 2
_SHARE_PLAIN = struct.Struct(">QQ")
PLAINTEXT_SIZE = _SHARE_PLAIN.size + 2 * shamir.SHARE_SIZE
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
        check_capacity(n, self.max_weight, self.clip, self.scale_bits, self.modulus_bits)

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
    ) -> SecAggConfig:
        """A config with SecAgg+ defaults: ``k = min(n-1, 2 ceil(log2 n))``, ``t`` a strict
        majority of ``k + 1``, and the largest ``scale_bits`` that cannot wrap."""
        ids = tuple(clients)
        k = recommended_degree(len(ids)) if num_neighbours is None else num_neighbours
        t = recommended_threshold(k) if threshold is None else threshold
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
        )

    @property
    def error_bound(self) -> float:
        """Per-coordinate bound on the error of the decoded weighted sum (all clients in)."""
        return error_bound(len(self.clients), self.scale_bits)

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": list(self.clients),
            "vector_length": self.vector_length,
            "num_neighbours": self.num_neighbours,
            "threshold": self.threshold,
            "clip": self.clip,
            "scale_bits": self.scale_bits,
            "modulus_bits": self.modulus_bits,
            "max_weight": self.max_weight,
            "graph_seed": _b64(self.graph_seed),
            "min_survivors": self.min_survivors,
        }

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
        if not isinstance(raw, dict) or set(raw) != keys:
            raise SerializationError(f"secagg config must have exactly the keys {sorted(keys)}")
        clip = raw["clip"]
        if not isinstance(clip, int | float) or isinstance(clip, bool):
            raise SerializationError("secagg config clip must be a number")
        try:
            return cls(
                clients=tuple(_uints(raw["clients"], "clients")),
                vector_length=_uint(raw["vector_length"], "vector_length"),
                num_neighbours=_uint(raw["num_neighbours"], "num_neighbours"),
                threshold=_uint(raw["threshold"], "threshold"),
                clip=float(clip),
                scale_bits=_uint(raw["scale_bits"], "scale_bits"),
                modulus_bits=_uint(raw["modulus_bits"], "modulus_bits"),
                max_weight=_uint(raw["max_weight"], "max_weight"),
                graph_seed=_unb64(raw["graph_seed"], "graph_seed"),
                min_survivors=_uint(raw["min_survivors"], "min_survivors"),
            )
        except ConfigError as exc:
            raise SerializationError(f"invalid secagg config: {exc}") from exc


# ------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class PeerKey:
    """A neighbour's two public keys as forwarded by the server."""

    client_id: int
    c_pk: bytes
    s_pk: bytes


Pairs: TypeAlias = tuple[tuple[int, bytes], ...]


class _Message:
    """Base of the wire messages: a type code and a field schema for the codec."""

    TYPE: ClassVar[int]
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]]
    round: int
    client_id: int

    def to_bytes(self) -> bytes:
        return encode_message(self)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Self:
        msg = decode_message(data)
        if not isinstance(msg, cls):
            raise SerializationError(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg


@dataclass(frozen=True)
class Setup(_Message):
    """Server -> client: the round's public config and the client's neighbour list."""

    TYPE: ClassVar[int] = 1
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("config", "config"),
        ("neighbours", "uints"),
    )
    round: int
    client_id: int
    config: SecAggConfig
    neighbours: tuple[int, ...]


@dataclass(frozen=True)
class AdvertiseKeys(_Message):
    """Client -> server: two fresh X25519 public keys (share encryption, masking)."""

    TYPE: ClassVar[int] = 2
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("c_pk", "key"),
        ("s_pk", "key"),
    )
    round: int
    client_id: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class PeerKeys(_Message):
    """Server -> client: the public keys of the client's neighbours still in the round."""

    TYPE: ClassVar[int] = 3
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("peers", "peers"),
    )
    round: int
    client_id: int
    peers: tuple[PeerKey, ...]


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Client -> server: ``(receiver, ciphertext)`` for each neighbour; relayed blind."""

    TYPE: ClassVar[int] = 4
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("ciphertexts", "pairs"),
    )
    round: int
    client_id: int
    ciphertexts: Pairs


@dataclass(frozen=True)
class EncryptedShares(_Message):
    """Server -> client: ``(sender, ciphertext)`` from each neighbour still in the round."""

    TYPE: ClassVar[int] = 5
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("ciphertexts", "pairs"),
    )
    round: int
    client_id: int
    ciphertexts: Pairs


@dataclass(frozen=True, eq=False)
class MaskedInput(_Message):
    """Client -> server: quantized ``w*x`` with the weight appended, masked mod ``2^b``."""

    TYPE: ClassVar[int] = 6
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("masked", "array"),
    )
    round: int
    client_id: int
    masked: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Server -> client: which peers' b-shares and which peers' s_sk-shares to reveal."""

    TYPE: ClassVar[int] = 7
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("b_share_of", "uints"),
        ("sk_share_of", "uints"),
    )
    round: int
    client_id: int
    b_share_of: tuple[int, ...]
    sk_share_of: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskShares(_Message):
    """Client -> server: ``(owner, encoded Share)`` pairs answering an :class:`UnmaskRequest`."""

    TYPE: ClassVar[int] = 8
    SCHEMA: ClassVar[tuple[tuple[str, str], ...]] = (
        ("round", "uint"),
        ("client_id", "uint"),
        ("b_shares", "pairs"),
        ("sk_shares", "pairs"),
    )
    round: int
    client_id: int
    b_shares: Pairs
    sk_shares: Pairs


ServerMessage: TypeAlias = Setup | PeerKeys | EncryptedShares | UnmaskRequest
ClientMessage: TypeAlias = AdvertiseKeys | ShareKeys | MaskedInput | UnmaskShares
_TYPES: dict[int, type[_Message]] = {
    cls.TYPE: cls
    for cls in (
        Setup,
        AdvertiseKeys,
        PeerKeys,
        ShareKeys,
        EncryptedShares,
        MaskedInput,
        UnmaskRequest,
        UnmaskShares,
    )
}

# -------------------------------------------------------------------------- codec

_MAGIC = b"FSA1"
_FRAME = struct.Struct("<4sBI")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(raw: Any, what: str) -> bytes:
    if not isinstance(raw, str):
        raise SerializationError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise SerializationError(f"{what} is not valid base64") from exc


def _uint(raw: Any, what: str) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw <= _MAX_ID:
        raise SerializationError(f"{what} must be an int in 0..{_MAX_ID}")
    return raw


def _uints(raw: Any, what: str) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise SerializationError(f"{what} must be a list of ints")
    return tuple(_uint(v, what) for v in raw)


def _encode_field(kind: str, value: Any) -> Any:
    if kind == "uint":
        return int(value)
    if kind == "uints":
        return [int(v) for v in value]
    if kind == "key":
        return _b64(value)
    if kind == "pairs":
        return [[int(i), _b64(b)] for i, b in value]
    if kind == "peers":
        return [[p.client_id, _b64(p.c_pk), _b64(p.s_pk)] for p in value]
    if kind == "config":
        return value.to_json()
    raise AssertionError(kind)  # pragma: no cover


def _decode_field(kind: str, raw: Any, what: str) -> Any:
    if kind == "uint":
        return _uint(raw, what)
    if kind == "uints":
        return _uints(raw, what)
    if kind == "key":
        key = _unb64(raw, what)
        if len(key) != crypto.KEY_SIZE:
            raise SerializationError(f"{what} must be {crypto.KEY_SIZE} bytes")
        return key
    if kind == "pairs":
        if not isinstance(raw, list):
            raise SerializationError(f"{what} must be a list of [id, bytes] pairs")
        pairs = []
        for item in raw:
            if not isinstance(item, list) or len(item) != 2:
                raise SerializationError(f"{what} must be a list of [id, bytes] pairs")
            pairs.append((_uint(item[0], what), _unb64(item[1], what)))
        return tuple(pairs)
    if kind == "peers":
        if not isinstance(raw, list):
            raise SerializationError(f"{what} must be a list of [id, c_pk, s_pk]")
        peers = []
        for item in raw:
            if not isinstance(item, list) or len(item) != 3:
                raise SerializationError(f"{what} must be a list of [id, c_pk, s_pk]")
            c_pk = _decode_field("key", item[1], f"{what} c_pk")
            s_pk = _decode_field("key", item[2], f"{what} s_pk")
            peers.append(PeerKey(_uint(item[0], what), c_pk, s_pk))
        return tuple(peers)
    if kind == "config":
        return SecAggConfig.from_json(raw)
    raise AssertionError(kind)  # pragma: no cover


def encode_message(msg: _Message) -> bytes:
    """Frame a message: magic, type code, JSON header, then raw array bytes (no pickle)."""
    header: dict[str, Any] = {}
    tail = b""
    for name, kind in msg.SCHEMA:
        value = getattr(msg, name)
        if kind == "array":
            tail = encode_arrays({name: np.asarray(value)})
        else:
            header[name] = _encode_field(kind, value)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _FRAME.pack(_MAGIC, msg.TYPE, len(head)) + head + tail


def decode_message(data: bytes | bytearray | memoryview) -> ServerMessage | ClientMessage:
    """Decode :func:`encode_message`'s bytes; anything malformed -> :class:`SerializationError`."""
    view = memoryview(data)
    if len(view) < _FRAME.size:
        raise SerializationError("secagg message shorter than its frame")
    magic, code, head_len = _FRAME.unpack_from(view)
    if magic != _MAGIC:
        raise SerializationError("secagg message has a bad magic number")
    cls = _TYPES.get(code)
    if cls is None:
        raise SerializationError(f"unknown secagg message type {code}")
    end = _FRAME.size + head_len
    if end > len(view):
        raise SerializationError("secagg header runs past the end of the message")
    try:
        header = json.loads(bytes(view[_FRAME.size : end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SerializationError(f"secagg header is not valid JSON: {exc}") from exc
    names = {name for name, kind in cls.SCHEMA if kind != "array"}
    if not isinstance(header, dict) or set(header) != names:
        raise SerializationError(f"{cls.__name__} header must have exactly {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, kind in cls.SCHEMA:
        if kind == "array":
            arrays = decode_arrays(view[end:])
            arr = arrays.get(name)
            if set(arrays) != {name} or arr is None or arr.ndim != 1:
                raise SerializationError(f"{cls.__name__} needs one 1-D array {name!r}")
            if arr.dtype not in (np.dtype("<u4"), np.dtype("<u8")):
                raise SerializationError(f"{name} must be uint32 or uint64, got {arr.dtype}")
            kwargs[name] = arr
        else:
            kwargs[name] = _decode_field(kind, header[name], f"{cls.__name__}.{name}")
    if not any(kind == "array" for _, kind in cls.SCHEMA) and end != len(view):
        raise SerializationError(f"{len(view) - end} trailing bytes after {cls.__name__}")
    msg = cls(**kwargs)
    assert isinstance(
        msg,
        Setup
        | AdvertiseKeys
        | PeerKeys
        | ShareKeys
        | EncryptedShares
        | MaskedInput
        | UnmaskRequest
        | UnmaskShares,
    )
    return msg


# -------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class SecAggResult:
    """What a finished round reveals: the weighted sum of the survivors' updates."""

    round: int
    weighted_sum: np.ndarray
    """``sum_i w_i clip(x_i)`` over the survivors, float64."""
    total_weight: int
    survivors: frozenset[int]
    """Clients whose input is in the sum (U3)."""
    error_bound: float
    """Per-coordinate bound on ``|weighted_sum - exact|``: ``len(survivors) / 2^(s+1)``."""

    def mean(self) -> np.ndarray:
        """The weighted mean ``weighted_sum / total_weight``."""
        if self.total_weight <= 0:
            raise SecAggError("total weight is zero; there is no mean")
        return self.weighted_sum / float(self.total_weight)


def _pairwise_sign(me: int, peer: int) -> int:
    """The smaller id adds the pairwise mask and the larger subtracts it."""
    return 1 if me < peer else -1


def _prune(live: set[int], graph: Mapping[int, frozenset[int]], threshold: int) -> set[int]:
    """Drop clients with fewer than ``threshold`` live share holders, until none are left."""
    live = set(live)
    changed = True
    while changed:
        changed = False
        for c in sorted(live):
            if len(graph[c] & live) + 1 < threshold:
                live.discard(c)
                changed = True
    return live


# -------------------------------------------------------------------------- server


class SecAggServer:
    """The server's half of one round. Feed it client messages, call :meth:`advance` at
    each stage's deadline (or once :attr:`waiting_for` is empty), deliver what it returns.

    :meth:`receive` raises :class:`SecAggError` (or :class:`SerializationError`) for a
    message it refuses; a refused message from a client that was expected excludes that
    client from the round (it counts as dropped, which the protocol tolerates). Other
    state is untouched by a refusal. :meth:`advance` raises :class:`RoundFailed` when
    too few clients remain; the round is then aborted and outputs nothing.
    """

    def __init__(self, config: SecAggConfig, round: int) -> None:
        if not isinstance(round, int) or not 0 <= round <= _MAX_ID:
            raise ConfigError(f"round must be an int in 0..{_MAX_ID}")
        self.config = config
        self.round = round
        self.graph = neighbour_graph(config.clients, config.num_neighbours, config.graph_seed)
        self.stage = Stage.SETUP
        self.rejected: dict[int, str] = {}
        """Clients excluded for a refused message, with the reason."""
        self.members: dict[Stage, frozenset[int]] = {}
        """Clients that completed each stage (after pruning): U1..U4."""
        self._live: set[int] = set(config.clients)
        self._replied: set[int] = set()
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._ciphertexts: dict[int, dict[int, bytes]] = {}
        self._acc: np.ndarray | None = None
        self._requests: dict[int, UnmaskRequest] = {}
        self._b_shares: dict[int, dict[int, shamir.Share]] = {}
        self._sk_shares: dict[int, dict[int, shamir.Share]] = {}
        self._result: SecAggResult | None = None

    # -- public API -------------------------------------------------------------

    @property
    def waiting_for(self) -> frozenset[int]:
        """Clients whose reply to the current stage has not arrived yet."""
        if self.stage in (Stage.SETUP, Stage.DONE, Stage.ABORTED):
            return frozenset()
        return frozenset(self._live - self._replied)

    @property
    def done(self) -> bool:
        return self.stage is Stage.DONE

    def start(self) -> list[Setup]:
        """Stage 0: each selected client gets the config and its neighbour list."""
        if self.stage is not Stage.SETUP:
            raise SecAggError("the round has already started")
        self.stage = Stage.ADVERTISE
        return [
            Setup(self.round, c, self.config, tuple(sorted(self.graph[c])))
            for c in self.config.clients
        ]

    def receive(self, msg: ClientMessage) -> None:
        """Take one client message for the current stage."""
        expected = {
            Stage.ADVERTISE: AdvertiseKeys,
            Stage.SHARE: ShareKeys,
            Stage.MASKED: MaskedInput,
            Stage.UNMASK: UnmaskShares,
        }.get(self.stage)
        if expected is None or not isinstance(msg, expected):
            raise SecAggError(
                f"round {self.round} at stage {self.stage.name} does not take {type(msg).__name__}"
            )
        if msg.round != self.round:
            raise SecAggError(f"message for round {msg.round} sent to round {self.round}")
        c = msg.client_id
        if c not in self._live:
            raise SecAggError(f"client {c} is not (or no longer) in round {self.round}")
        if c in self._replied:
            raise SecAggError(f"client {c} already answered stage {self.stage.name}")
        try:
            if isinstance(msg, AdvertiseKeys):
                self._take_keys(msg)
            elif isinstance(msg, ShareKeys):
                self._take_shares(msg)
            elif isinstance(msg, MaskedInput):
                self._take_masked(msg)
            else:
                self._take_unmask(msg)
        except (SecAggError, SerializationError) as exc:
            self._live.discard(c)
            self.rejected[c] = str(exc)
            raise
        self._replied.add(c)

    def advance(self) -> list[ServerMessage]:
        """Close the current stage: whoever has not replied has dropped out.

        Returns the messages of the next stage (empty when the round is done, see
        :meth:`result`). Raises :class:`RoundFailed` (round aborted) when too few
        clients remain, :class:`SecAggError` when the shares do not reconstruct.
        """
        if self.stage is Stage.ABORTED:
            raise RoundFailed(f"secure aggregation round {self.round} was aborted")
        try:
            if self.stage is Stage.ADVERTISE:
                return list(self._close_advertise())
            if self.stage is Stage.SHARE:
                return list(self._close_share())
            if self.stage is Stage.MASKED:
                return list(self._close_masked())
            if self.stage is Stage.UNMASK:
                self._close_unmask()
                return []
        except FedlearnError:
            self._abort()
            raise
        raise SecAggError(f"nothing to advance at stage {self.stage.name}")

    def result(self) -> SecAggResult:
        """The round's output; only after the final :meth:`advance` succeeded."""
        if self._result is None:
            raise SecAggError(f"round {self.round} has no result (stage {self.stage.name})")
        return self._result

    # -- receiving ------------------------------------------------------------------

    def _take_keys(self, msg: AdvertiseKeys) -> None:
        for key in (msg.c_pk, msg.s_pk):
            if not isinstance(key, bytes) or len(key) != crypto.KEY_SIZE:
                raise SerializationError("an advertised public key must be 32 bytes")
        if msg.c_pk == msg.s_pk:
            raise SecAggError(f"client {msg.client_id} advertised the same key twice")
        seen = {k for pair in self._keys.values() for k in pair}
        if msg.c_pk in seen or msg.s_pk in seen:
            raise SecAggError(f"client {msg.client_id} advertised another client's key")
        self._keys[msg.client_id] = (msg.c_pk, msg.s_pk)

    def _take_shares(self, msg: ShareKeys) -> None:
        c = msg.client_id
        want = self.graph[c] & self.members[Stage.ADVERTISE]
        got = [r for r, _ in msg.ciphertexts]
        if len(set(got)) != len(got) or set(got) != want:
            raise SecAggError(
                f"client {c} sent shares to {sorted(got)}, expected its live neighbours "
                f"{sorted(want)}"
            )
        for r, blob in msg.ciphertexts:
            if not isinstance(blob, bytes) or len(blob) != CIPHERTEXT_SIZE:
                raise SerializationError(
                    f"client {c}: share ciphertext for {r} must be {CIPHERTEXT_SIZE} bytes"
                )
        for r, blob in msg.ciphertexts:
            self._ciphertexts.setdefault(r, {})[c] = blob

    def _take_masked(self, msg: MaskedInput) -> None:
        cfg = self.config
        dtype = crypto.mask_dtype(cfg.modulus_bits)
        arr = msg.masked
        if (
            not isinstance(arr, np.ndarray)
            or arr.dtype != dtype
            or arr.shape != (cfg.vector_length + 1,)
        ):
            raise SerializationError(
                f"client {msg.client_id}: masked input must be ({cfg.vector_length + 1},) {dtype}"
            )
        if cfg.modulus_bits not in (32, 64) and int(arr.max()) >> cfg.modulus_bits:
            raise SerializationError(f"client {msg.client_id}: masked input exceeds the modulus")
        if self._acc is None:
            self._acc = np.zeros(cfg.vector_length + 1, dtype=dtype)
        np.add(self._acc, arr, out=self._acc)  # only the running sum is kept

    def _take_unmask(self, msg: UnmaskShares) -> None:
        c = msg.client_id
        req = self._requests[c]
        parsed: list[tuple[dict[int, dict[int, shamir.Share]], int, shamir.Share]] = []
        for store, pairs, asked, what in (
            (self._b_shares, msg.b_shares, req.b_share_of, "b"),
            (self._sk_shares, msg.sk_shares, req.sk_share_of, "s_sk"),
        ):
            owners = [o for o, _ in pairs]
            if len(set(owners)) != len(owners) or set(owners) != set(asked):
                raise SecAggError(
                    f"client {c} sent {what}-shares of {sorted(owners)}, asked for {sorted(asked)}"
                )
            for owner, raw in pairs:
                share = shamir.Share.from_bytes(raw)
                if share.index != c + 1 or share.threshold != self.config.threshold:
                    raise SecAggError(
                        f"client {c} sent a {what}-share of {owner} that is not its own"
                    )
                parsed.append((store, owner, share))
        for store, owner, share in parsed:
            store.setdefault(owner, {})[c] = share

    # -- closing stages ---------------------------------------------------------------

    def _require(self, live: set[int], what: str) -> None:
        if len(live) < self.config.min_survivors:
            raise RoundFailed(
                f"secure aggregation round {self.round}: only {len(live)} clients left "
                f"after {what}, need {self.config.min_survivors}"
            )

    def _next_stage(self, stage: Stage, members: set[int]) -> None:
        self.members[self.stage] = frozenset(members)
        self._live = set(members)
        self._replied = set()
        self.stage = stage

    def _close_advertise(self) -> Iterable[PeerKeys]:
        live = _prune(self._replied & self._live, self.graph, self.config.threshold)
        self._require(live, "key advertisement")
        self._next_stage(Stage.SHARE, live)
        self._keys = {c: self._keys[c] for c in live}
        for c in sorted(live):
            peers = tuple(PeerKey(v, *self._keys[v]) for v in sorted(self.graph[c] & live))
            yield PeerKeys(self.round, c, peers)

    def _close_share(self) -> Iterable[EncryptedShares]:
        live = _prune(self._replied & self._live, self.graph, self.config.threshold)
        self._require(live, "share distribution")
        self._next_stage(Stage.MASKED, live)
        routed = self._ciphertexts
        self._ciphertexts = {}
        for c in sorted(live):
            inbox = routed.get(c, {})
            cts = tuple((s, inbox[s]) for s in sorted(self.graph[c] & live))
            yield EncryptedShares(self.round, c, cts)

    def _close_masked(self) -> Iterable[UnmaskRequest]:
        u2 = self.members[Stage.SHARE]
        u3 = self._replied & self._live
        self._require(u3, "masked input")
        t = self.config.threshold
        for u in sorted(u2):
            holders = self.graph[u] & u3
            if u in u3 and len(holders) + 1 < t:
                raise RoundFailed(
                    f"secure aggregation round {self.round}: client {u}'s self mask has "
                    f"{len(holders) + 1} live share holders, need {t}"
                )
            if u not in u3 and holders and len(holders) < t:
                raise RoundFailed(
                    f"secure aggregation round {self.round}: dropped client {u}'s masks "
                    f"have {len(holders)} live share holders, need {t}"
                )
        self._next_stage(Stage.UNMASK, u3)
        self._requests = {}
        for c in sorted(u3):
            req = UnmaskRequest(
                self.round,
                c,
                b_share_of=tuple(sorted((self.graph[c] & u3) | {c})),
                sk_share_of=tuple(sorted(self.graph[c] & (u2 - u3))),
            )
            self._requests[c] = req
        yield from self._requests.values()

    def _reconstruct(
        self, store: dict[int, dict[int, shamir.Share]], owner: int, u4: set[int], what: str
    ) -> bytes:
        shares = [s for holder, s in sorted(store.get(owner, {}).items()) if holder in u4]
        if len(shares) < self.config.threshold:
            raise RoundFailed(
                f"secure aggregation round {self.round}: {len(shares)} {what}-shares of "
                f"client {owner} arrived, need {self.config.threshold}"
            )
        try:
            return shamir.combine(shares)
        except SecAggError as exc:
            raise SecAggError(f"{what}-shares of client {owner} do not agree: {exc}") from exc

    def _close_unmask(self) -> None:
        u2 = self.members[Stage.SHARE]
        u3 = self.members[Stage.MASKED]
        u4 = self._replied & self._live
        self._require(u4, "unmasking")
        cfg = self.config
        removals: list[tuple[bytes, int]] = []
        for u in sorted(u3):
            removals.append((self._reconstruct(self._b_shares, u, u4, "b"), -1))
        for u in sorted(u2 - u3):
            peers = self.graph[u] & u3
            if not peers:
                continue
            sk = self._reconstruct(self._sk_shares, u, u4, "s_sk")
            private = crypto.load_private(sk)
            if crypto.public_key_bytes(private) != self._keys[u][1]:
                raise SecAggError(f"reconstructed masking key of client {u} does not match")
            for v in sorted(peers):
                shared = crypto.agree(private, self._keys[v][1])
                seed = crypto.derive_mask_seed(shared, round=self.round, a=u, b=v)
                removals.append((seed, -_pairwise_sign(v, u)))
        assert self._acc is not None
        total = crypto.apply_masks(self._acc, removals, cfg.modulus_bits)
        weighted_sum, weight = dequantize(
            total, scale_bits=cfg.scale_bits, modulus_bits=cfg.modulus_bits
        )
        self._next_stage(Stage.DONE, u4)
        self._acc = None
        self._b_shares = {}
        self._sk_shares = {}
        self._result = SecAggResult(
            round=self.round,
            weighted_sum=weighted_sum,
            total_weight=weight,
            survivors=u3,
            error_bound=error_bound(len(u3), cfg.scale_bits),
        )

    def _abort(self) -> None:
        self.stage = Stage.ABORTED
        self._live = set()
        self._acc = None
        self._ciphertexts = {}
        self._b_shares = {}
        self._sk_shares = {}
        self._result = None


# -------------------------------------------------------------------------- client


class SecAggClient:
    """One client's half of a round. :meth:`handle` each server message, send the reply.

    Call :meth:`set_input` with the flat update and its weight before the
    :class:`EncryptedShares` message arrives. Any message the client refuses raises
    :class:`SecAggError` (or :class:`SerializationError`) and aborts the client: it
    forgets its secrets and answers nothing more, which the server sees as a dropout.
    """

    def __init__(self, client_id: int, *, round: int | None = None) -> None:
        if not isinstance(client_id, int) or not 0 <= client_id <= _MAX_ID:
            raise ConfigError(f"client id must be an int in 0..{_MAX_ID}")
        self.client_id = client_id
        self.expected_round = round
        self.stage = Stage.SETUP
        self.round = -1
        self.config: SecAggConfig | None = None
        self.neighbours: frozenset[int] = frozenset()
        self._input: tuple[np.ndarray, int] | None = None
        self._c: crypto.KeyPair | None = None
        self._s: crypto.KeyPair | None = None
        self._b: bytes | None = None
        self._peers: dict[int, PeerKey] = {}
        self._share_keys: dict[int, bytes] = {}
        self._own_sk_share: shamir.Share | None = None
        self._own_b_share: shamir.Share | None = None
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        """owner -> (s_sk-share, b-share) this client holds for that neighbour."""

    def set_input(self, vector: np.ndarray, weight: int) -> None:
        """The flat float update to aggregate and its weight (``num_examples``)."""
        if self.stage > Stage.SHARE:
            raise SecAggError("the input can no longer change in this round")
        vec = np.asarray(vector)
        if vec.ndim != 1 or vec.dtype.kind != "f":
            raise UpdateRejected("secure aggregation needs a flat float vector")
        if not isinstance(weight, int | np.integer) or isinstance(weight, bool) or weight < 0:
            raise UpdateRejected(f"weight must be a non-negative int, got {weight!r}")
        self._input = (vec, int(weight))

    def handle(self, msg: ServerMessage) -> ClientMessage:
        """Answer one server message (raises and aborts on anything inconsistent)."""
        try:
            if isinstance(msg, Setup):
                return self._on_setup(msg)
            if isinstance(msg, PeerKeys):
                return self._on_peer_keys(msg)
            if isinstance(msg, EncryptedShares):
                return self._on_shares(msg)
            if isinstance(msg, UnmaskRequest):
                return self._on_unmask(msg)
            raise SecAggError(f"a client does not take {type(msg).__name__}")
        except (FedlearnError, ValueError) as exc:
            self.abort()
            if isinstance(exc, FedlearnError):
                raise
            raise SecAggError(str(exc)) from exc

    def abort(self) -> None:
        """Forget every secret of this round and refuse further messages."""
        self.stage = Stage.ABORTED
        self._input = None
        self._c = self._s = None
        self._b = None
        self._share_keys = {}
        self._own_sk_share = self._own_b_share = None
        self._held = {}

    # -- stages -----------------------------------------------------------------------

    def _expect(self, stage: Stage, what: str) -> None:
        if self.stage is not stage:
            raise SecAggError(f"client {self.client_id} got {what} at stage {self.stage.name}")

    def _check_envelope(self, msg: ServerMessage) -> None:
        if msg.client_id != self.client_id:
            raise SecAggError(f"message for client {msg.client_id} reached {self.client_id}")
        if msg.round != self.round:
            raise SecAggError(f"message for round {msg.round} during round {self.round}")

    def _on_setup(self, msg: Setup) -> AdvertiseKeys:
        self._expect(Stage.SETUP, "Setup")
        if msg.client_id != self.client_id:
            raise SecAggError(f"setup for client {msg.client_id} reached {self.client_id}")
        if self.expected_round is not None and msg.round != self.expected_round:
            raise SecAggError(f"setup for round {msg.round}, expected {self.expected_round}")
        cfg = msg.config
        if self.client_id not in cfg.clients:
            raise SecAggError(f"client {self.client_id} is not among the round's clients")
        mine = neighbours_of(cfg.clients, cfg.num_neighbours, cfg.graph_seed, self.client_id)
        if len(set(msg.neighbours)) != len(msg.neighbours) or set(msg.neighbours) != mine:
            raise SecAggError(
                f"client {self.client_id}: the neighbour list from the server does not "
                "match the round's public graph"
            )
        self.round = msg.round
        self.config = cfg
        self.neighbours = mine
        self._c = crypto.generate_keypair()
        self._s = crypto.generate_keypair()
        self._b = secrets.token_bytes(crypto.KEY_SIZE)
        self.stage = Stage.ADVERTISE
        return AdvertiseKeys(self.round, self.client_id, self._c.public, self._s.public)

    def _on_peer_keys(self, msg: PeerKeys) -> ShareKeys:
        self._expect(Stage.ADVERTISE, "PeerKeys")
        self._check_envelope(msg)
        cfg, c, s, b = self.config, self._c, self._s, self._b
        assert cfg is not None and c is not None and s is not None and b is not None
        me = self.client_id
        ids = [p.client_id for p in msg.peers]
        if len(set(ids)) != len(ids):
            raise SecAggError(f"client {me}: a peer appears twice in the key list")
        strangers = set(ids) - self.neighbours
        if strangers:
            raise SecAggError(f"client {me}: keys of non-neighbours {sorted(strangers)}")
        if len(ids) + 1 < cfg.threshold:
            raise SecAggError(
                f"client {me}: only {len(ids)} neighbours left, cannot share {cfg.threshold}"
                "-out-of-n"
            )
        keys = [k for p in msg.peers for k in (p.c_pk, p.s_pk)] + [c.public, s.public]
        if len(set(keys)) != len(keys):
            raise SecAggError(f"client {me}: public keys in the round are not distinct")
        self._peers = {p.client_id: p for p in msg.peers}
        holders = [*sorted(ids), me]
        indices = [h + 1 for h in holders]
        sk_shares = shamir.split(s.private_bytes(), cfg.threshold, indices)
        b_shares = shamir.split(b, cfg.threshold, indices)
        out = []
        for holder, sk_share, b_share in zip(holders, sk_shares, b_shares, strict=True):
            if holder == me:
                self._own_sk_share, self._own_b_share = sk_share, b_share
                continue
            shared = crypto.agree(c.private, self._peers[holder].c_pk)
            key = crypto.derive_share_key(shared, round=self.round, a=me, b=holder)
            self._share_keys[holder] = key
            plain = _SHARE_PLAIN.pack(me, holder) + sk_share.to_bytes() + b_share.to_bytes()
            blob = crypto.encrypt(key, plain, sender=me, receiver=holder, round=self.round)
            out.append((holder, blob))
        self._c = None  # the share keys are derived; the private key is no longer needed
        self.stage = Stage.SHARE
        return ShareKeys(self.round, me, tuple(out))

    def _on_shares(self, msg: EncryptedShares) -> MaskedInput:
        self._expect(Stage.SHARE, "EncryptedShares")
        self._check_envelope(msg)
        cfg, s, b = self.config, self._s, self._b
        assert cfg is not None and s is not None and b is not None
        me = self.client_id
        if self._input is None:
            raise SecAggError(f"client {me}: set_input() was not called before masking")
        senders = [sender for sender, _ in msg.ciphertexts]
        if len(set(senders)) != len(senders):
            raise SecAggError(f"client {me}: a sender appears twice among the shares")
        strangers = set(senders) - set(self._peers)
        if strangers:
            raise SecAggError(
                f"client {me}: shares from clients that are not live neighbours {sorted(strangers)}"
            )
        if len(senders) + 1 < cfg.threshold:
            raise SecAggError(f"client {me}: only {len(senders)} neighbours left to mask with")
        held: dict[int, tuple[shamir.Share, shamir.Share]] = {}
        for sender, blob in msg.ciphertexts:
            plain = crypto.decrypt(
                self._share_keys[sender], blob, sender=sender, receiver=me, round=self.round
            )
            if len(plain) != PLAINTEXT_SIZE:
                raise SerializationError(f"client {me}: share bundle from {sender} is malformed")
            owner, holder = _SHARE_PLAIN.unpack_from(plain)
            if owner != sender or holder != me:
                raise SecAggError(f"client {me}: share bundle from {sender} is misaddressed")
            off = _SHARE_PLAIN.size
            sk_share = shamir.Share.from_bytes(plain[off : off + shamir.SHARE_SIZE])
            b_share = shamir.Share.from_bytes(plain[off + shamir.SHARE_SIZE :])
            for share in (sk_share, b_share):
                if share.index != me + 1 or share.threshold != cfg.threshold:
                    raise SecAggError(f"client {me}: share from {sender} has the wrong index")
            held[sender] = (sk_share, b_share)
        vector, weight = self._input
        if vector.shape != (cfg.vector_length,):
            raise UpdateRejected(
                f"client {me}: update has {vector.size} values, the round expects "
                f"{cfg.vector_length}"
            )
        if weight > cfg.max_weight:
            raise UpdateRejected(f"client {me}: weight {weight} exceeds {cfg.max_weight}")
        masks = [(b, 1)]
        for v in sorted(held):
            shared = crypto.agree(s.private, self._peers[v].s_pk)
            seed = crypto.derive_mask_seed(shared, round=self.round, a=me, b=v)
            masks.append((seed, _pairwise_sign(me, v)))
        masked = quantize(
            vector,
            weight,
            clip=cfg.clip,
            scale_bits=cfg.scale_bits,
            modulus_bits=cfg.modulus_bits,
            masks=masks,
        )
        self._held = held
        self._input = None
        self._s = None
        self._b = None
        self._share_keys = {}
        self.stage = Stage.MASKED
        return MaskedInput(self.round, me, masked)

    def _on_unmask(self, msg: UnmaskRequest) -> UnmaskShares:
        self._expect(Stage.MASKED, "UnmaskRequest")
        self._check_envelope(msg)
        cfg = self.config
        own_sk, own_b = self._own_sk_share, self._own_b_share
        assert cfg is not None and own_sk is not None and own_b is not None
        me = self.client_id
        b_of, sk_of = list(msg.b_share_of), list(msg.sk_share_of)
        if len(set(b_of)) != len(b_of) or len(set(sk_of)) != len(sk_of):
            raise SecAggError(f"client {me}: unmask request repeats a peer")
        both = set(b_of) & set(sk_of)
        if both:
            raise SecAggError(
                f"client {me}: unmask request asks for both shares of {sorted(both)}; refused"
            )
        if me not in b_of:
            raise SecAggError(f"client {me}: unmask request treats this client as dropped")
        partners = set(self._held) | {me}
        if set(b_of) | set(sk_of) != partners:
            raise SecAggError(
                f"client {me}: unmask request names {sorted(set(b_of) | set(sk_of))}, but "
                f"this client holds shares of {sorted(partners)}"
            )
        if len(b_of) < cfg.threshold:
            raise SecAggError(
                f"client {me}: only {len(b_of)} survivors in the neighbourhood, fewer than "
                f"t = {cfg.threshold}; refusing to reveal shares"
            )
        b_out = []
        for owner in sorted(b_of):
            share = own_b if owner == me else self._held[owner][1]
            b_out.append((owner, share.to_bytes()))
        sk_out = [(owner, self._held[owner][0].to_bytes()) for owner in sorted(sk_of)]
        self.abort()
        self.stage = Stage.DONE
        return UnmaskShares(self.round, me, tuple(b_out), tuple(sk_out))
