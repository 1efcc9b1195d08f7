"""Sans-IO challenge-response join: a site proves it holds an allowlisted Ed25519 key.

::

    site                                        coordinator (Authenticator)
    ----                                        ---------------------------
    public_key                  ------------->  challenge(public_key)
                                                  unknown / revoked -> AuthError
                                <-------------    nonce (32 fresh random bytes, single use)
    sign_challenge(key, server_id, nonce)
    public_key, nonce, signature ------------>  verify(public_key, nonce, signature)
                                                  -> SiteEntry, or AuthError

The signature covers the transcript::

    b"fedlearn-join-v1" || u32_be(len(server_id)) || server_id (UTF-8) || nonce || public_key

so a proof is bound to one coordinator (``server_id``), one nonce and one key. A nonce is
consumed by the first ``verify`` that names it, whatever the outcome, so a captured
(nonce, signature) pair can never be replayed. Nothing here touches a socket or logs; errors
name keys by fingerprint and never include key bytes, nonces or signatures.
"""

from __future__ import annotations

import contextlib
import hmac
import secrets
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlearn.errors import AuthError, ConfigError
from fedlearn.security.keys import (
    PUBLIC_KEY_SIZE,
    Allowlist,
    SiteEntry,
    fingerprint,
    public_key_bytes,
)

TRANSCRIPT_DOMAIN = b"fedlearn-join-v1"
NONCE_SIZE = 32
SIGNATURE_SIZE = 64
MAX_SERVER_ID_BYTES = 1024

Clock = Callable[[], float]


def _server_id_bytes(server_id: str) -> bytes:
    if not isinstance(server_id, str) or not server_id:
        raise ConfigError("server_id must be a non-empty string")
    encoded = server_id.encode("utf-8")
    if len(encoded) > MAX_SERVER_ID_BYTES:
        raise ConfigError(f"server_id is longer than {MAX_SERVER_ID_BYTES} bytes")
    return encoded


def _as_bytes(value: object, size: int, what: str) -> bytes:
    """``value`` as bytes of exactly ``size``, else AuthError (the value is not quoted)."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise AuthError(f"malformed {what}: expected bytes")
    data = bytes(value)
    if len(data) != size:
        raise AuthError(f"malformed {what}: expected {size} bytes, got {len(data)}")
    return data


def join_transcript(server_id: str, nonce: bytes, public_key: bytes) -> bytes:
    """The exact bytes a site signs to answer ``nonce`` from the coordinator ``server_id``."""
    sid = _server_id_bytes(server_id)
    return b"".join(
        (
            TRANSCRIPT_DOMAIN,
            struct.pack(">I", len(sid)),
            sid,
            _as_bytes(nonce, NONCE_SIZE, "nonce"),
            _as_bytes(public_key, PUBLIC_KEY_SIZE, "public key"),
        )
    )


def sign_challenge(private_key: Ed25519PrivateKey, server_id: str, nonce: bytes) -> bytes:
    """Client side: the 64-byte Ed25519 signature answering ``nonce``."""
    return private_key.sign(join_transcript(server_id, nonce, public_key_bytes(private_key)))


@dataclass(frozen=True, slots=True)
class _Pending:
    public_key: bytes
    expires_at: float


class Authenticator:
    """Server side of the join handshake. Thread-safe (one internal lock), so gRPC handler
    threads may share one instance.

    Memory is bounded: at most ``max_outstanding`` unanswered nonces in all and
    ``max_per_key`` per site (a site's oldest is dropped when it asks for more), and the same
    bound on remembered used nonces (kept only to report replays clearly; a forgotten one is
    still refused, because only outstanding nonces are ever accepted). Expired nonces are
    purged on every call.
    """

    def __init__(
        self,
        allowlist: Allowlist,
        server_id: str,
        *,
        nonce_ttl_s: float = 30.0,
        max_outstanding: int = 10_000,
        max_per_key: int = 8,
        clock: Clock = time.monotonic,
    ) -> None:
        self._server_id = server_id
        _server_id_bytes(server_id)
        if not nonce_ttl_s > 0:
            raise ConfigError(f"nonce_ttl_s must be positive, got {nonce_ttl_s!r}")
        if max_outstanding < 1 or max_per_key < 1:
            raise ConfigError("max_outstanding and max_per_key must be at least 1")
        self._allowlist = allowlist
        self._ttl = float(nonce_ttl_s)
        self._max_outstanding = max_outstanding
        self._max_per_key = max_per_key
        self._clock = clock
        # Insertion order is issue order, hence expiry order (fixed TTL, monotonic clock).
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._by_key: dict[bytes, deque[bytes]] = {}
        self._used: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    # -- configuration ------------------------------------------------------------------------

    @property
    def server_id(self) -> str:
        return self._server_id

    @property
    def allowlist(self) -> Allowlist:
        return self._allowlist

    def replace_allowlist(self, allowlist: Allowlist) -> None:
        """Swap in a reloaded allowlist; outstanding nonces of keys now unknown or revoked
        will fail ``verify``."""
        with self._lock:
            self._allowlist = allowlist

    @property
    def outstanding(self) -> int:
        """How many issued nonces await an answer (after purging expired ones)."""
        with self._lock:
            self._purge(self._clock())
            return len(self._pending)

    # -- protocol -----------------------------------------------------------------------------

    def challenge(self, public_key: bytes) -> bytes:
        """Issue a fresh single-use nonce for ``public_key``; AuthError if the key is unknown
        or revoked, or if too many challenges are outstanding."""
        key = _as_bytes(public_key, PUBLIC_KEY_SIZE, "public key")
        with self._lock:
            return self._challenge(key)

    def _challenge(self, key: bytes) -> bytes:
        self._admit(key)
        now = self._clock()
        self._purge(now)
        queue = self._by_key.setdefault(key, deque())
        while len(queue) >= self._max_per_key:
            self._pending.pop(queue.popleft(), None)
        if len(self._pending) >= self._max_outstanding:
            if not queue:
                del self._by_key[key]
            raise AuthError("too many outstanding join challenges; try again later")
        nonce = secrets.token_bytes(NONCE_SIZE)
        while nonce in self._pending or nonce in self._used:  # pragma: no cover - 2**-256
            nonce = secrets.token_bytes(NONCE_SIZE)
        self._pending[nonce] = _Pending(public_key=key, expires_at=now + self._ttl)
        queue.append(nonce)
        return nonce

    def verify(self, public_key: bytes, nonce: bytes, signature: bytes) -> SiteEntry:
        """Check the answer to a challenge and return the site it authenticates.

        Refused with AuthError: malformed inputs, a nonce we did not issue (or forgot after
        expiry), a nonce already used (replay), one issued to another key, an expired one, a
        key that is no longer allowed, and a signature that does not verify. The nonce is
        consumed by this call whatever the outcome.
        """
        key = _as_bytes(public_key, PUBLIC_KEY_SIZE, "public key")
        nonce_b = _as_bytes(nonce, NONCE_SIZE, "nonce")
        sig = _as_bytes(signature, SIGNATURE_SIZE, "signature")
        with self._lock:
            entry = self._consume(key, nonce_b)
        # Signature check outside the lock: the nonce is already consumed.
        transcript = join_transcript(self._server_id, nonce_b, key)
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(sig, transcript)
        except (InvalidSignature, ValueError):
            raise AuthError(
                f"bad signature for site {entry.name!r} ({entry.fingerprint})"
            ) from None
        return entry

    def _consume(self, key: bytes, nonce_b: bytes) -> SiteEntry:
        """Take ``nonce_b`` out of the outstanding set and check everything but the signature."""
        now = self._clock()
        pending = self._pending.pop(nonce_b, None)
        if pending is None:
            self._purge(now)
            if nonce_b in self._used:
                raise AuthError("nonce already used (replay)")
            raise AuthError("unknown or expired nonce; join again", retryable=True)
        self._forget_pending(pending.public_key, nonce_b)
        self._remember_used(nonce_b, pending.expires_at)
        self._purge(now)
        if not hmac.compare_digest(pending.public_key, key):
            raise AuthError(f"nonce was not issued to key {fingerprint(key)}")
        if now >= pending.expires_at:
            raise AuthError("nonce expired; join again", retryable=True)
        return self._admit(key)

    # -- internals ----------------------------------------------------------------------------

    def _admit(self, key: bytes) -> SiteEntry:
        entry = self._allowlist.lookup(key)
        if entry is None:
            raise AuthError(f"unknown site key {fingerprint(key)}")
        if entry.revoked:
            raise AuthError(f"site {entry.name!r} is revoked")
        return entry

    def _forget_pending(self, key: bytes, nonce: bytes) -> None:
        queue = self._by_key.get(key)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(nonce)
        if not queue:
            del self._by_key[key]

    def _remember_used(self, nonce: bytes, expires_at: float) -> None:
        self._used[nonce] = expires_at
        while len(self._used) > self._max_outstanding:
            self._used.popitem(last=False)

    def _purge(self, now: float) -> None:
        while self._pending:
            nonce, pending = next(iter(self._pending.items()))
            if pending.expires_at > now:
                break
            del self._pending[nonce]
            self._forget_pending(pending.public_key, nonce)
        while self._used:
            nonce, expires_at = next(iter(self._used.items()))
            if expires_at > now:
                break
            del self._used[nonce]
