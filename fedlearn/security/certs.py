"""A development PKI for a deployment's TLS: one CA, the coordinator's server certificate,
and (for mutual TLS) the sites' client certificates.

Keys are ECDSA P-256 with SHA-256 signatures. gRPC's TLS stack (BoringSSL) negotiates
ECDSA P-256 everywhere, whereas Ed25519 *certificates* fail the handshake in grpcio
(grpc/grpc#24252; grpc-java#7774 is the same story). Ed25519 is used for site identities
(see :mod:`fedlearn.security.keys`), not for TLS.

This is for development and private deployments only. By default the CA key is discarded
after it signs the server certificate, so re-running :func:`write_dev_pki` makes a new CA,
and every client must be given the new ``ca.pem``; with ``keep_ca_key`` it is written as
``ca.key`` (mode 0600), and :func:`write_site_cert` issues site certificates from it later.
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
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlearn.errors import ConfigError
from fedlearn.security.keys import check_site_name, write_file_atomic

DEFAULT_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
CA_CERT_FILE = "ca.pem"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
CA_KEY_FILE = "ca.key"
_CLOCK_SKEW = dt.timedelta(minutes=5)
_ORGANIZATION = "fedlearn development PKI"


@dataclass(frozen=True, slots=True)
class DevPkiPaths:
    """Where :func:`write_dev_pki` put its files."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    ca_key: Path | None = None
    """Written only with ``keep_ca_key``."""


@dataclass(frozen=True, slots=True)
class SiteCertPaths:
    """Where :func:`write_site_cert` put a site's client certificate and its key."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class ServerPem:
    """A TLS key and its certificate chain as PEM bytes: what
    ``grpc.ssl_server_credentials([(private_key, certificate_chain)])`` takes, and what
    ``grpc.ssl_channel_credentials(private_key=..., certificate_chain=...)`` takes for a
    site's client certificate. The key is never shown in a repr."""

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
    return _issue_leaf(
        ca_key,
        ca_cert,
        str(sans[0].value)[:64],
        ExtendedKeyUsageOID.SERVER_AUTH,
        valid_days,
        x509.SubjectAlternativeName(sans),
    )


def issue_client_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    valid_days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS client certificate (extended key usage clientAuth, common name ``name``) for a
    site of a coordinator with mutual TLS, signed by the CA; it expires no later than the
    CA does. The site's identity is still its Ed25519 key: this certificate only lets it
    through the TLS handshake."""
    _check_days(valid_days)
    check_site_name(name)
    return _issue_leaf(ca_key, ca_cert, name, ExtendedKeyUsageOID.CLIENT_AUTH, valid_days, None)


def _issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    usage: x509.ObjectIdentifier,
    valid_days: int,
    sans: x509.SubjectAlternativeName | None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    not_before, not_after = _validity(valid_days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
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
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans is not None:
        builder = builder.add_extension(sans, critical=False)
    cert = (
        builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
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


def leaf_sha256(chain: bytes) -> bytes:
    """The SHA-256 of the first certificate (DER) of a PEM chain: what a site's join proof
    covers (fedlearn.security.auth)."""
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise ConfigError("not a PEM certificate chain") from exc
    if not certs:
        raise ConfigError("the certificate chain holds no certificate")
    return certs[0].fingerprint(hashes.SHA256())


def write_dev_pki(
    out_dir: str | Path,
    hostnames: Sequence[str] = DEFAULT_HOSTNAMES,
    *,
    valid_days: int = 365,
    overwrite: bool = False,
    keep_ca_key: bool = False,
) -> DevPkiPaths:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` (mode 0600) into ``out_dir``.

    Refuses to replace existing files unless ``overwrite``. The CA key is written (as
    ``ca.key``, mode 0600) only with ``keep_ca_key``: site certificates for mutual TLS are
    issued from it (:func:`write_site_cert`).
    """
    out = Path(out_dir)
    paths = DevPkiPaths(
        ca_cert=out / CA_CERT_FILE,
        server_cert=out / SERVER_CERT_FILE,
        server_key=out / SERVER_KEY_FILE,
        ca_key=out / CA_KEY_FILE if keep_ca_key else None,
    )
    if not overwrite:
        files = (paths.ca_cert, paths.server_cert, paths.server_key, paths.ca_key)
        existing = [p for p in files if p is not None and p.exists()]
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
    if paths.ca_key is not None:
        write_file_atomic(paths.ca_key, private_key_pem(ca_key), mode=0o600, overwrite=overwrite)
    return paths


def write_site_cert(
    ca_dir: str | Path,
    name: str,
    out_dir: str | Path,
    *,
    valid_days: int = 365,
    overwrite: bool = False,
) -> SiteCertPaths:
    """Issue site ``name`` a client certificate from the dev CA in ``ca_dir`` (its
    ``ca.pem`` and ``ca.key``) and write ``<name>-tls.pem`` and ``<name>-tls.key`` (mode
    0600) into ``out_dir``; a site sets them as ``[coordinator] cert`` and ``key``."""
    check_site_name(name)
    ca_path, key_path = Path(ca_dir) / CA_CERT_FILE, Path(ca_dir) / CA_KEY_FILE
    if not key_path.exists():
        raise ConfigError(
            f"{key_path} does not exist: site certificates are issued by a dev CA whose key "
            "was kept (fedlearn certs dev --keep-ca-key)"
        )
    ca_cert = x509.load_pem_x509_certificates(load_pem(ca_path))[0]
    ca_key, _ = _load_private_key(key_path)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or not _same_public_key(ca_key, ca_cert):
        raise ConfigError(f"{key_path} is not the key of the CA in {ca_path}")
    out = Path(out_dir)
    paths = SiteCertPaths(cert=out / f"{name}-tls.pem", key=out / f"{name}-tls.key")
    if not overwrite:
        existing = [p for p in (paths.cert, paths.key) if p.exists()]
        if existing:
            raise ConfigError(
                f"{', '.join(str(p) for p in existing)} already exist(s) (refusing to overwrite)"
            )
    key, cert = issue_client_cert(ca_key, ca_cert, name, valid_days)
    write_file_atomic(paths.key, private_key_pem(key), mode=0o600, overwrite=overwrite)
    write_file_atomic(paths.cert, cert_pem(cert), mode=0o644, overwrite=overwrite)
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


def _load_private_key(key_path: str | Path) -> tuple[PrivateKeyTypes, bytes]:
    """The key in a PEM file, and the file's bytes."""
    key_data = _read(key_path, "private key")
    try:
        return serialization.load_pem_private_key(key_data, password=None), key_data
    except TypeError as exc:
        raise ConfigError(f"{key_path} is encrypted; gRPC needs an unencrypted key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{key_path} is not a PEM private key") from exc


def _same_public_key(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) == cert.public_key().public_bytes(serialization.Encoding.DER, spki)


def load_server_pem(
    cert_path: str | Path = SERVER_CERT_FILE, key_path: str | Path = SERVER_KEY_FILE
) -> ServerPem:
    """A key and its certificate chain as PEM bytes, checked to belong together (the
    coordinator's server certificate, or a site's client certificate)."""
    chain = load_pem(cert_path)
    key, key_data = _load_private_key(key_path)
    if not _same_public_key(key, x509.load_pem_x509_certificates(chain)[0]):
        raise ConfigError(f"{key_path} does not match the certificate in {cert_path}")
    return ServerPem(private_key=key_data, certificate_chain=chain)


def verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer`` signed ``cert`` (names and signature; not a full path validation)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
