"""Sans-IO challenge-response join: a site proves it holds an allowlisted Ed25519 key.

::

    site                                        coordinator (Authenticator)
    ----                                        ---------------------------
    public_key                  ------------->  challenge(public_key)
                                                  unknown / revoked -> AuthError
                                <-------------    nonce (32 fresh random bytes, single use)
    sign_challenge(key, server_id, nonce, cert)
    public_key, nonce, signature ------------>  verify(public_key, nonce, signature)
                                                  -> SiteEntry, or AuthError

The signature covers the transcript::

    b"fedlearn-join-v2" || u32_be(len(server_id)) || server_id (UTF-8)
                        || u8(len(cert)) || cert || nonce || public_key

where ``cert`` is the SHA-256 of the coordinator's TLS certificate (DER) as the site saw
it when it verified the channel, and empty on a plaintext channel. A proof is bound to one
coordinator twice over: by the certificate the site verified (a coordinator B that passes
coordinator A's challenge on to a site gets a proof over B's certificate, which A refuses)
and by ``server_id``, which a site may pin (the only binding a plaintext channel has). It
is also bound to one nonce and one key.

A nonce is consumed by the first ``verify`` that names it, whatever the outcome, so a
captured (nonce, signature) pair can never be replayed. A nonce belongs to the stream that
asked for it: no later Hello, for whatever key, can push it out (whoever knows a site's
public key could otherwise keep its join from ever completing); it leaves when answered,
withdrawn (its stream ended) or expired. Nothing here touches a socket or logs; errors
name keys by fingerprint and never include key bytes, nonces or signatures.
"""

from __future__ import annotations

import hmac
import secrets
import struct
import threading
import time
from collections import OrderedDict
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

TRANSCRIPT_DOMAIN = b"fedlearn-join-v2"
NONCE_SIZE = 32
SIGNATURE_SIZE = 64
MAX_SERVER_ID_BYTES = 1024
CERT_DIGEST_SIZE = 32
"""SHA-256 of the coordinator's certificate, in the transcript of a TLS join."""

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


def _cert_digest(server_cert_sha256: bytes | None) -> bytes:
    if server_cert_sha256 is None:
        return b""
    return _as_bytes(server_cert_sha256, CERT_DIGEST_SIZE, "certificate digest")


def join_transcript(
    server_id: str, nonce: bytes, public_key: bytes, server_cert_sha256: bytes | None = None
) -> bytes:
    """The exact bytes a site signs to answer ``nonce`` from the coordinator ``server_id``
    whose TLS certificate has the SHA-256 ``server_cert_sha256`` (None: plaintext)."""
    sid = _server_id_bytes(server_id)
    cert = _cert_digest(server_cert_sha256)
    return b"".join(
        (
            TRANSCRIPT_DOMAIN,
            struct.pack(">I", len(sid)),
            sid,
            struct.pack(">B", len(cert)),
            cert,
            _as_bytes(nonce, NONCE_SIZE, "nonce"),
            _as_bytes(public_key, PUBLIC_KEY_SIZE, "public key"),
        )
    )


def sign_challenge(
    private_key: Ed25519PrivateKey,
    server_id: str,
    nonce: bytes,
    server_cert_sha256: bytes | None = None,
) -> bytes:
    """Client side: the 64-byte Ed25519 signature answering ``nonce`` from ``server_id``,
    over the certificate the site verified (``server_cert_sha256``; None on plaintext)."""
    transcript = join_transcript(
        server_id, nonce, public_key_bytes(private_key), server_cert_sha256
    )
    return private_key.sign(transcript)


@dataclass(frozen=True, slots=True)
class _Pending:
    public_key: bytes
    expires_at: float


class Authenticator:
    """Server side of the join handshake. Thread-safe (one internal lock), so gRPC handler
    threads may share one instance.

    ``server_cert_sha256`` is the SHA-256 of this coordinator's own TLS certificate (DER),
    None when it serves plaintext. Memory is bounded: at most ``max_outstanding``
    unanswered nonces (a challenge beyond that is refused as retryable, never made by
    dropping another), and the same bound on remembered used nonces (kept only to report
    replays clearly; a forgotten one is still refused, because only outstanding nonces are
    ever accepted). Expired nonces are purged on every call. How many joins one peer may
    have in progress is the transport's to limit (fedlearn.deploy.servicer).
    """

    def __init__(
        self,
        allowlist: Allowlist,
        server_id: str,
        *,
        server_cert_sha256: bytes | None = None,
        nonce_ttl_s: float = 30.0,
        max_outstanding: int = 10_000,
        clock: Clock = time.monotonic,
    ) -> None:
        self._server_id = server_id
        _server_id_bytes(server_id)
        try:
            self._cert = _cert_digest(server_cert_sha256)
        except AuthError as exc:
            raise ConfigError(str(exc)) from None
        if not nonce_ttl_s > 0:
            raise ConfigError(f"nonce_ttl_s must be positive, got {nonce_ttl_s!r}")
        if max_outstanding < 1:
            raise ConfigError("max_outstanding must be at least 1")
        self._allowlist = allowlist
        self._ttl = float(nonce_ttl_s)
        self._max_outstanding = max_outstanding
        self._clock = clock
        # Insertion order is issue order, hence expiry order (fixed TTL, monotonic clock).
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self._used: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    # -- configuration ------------------------------------------------------------------------

    @property
    def server_id(self) -> str:
        return self._server_id

    @property
    def server_cert_sha256(self) -> bytes | None:
        """The certificate digest proofs must cover (None: plaintext)."""
        return self._cert or None

    @property
    def allowlist(self) -> Allowlist:
        return self._allowlist

    def replace_allowlist(self, allowlist: Allowlist) -> None:
        """Swap in a reloaded allowlist; outstanding nonces of keys now unknown or revoked
        will fail ``verify``."""
        with self._lock:
            self._allowlist = allowlist

    def admitted(self, public_key: bytes) -> SiteEntry | None:
        """The site ``public_key`` belongs to if the current allowlist admits it."""
        with self._lock:
            entry = self._allowlist.lookup(public_key)
        return None if entry is None or entry.revoked else entry

    @property
    def outstanding(self) -> int:
        """How many issued nonces await an answer (after purging expired ones)."""
        with self._lock:
            self._purge(self._clock())
            return len(self._pending)

    # -- protocol -----------------------------------------------------------------------------

    def challenge(self, public_key: bytes) -> bytes:
        """Issue a fresh single-use nonce for ``public_key``; AuthError if the key is unknown
        or revoked, or (retryable) if too many challenges are outstanding."""
        key = _as_bytes(public_key, PUBLIC_KEY_SIZE, "public key")
        with self._lock:
            self._admit(key)
            now = self._clock()
            self._purge(now)
            if len(self._pending) >= self._max_outstanding:
                raise AuthError(
                    "too many outstanding join challenges; try again later", retryable=True
                )
            nonce = secrets.token_bytes(NONCE_SIZE)
            while nonce in self._pending or nonce in self._used:  # pragma: no cover - 2**-256
                nonce = secrets.token_bytes(NONCE_SIZE)
            self._pending[nonce] = _Pending(public_key=key, expires_at=now + self._ttl)
            return nonce

    def withdraw(self, nonce: bytes) -> None:
        """Forget an unanswered nonce (its stream ended); answering it later is refused."""
        with self._lock:
            self._pending.pop(bytes(nonce), None)

    def verify(self, public_key: bytes, nonce: bytes, signature: bytes) -> SiteEntry:
        """Check the answer to a challenge and return the site it authenticates.

        Refused with AuthError: malformed inputs, a nonce we did not issue (or forgot after
        expiry), a nonce already used (replay), one issued to another key, an expired one, a
        key that is no longer allowed, and a signature that does not verify (not made with
        the site's key, or made for another coordinator). The nonce is consumed by this call
        whatever the outcome.
        """
        key = _as_bytes(public_key, PUBLIC_KEY_SIZE, "public key")
        nonce_b = _as_bytes(nonce, NONCE_SIZE, "nonce")
        sig = _as_bytes(signature, SIGNATURE_SIZE, "signature")
        with self._lock:
            entry = self._consume(key, nonce_b)
        # Signature check outside the lock: the nonce is already consumed.
        transcript = join_transcript(self._server_id, nonce_b, key, self.server_cert_sha256)
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(sig, transcript)
        except (InvalidSignature, ValueError):
            raise AuthError(
                f"bad signature for site {entry.name!r} ({entry.fingerprint}): not made with "
                "its key for this coordinator"
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
        while self._used:
            nonce, expires_at = next(iter(self._used.items()))
            if expires_at > now:
                break
            del self._used[nonce]
