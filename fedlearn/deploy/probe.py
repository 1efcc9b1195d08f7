"""What a site learns about its coordinator's TLS before (or instead of) speaking gRPC.

grpcio does not tell a client which certificate its channel verified, and a channel that
cannot agree with its server on TLS just reports UNAVAILABLE, as it does for a coordinator
that is down. So a site makes its own TLS connection to the same address with the same
trust (the CA, the server name, its client certificate under mutual TLS) right before each
join:

* the SHA-256 of the certificate it verified goes into the join proof
  (:mod:`fedlearn.security.auth`), binding the proof to that coordinator;
* a coordinator that answers a TLS handshake with something else (a plaintext one), that
  presents a certificate the site does not trust, or that hangs up right after the
  handshake (mutual TLS, and no acceptable client certificate) is a configuration error
  the site stops on, with what to change, instead of retrying forever;
* a plaintext site whose gRPC call fails asks :func:`speaks_tls`: a coordinator that
  completes a TLS handshake is a TLS one, and the site stops with what to change.

Only a coordinator that cannot be reached at all (refused, reset, timed out) is retried.
Nothing here logs; errors carry the address, never key material.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
from urllib.parse import unquote

from fedlearn.errors import ConfigError

PROBE_TIMEOUT_S = 5.0
_NOT_TLS = {
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
}


def split_address(address: str) -> tuple[str, int]:
    """``host`` and ``port`` of a gRPC target such as ``127.0.0.1:7443``, ``[::1]:7443``,
    ``localhost:7443`` or ``dns:///coordinator.example:7443``."""
    target = address
    if target.startswith("dns:"):
        target = target[4:].lstrip("/")
    host, sep, port = target.rpartition(":")
    host = unquote(host)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"coordinator.address {address!r}: expected host:port")
    return host, int(port)


def _connect(address: str, timeout: float) -> socket.socket:
    return socket.create_connection(split_address(address), timeout=timeout)


def peer_certificate_sha256(
    address: str,
    root_certificates: bytes,
    *,
    server_name: str | None = None,
    client_cert_files: tuple[str, str] | None = None,
    timeout: float = PROBE_TIMEOUT_S,
) -> bytes:
    """Connect with TLS as the site's gRPC channel does and return the SHA-256 of the
    certificate the coordinator presented (verified against ``root_certificates`` and
    ``server_name``, or the address's host).

    ConfigError when the coordinator can be reached but TLS with it cannot work as
    configured; OSError when it cannot be reached (retry later).
    """
    context = ssl.create_default_context(cadata=root_certificates.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    if client_cert_files is not None:
        try:
            context.load_cert_chain(*client_cert_files)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use the client certificate {client_cert_files[0]} with its key "
                f"{client_cert_files[1]}: {exc}"
            ) from None
    host = server_name or split_address(address)[0]
    with _connect(address, timeout) as sock:
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
                # A coordinator that accepts the connection speaks first (HTTP/2 settings);
                # one that requires a client certificate it did not get hangs up instead.
                refused = tls.recv(1) == b""
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(
                f"the coordinator at {address} presented a certificate this site does not "
                f"trust ({exc.verify_message}): coordinator.ca must be the CA that signed it, "
                "and coordinator.server_name (or the address's host) a name it is issued for"
            ) from None
        except ssl.SSLError as exc:
            raise _tls_failure(address, exc) from None
        except TimeoutError:
            refused = False  # slow to speak, but it did not hang up
    if refused:
        what = "none" if client_cert_files is None else f"{client_cert_files[0]}"
        raise ConfigError(
            f"the coordinator at {address} closed the connection right after the TLS "
            f"handshake: it requires a client certificate it accepts (mutual TLS), and this "
            f"site presented {what}; set coordinator.cert and coordinator.key to a "
            "certificate issued by the coordinator's client CA (fedlearn certs site)"
        )
    if der is None:  # pragma: no cover - a verified TLS peer always has a certificate
        raise ConfigError(f"the coordinator at {address} presented no certificate")
    return hashlib.sha256(der).digest()


def _tls_failure(address: str, exc: ssl.SSLError) -> OSError | ConfigError:
    reason = str(getattr(exc, "reason", None) or exc)
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return OSError(f"TLS connection to {address} closed during the handshake")
    if reason in _NOT_TLS:
        return ConfigError(
            f"the coordinator at {address} does not speak TLS (it answered the TLS handshake "
            "with something else: a plaintext coordinator, insecure = true on its side?); ask "
            "its operator for its TLS address, or set coordinator.insecure = true on this "
            "site if plaintext is really meant"
        )
    if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
        return ConfigError(
            f"the coordinator at {address} refused this site's TLS client certificate "
            f"({reason}): set coordinator.cert and coordinator.key to a certificate issued by "
            "the coordinator's client CA (fedlearn certs site)"
        )
    return ConfigError(f"TLS with the coordinator at {address} failed: {reason}")


def speaks_tls(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether whatever listens at ``address`` completes a TLS handshake (no verification:
    this only tells a plaintext site that it dialled a TLS coordinator)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            _connect(address, timeout) as sock,
            context.wrap_socket(sock, server_hostname=split_address(address)[0]),
        ):
            return True
    except (OSError, ConfigError):
        return False
