"""The SecAgg+ messages: frozen dataclasses and their versioned, pickle-free byte codec."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, ClassVar, Self, TypeAlias

import numpy as np

from fedlearn.engine.records import decode_arrays, encode_arrays
from fedlearn.errors import (
    SerializationError,
)
from fedlearn.secagg import crypto, shamir
from fedlearn.secagg.config import (
    CIPHERTEXT_SIZE,
    MAX_ID,
    SecAggConfig,
    Stage,
    b64,
    uint,
    uints,
    unb64,
)


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


def _encode_field(kind: str, value: Any) -> Any:
    if kind == "uint":
        return int(value)
    if kind == "uints":
        return [int(v) for v in value]
    if kind == "key":
        return b64(value)
    if kind == "pairs":
        return [[int(i), b64(b)] for i, b in value]
    if kind == "peers":
        return [[p.client_id, b64(p.c_pk), b64(p.s_pk)] for p in value]
    if kind == "config":
        return value.to_json()
    raise AssertionError(kind)  # pragma: no cover


def _decode_field(kind: str, raw: Any, what: str) -> Any:
    if kind == "uint":
        return uint(raw, what)
    if kind == "uints":
        return uints(raw, what)
    if kind == "key":
        key = unb64(raw, what)
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
            pairs.append((uint(item[0], what), unb64(item[1], what)))
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
            peers.append(PeerKey(uint(item[0], what), c_pk, s_pk))
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


# -------------------------------------------------------------------- reply sizes


def max_reply_size(config: SecAggConfig, stage: Stage) -> int:
    """The most bytes a client's encoded reply at ``stage`` (named after the reply the server
    waits for) can take in a round with ``config``: its protocol size, from the round's
    parameters alone. A transport refuses anything larger before buffering it.

    Computed from the largest message of that kind the protocol allows: every id at
    :data:`MAX_ID` (the most digits), keys of ``KEY_SIZE`` bytes, one ciphertext of
    ``CIPHERTEXT_SIZE`` bytes per neighbour (``k``), one share per share partner (the
    ``k`` neighbours and the client itself), and the masked vector of ``vector_length + 1``
    words of the modulus's width.
    """
    big = MAX_ID
    k = config.num_neighbours
    msg: _Message
    if stage is Stage.ADVERTISE:
        msg = AdvertiseKeys(big, big, bytes(crypto.KEY_SIZE), bytes(crypto.KEY_SIZE))
    elif stage is Stage.SHARE:
        msg = ShareKeys(big, big, tuple((big, bytes(CIPHERTEXT_SIZE)) for _ in range(k)))
    elif stage is Stage.MASKED:
        dtype = crypto.mask_dtype(config.modulus_bits)
        words = config.vector_length + 1
        empty = MaskedInput(big, big, np.zeros(0, dtype))
        # the empty array's shape is [0]: one digit where the real one has len(str(words))
        return len(encode_message(empty)) + words * dtype.itemsize + len(str(words)) - 1
    elif stage is Stage.UNMASK:
        # the partners' shares split between b_shares and sk_shares; in one list the
        # JSON is longest (one separator more)
        shares = tuple((big, bytes(shamir.SHARE_SIZE)) for _ in range(k + 1))
        msg = UnmaskShares(big, big, shares, ())
    else:
        raise ValueError(f"no client reply is expected at stage {stage.name}")
    return len(encode_message(msg))
