"""A development PKI for the coordinator's TLS endpoint: one CA and one server certificate.

Keys are ECDSA P-256 with SHA-256 signatures. gRPC's TLS stack (BoringSSL) negotiates
ECDSA P-256 everywhere, whereas Ed25519 *certificates* fail the handshake in grpcio
(grpc/grpc#24252; grpc-java#7774 is the same story). Ed25519 is used for site identities
(see :mod:`fedlearn.security.keys`), not for TLS.

This is for development and private deployments only: the CA key is discarded after it
signs the server certificate, so re-running :func:`write_dev_pki` makes a new CA, and every
client must be given the new ``ca.pem``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlearn.errors import ConfigError
from fedlearn.security.keys import write_file_atomic

DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
CA_CERT_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
_CLOCK_SKEW = dt.timedelta(minutes=5)
_ORGANIZATION = "fedlearn development PKI"


@dataclass(frozen=True, slots=True)
class DevPkiPaths:
    """Where :func:`write_dev_pki` put its files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True, slots=True)
class ServerPem:
    """The two byte strings ``grpc.ssl_server_credentials([(private_key, certificate_chain)])``
    takes; the key is never shown in a repr."""

    private_key: bytes
    certificate_chain: bytes

    def __repr__(self) -> str:
        return f"ServerPem(private_key=<{len(self.private_key)} bytes>, certificate_chain=...)"


def _check_days(valid_days: int) -> None:
    if not isinstance(valid_days, int) or isinstance(valid_days, bool) or valid_days < 1:
        raise ConfigError(f"valid_days must be a positive integer, got {valid_days!r}")


def _validity(valid_days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=valid_days)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _valid_dns_name(name: str) -> bool:
    if not name.isascii() or not 0 < len(name) <= 253:
        return False
    labels = name.split(".")
    for index, label in enumerate(labels):
        if label == "*" and index == 0 and len(labels) > 2:
            continue
        if not 0 < len(label) <= 63 or label.startswith("-") or label.endswith("-"):
            return False
        if not all(c.isalnum() or c in "-_" for c in label):
            return False
    return True


def subject_alt_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hostnames``: IP literals become IPAddress, the rest DNSName."""
    if isinstance(hostnames, str):
        raise ConfigError("hostnames must be a list of names, not one string")
    if not hostnames:
        raise ConfigError("a server certificate needs at least one hostname or IP address")
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hostnames:
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):  # "[::1]" as written in URLs
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            name = host.lower().rstrip(".")
            if not _valid_dns_name(name):
                raise ConfigError(
                    f"invalid hostname {raw!r}: expected a DNS name (ASCII, IDNA-encoded if "
                    "needed; '*' only as a whole first label) or an IP address"
                ) from None
            key = f"dns:{name}"
            general: x509.GeneralName = x509.DNSName(name)
        else:
            key = f"ip:{ip}"
            general = x509.IPAddress(ip)
        if key not in seen:
            seen.add(key)
            names.append(general)
    return names


def generate_ca(
    common_name: str = "fedlearn development CA", valid_days: int = 365
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    _check_days(valid_days)
    if not common_name:
        raise ConfigError("the CA needs a non-empty common name")
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before, not_after = _validity(valid_days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hostnames: Sequence[str],
    valid_days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for ``hostnames`` (DNS names and IP addresses), signed by the CA.

    The certificate expires no later than the CA does.
    """
    _check_days(valid_days)
    sans = subject_alt_names(hostnames)
    key = _new_key()
    not_before, not_after = _validity(valid_days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    first = sans[0].value
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, str(first)[:64]),
        ]
    )
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM, the form gRPC accepts."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def cert_fingerprint(cert: x509.Certificate) -> str:
    """``sha256:`` + hex SHA-256 of the DER certificate (what ``openssl x509 -fingerprint``
    shows, without the colons)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def write_dev_pki(
    out_dir: str | Path,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    *,
    valid_days: int = 365,
    overwrite: bool = False,
) -> DevPkiPaths:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` (mode 0600) into ``out_dir``.

    Refuses to replace existing files unless ``overwrite``. The CA key is not written.
    """
    out = Path(out_dir)
    paths = DevPkiPaths(
        ca_cert=out / CA_CERT_FILE,
        server_cert=out / SERVER_CERT_FILE,
        server_key=out / SERVER_KEY_FILE,
    )
    if not overwrite:
        existing = [p for p in (paths.ca_cert, paths.server_cert, paths.server_key) if p.exists()]
        if existing:
            raise ConfigError(
                f"{', '.join(str(p) for p in existing)} already exist(s) (refusing to overwrite)"
            )
    ca_key, ca_cert = generate_ca(valid_days=valid_days)
    server_key, server_cert = issue_server_cert(ca_key, ca_cert, hostnames, valid_days)
    write_file_atomic(
        paths.server_key, private_key_pem(server_key), mode=0o600, overwrite=overwrite
    )
    write_file_atomic(paths.server_cert, cert_pem(server_cert), mode=0o644, overwrite=overwrite)
    write_file_atomic(paths.ca_cert, cert_pem(ca_cert), mode=0o644, overwrite=overwrite)
    return paths


# ---------------------------------------------------------------------------------------------
# loading for grpc.ssl_server_credentials / grpc.ssl_channel_credentials


def _read(path: str | Path, what: str) -> bytes:
    source = Path(path)
    try:
        return source.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} file {source} does not exist") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {source}: {exc.strerror}") from exc


def load_pem(path: str | Path) -> bytes:
    """The bytes of a PEM file of one or more certificates (e.g. ``ca.pem`` for
    ``grpc.ssl_channel_credentials(root_certificates=...)``), checked to parse."""
    data = _read(path, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate file") from exc
    if not certs:
        raise ConfigError(f"{path} holds no certificate")
    return data


def load_server_pem(
    cert_path: str | Path = SERVER_CERT_FILE, key_path: str | Path = SERVER_KEY_FILE
) -> ServerPem:
    """The server's key and certificate chain as PEM bytes, checked to belong together."""
    chain = load_pem(cert_path)
    key_data = _read(key_path, "private key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError as exc:
        raise ConfigError(f"{key_path} is encrypted; gRPC needs an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{key_path} is not a PEM private key") from exc
    leaf = x509.load_pem_x509_certificates(chain)[0]
    key_pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    cert_pub = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if key_pub != cert_pub:
        raise ConfigError(f"{key_path} does not match the certificate in {cert_path}")
    return ServerPem(private_key=key_data, certificate_chain=chain)


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer`` signed ``cert`` (names and signature; not a full path validation)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
