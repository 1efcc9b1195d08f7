"""Security pieces with real cryptography: dev PKI, a real gRPC TLS handshake, site keys,
the allowlist, the challenge-response join, and the certs/keys commands."""

from __future__ import annotations

import base64
import ipaddress
import os
import stat
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedlearn.cli.keys import certs_app, keys_app
from fedlearn.errors import AuthError, ConfigError, FedlearnError
from fedlearn.security import (
    NONCE_SIZE,
    Allowlist,
    Authenticator,
    SiteEntry,
    allowlist_entry_toml,
    encode_public_key,
    fingerprint,
    generate_ca,
    generate_site_key,
    issue_server_cert,
    join_transcript,
    load_allowlist,
    load_pem,
    load_private_key,
    load_server_pem,
    parse_allowlist,
    public_key_bytes,
    save_private_key,
    sign_challenge,
    verify_issued_by,
    write_dev_pki,
)

runner = CliRunner()
SERVER_ID = "coordinator.test"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------
# dev PKI


def test_ca_and_server_cert_extensions_and_chain() -> None:
    ca_key, ca = generate_ca("test CA", valid_days=30)
    key, cert = issue_server_cert(ca_key, ca, ["localhost", "127.0.0.1", "::1"], valid_days=10)

    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(ca_key.curve, ec.SECP256R1)
    assert isinstance(key.curve, ec.SECP256R1)
    ca.verify_directly_issued_by(ca)  # self-signed
    cert.verify_directly_issued_by(ca)
    assert verify_issued_by(cert, ca)

    ca_bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert ca_bc.critical and ca_bc.value.ca and ca_bc.value.path_length == 0
    ca_ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    assert cert.issuer == ca.subject


def test_cert_from_another_ca_does_not_verify() -> None:
    ca_key, ca = generate_ca()
    _, other_ca = generate_ca()
    _, cert = issue_server_cert(ca_key, ca, ["localhost"])
    assert not verify_issued_by(cert, other_ca)


@pytest.mark.parametrize(
    "hostnames",
    [[], ["bad host"], ["-x.example"], ["caf\u00e9.example"], ["a.*.example"], ["a" * 64 + ".x"]],
)
def test_bad_hostnames_are_config_errors(hostnames: list[str]) -> None:
    ca_key, ca = generate_ca()
    with pytest.raises(ConfigError):
        issue_server_cert(ca_key, ca, hostnames)


def test_bad_validity_is_config_error() -> None:
    with pytest.raises(ConfigError, match="valid_days"):
        generate_ca(valid_days=0)


def test_write_dev_pki_files_modes_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    paths = write_dev_pki(out, ["localhost", "127.0.0.1"])
    assert paths.ca_cert.name == "ca.pem" and paths.server_cert.name == "server.pem"
    assert _mode(paths.server_key) == 0o600
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    ca = x509.load_pem_x509_certificate(load_pem(paths.ca_cert))
    material = load_server_pem(paths.server_cert, paths.server_key)
    assert "PRIVATE KEY" not in repr(material)
    cert = x509.load_pem_x509_certificate(material.certificate_chain)
    cert.verify_directly_issued_by(ca)

    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_dev_pki(out, ["localhost"])
    assert load_pem(paths.ca_cert) == ca.public_bytes(Encoding.PEM)  # untouched
    write_dev_pki(out, ["localhost"], overwrite=True)
    assert load_pem(paths.ca_cert) != ca.public_bytes(Encoding.PEM)
    assert _mode(paths.server_key) == 0o600


def test_load_server_pem_rejects_mismatched_key(tmp_path: Path) -> None:
    a = write_dev_pki(tmp_path / "a", ["localhost"])
    b = write_dev_pki(tmp_path / "b", ["localhost"])
    with pytest.raises(ConfigError, match="does not match"):
        load_server_pem(a.server_cert, b.server_key)
    with pytest.raises(ConfigError, match="not a PEM certificate"):
        load_pem(a.server_key)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pem(tmp_path / "missing.pem")


# ---------------------------------------------------------------------------------------------
# a real gRPC TLS handshake on 127.0.0.1

_ECHO = "/fedlearn.test.Echo/Echo"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, bytes]]:
    out = tmp_path_factory.mktemp("pki")
    paths = write_dev_pki(out, ["localhost", "127.0.0.1"])
    material = load_server_pem(paths.server_cert, paths.server_key)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "fedlearn.test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                lambda request, context: request,
                request_deserializer=None,
                response_serializer=None,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials([(material.private_key, material.certificate_chain)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    assert port
    server.start()
    try:
        yield port, load_pem(paths.ca_cert)
    finally:
        server.stop(grace=None)


def _echo(port: int, root: bytes, *options: tuple[str, str]) -> bytes:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=list(options)) as channel:
        reply = channel.unary_unary(_ECHO)(b"hello over tls", timeout=10)
    assert isinstance(reply, bytes)
    return reply


def test_grpc_tls_handshake_with_dev_ca(tls_server: tuple[int, bytes]) -> None:
    port, ca_pem = tls_server
    assert _echo(port, ca_pem) == b"hello over tls"  # SAN IP 127.0.0.1
    # SAN DNS name: present "localhost" as the TLS server name.
    assert _echo(port, ca_pem, ("grpc.ssl_target_name_override", "localhost")) == b"hello over tls"


def test_grpc_tls_refuses_other_ca(tls_server: tuple[int, bytes]) -> None:
    port, _ = tls_server
    _, other_ca = generate_ca("some other CA")
    with pytest.raises(grpc.RpcError) as info:
        _echo(port, other_ca.public_bytes(Encoding.PEM))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_grpc_tls_refuses_name_not_in_san(tls_server: tuple[int, bytes]) -> None:
    port, ca_pem = tls_server
    with pytest.raises(grpc.RpcError) as info:
        _echo(port, ca_pem, ("grpc.ssl_target_name_override", "evil.example"))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ---------------------------------------------------------------------------------------------
# site keys


def test_save_and_load_private_key(tmp_path: Path) -> None:
    key = generate_site_key()
    path = save_private_key(tmp_path / "site.key", key)
    assert _mode(path) == 0o600
    loaded = load_private_key(path)
    assert public_key_bytes(loaded) == public_key_bytes(key)
    assert len(public_key_bytes(key)) == 32
    assert public_key_bytes(key.public_key()) == public_key_bytes(key)

    with pytest.raises(ConfigError, match="already exists"):
        save_private_key(path, generate_site_key())
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(key)
    other = generate_site_key()
    save_private_key(path, other, overwrite=True)
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(other)
    assert _mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["site.key"]  # no temp files left


def test_load_private_key_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_private_key(tmp_path / "nope.key")
    junk = tmp_path / "junk.key"
    junk.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        load_private_key(junk)
    ec_path = write_dev_pki(tmp_path / "pki", ["localhost"]).server_key
    with pytest.raises(ConfigError, match="not an Ed25519"):
        load_private_key(ec_path)


def test_fingerprint_format() -> None:
    fp = fingerprint(bytes(32))
    assert fp.startswith("ed25519:") and len(fp) == len("ed25519:") + 16
    int(fp.removeprefix("ed25519:"), 16)
    assert fingerprint(bytes(32)) != fingerprint(b"\x01" + bytes(31))


# ---------------------------------------------------------------------------------------------
# allowlist


def _b64(key: Ed25519PrivateKey) -> str:
    return encode_public_key(public_key_bytes(key))


def test_allowlist_round_trip_and_lookup(tmp_path: Path) -> None:
    a, b = generate_site_key(), generate_site_key()
    text = allowlist_entry_toml("site-a", public_key_bytes(a)) + allowlist_entry_toml(
        "site-b", public_key_bytes(b), revoked=True
    )
    path = tmp_path / "allow.toml"
    path.write_text(text)
    allowlist = load_allowlist(path)
    assert len(allowlist) == 2
    entry_a = allowlist.lookup(public_key_bytes(a))
    assert entry_a == SiteEntry("site-a", public_key_bytes(a), revoked=False)
    entry_b = allowlist.lookup(public_key_bytes(b))
    assert entry_b is not None and entry_b.revoked
    assert allowlist.lookup(public_key_bytes(generate_site_key())) is None
    assert allowlist.by_name("site-b") == entry_b
    assert _b64(a) not in repr(entry_a)  # reprs show fingerprints only
    assert parse_allowlist("").sites == ()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('[[site]]\nname = "a"\npublic_key = "!!!"\n', "site #1 ('a'): public_key is not valid"),
        (
            '[[site]]\nname = "a"\npublic_key = "{short}"\n',
            "site #1 ('a'): public_key decodes to 16 bytes",
        ),
        ('[[site]]\nname = "a"\n', "site #1 ('a'): missing public_key"),
        ('[[site]]\npublic_key = "{k1}"\n', "site #1: missing name"),
        ('[[site]]\nname = "a b"\npublic_key = "{k1}"\n', "site #1 ('a b'): invalid name"),
        (
            '[[site]]\nname = "a"\npublic_key = "{k1}"\nrevoked = "no"\n',
            "site #1 ('a'): revoked must be true or false",
        ),
        (
            '[[site]]\nname = "a"\npublic_key = "{k1}"\nrevokd = true\n',
            "site #1 ('a'): unknown field(s) revokd",
        ),
        (
            '[[site]]\nname = "a"\npublic_key = "{k1}"\n'
            '[[site]]\nname = "a"\npublic_key = "{k2}"\n',
            "site #2 ('a'): name already used by site #1",
        ),
        (
            '[[site]]\nname = "a"\npublic_key = "{k1}"\n'
            '[[site]]\nname = "b"\npublic_key = "{k1}"\n',
            "site #2 ('b'): public_key ed25519:",
        ),
        ('site = "x"\n', "'site' must be an array of tables"),
        ('[[sites]]\nname = "a"\n', "unknown top-level key(s) sites"),
        ("[[site]\n", "not valid TOML"),
    ],
)
def test_allowlist_errors_name_the_entry(body: str, expected: str) -> None:
    k1, k2 = _b64(generate_site_key()), _b64(generate_site_key())
    short = base64.b64encode(bytes(16)).decode()
    text = body.replace("{k1}", k1).replace("{k2}", k2).replace("{short}", short)
    with pytest.raises(ConfigError) as info:
        parse_allowlist(text, source="allow.toml")
    assert expected in str(info.value)
    assert "allow.toml" in str(info.value)


def test_allowlist_reports_every_problem_and_missing_file(tmp_path: Path) -> None:
    text = '[[site]]\nname = "a"\n[[site]]\nname = "b"\npublic_key = "??"\n'
    with pytest.raises(ConfigError) as info:
        parse_allowlist(text)
    assert "site #1 ('a')" in str(info.value) and "site #2 ('b')" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_allowlist(tmp_path / "none.toml")


def test_allowlist_constructor_refuses_duplicates() -> None:
    key = public_key_bytes(generate_site_key())
    with pytest.raises(ConfigError, match="share the public key"):
        Allowlist([SiteEntry("a", key), SiteEntry("b", key)])
    with pytest.raises(ConfigError, match="listed twice"):
        Allowlist([SiteEntry("a", key), SiteEntry("a", public_key_bytes(generate_site_key()))])


# ---------------------------------------------------------------------------------------------
# challenge-response


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sites() -> dict[str, Ed25519PrivateKey]:
    return {name: generate_site_key() for name in ("alpha", "beta", "gone")}


@pytest.fixture
def allowlist(sites: dict[str, Ed25519PrivateKey]) -> Allowlist:
    return Allowlist(
        SiteEntry(name, public_key_bytes(key), revoked=name == "gone")
        for name, key in sites.items()
    )


def _join(auth: Authenticator, key: Ed25519PrivateKey, server_id: str = SERVER_ID) -> SiteEntry:
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    return auth.verify(public, nonce, sign_challenge(key, server_id, nonce))


def test_valid_join_is_accepted(allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    entry = _join(auth, sites["alpha"])
    assert entry.name == "alpha"
    assert _join(auth, sites["beta"]).name == "beta"
    assert auth.outstanding == 0


def test_nonces_are_fresh_and_32_bytes(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    public = public_key_bytes(sites["alpha"])
    nonces = {auth.challenge(public) for _ in range(5)}
    assert len(nonces) == 5 and all(len(n) == NONCE_SIZE for n in nonces)


def test_unknown_key_refused_at_challenge(allowlist: Allowlist) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    stranger = generate_site_key()
    public = public_key_bytes(stranger)
    with pytest.raises(AuthError, match=f"unknown site key {fingerprint(public)}"):
        auth.challenge(public)
    # Nor can a stranger answer a nonce issued to someone else.
    with pytest.raises(AuthError):
        auth.verify(public, bytes(32), sign_challenge(stranger, SERVER_ID, bytes(32)))


def test_revoked_key_refused(allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    with pytest.raises(AuthError, match="site 'gone' is revoked"):
        auth.challenge(public_key_bytes(sites["gone"]))


def test_revocation_after_challenge_is_enforced_at_verify(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    key = sites["alpha"]
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    auth.replace_allowlist(
        Allowlist(SiteEntry(e.name, e.public_key, revoked=True) for e in allowlist)
    )
    with pytest.raises(AuthError, match="site 'alpha' is revoked"):
        auth.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce))


def test_replay_is_refused(allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    key = sites["alpha"]
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    signature = sign_challenge(key, SERVER_ID, nonce)
    assert auth.verify(public, nonce, signature).name == "alpha"
    with pytest.raises(AuthError, match=r"nonce already used \(replay\)"):
        auth.verify(public, nonce, signature)


def test_signature_from_a_different_key_refused(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    public = public_key_bytes(sites["alpha"])
    nonce = auth.challenge(public)
    forged = sites["beta"].sign(join_transcript(SERVER_ID, nonce, public))
    with pytest.raises(AuthError, match="bad signature for site 'alpha'"):
        auth.verify(public, nonce, forged)
    # The nonce was consumed by the failed attempt: a correct answer now is refused too.
    with pytest.raises(AuthError, match="already used"):
        auth.verify(public, nonce, sign_challenge(sites["alpha"], SERVER_ID, nonce))


def test_nonce_for_key_a_used_with_key_b_refused(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    nonce = auth.challenge(public_key_bytes(sites["alpha"]))
    beta = sites["beta"]
    with pytest.raises(AuthError, match="not issued to key"):
        auth.verify(public_key_bytes(beta), nonce, sign_challenge(beta, SERVER_ID, nonce))


def test_expired_nonce_refused(allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]) -> None:
    clock = FakeClock()
    auth = Authenticator(allowlist, SERVER_ID, nonce_ttl_s=30, clock=clock)
    key = sites["alpha"]
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    clock.now += 29.9
    assert auth.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce)).name == "alpha"
    nonce = auth.challenge(public)
    clock.now += 30.0
    with pytest.raises(AuthError, match="nonce expired"):
        auth.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce))
    # Once purged by another call, it is simply unknown.
    nonce = auth.challenge(public)
    clock.now += 31
    assert auth.outstanding == 0
    with pytest.raises(AuthError, match="unknown or expired nonce"):
        auth.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce))


def test_wrong_server_id_refused(allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    key = sites["alpha"]
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    with pytest.raises(AuthError, match="bad signature"):
        auth.verify(public, nonce, sign_challenge(key, "another-coordinator", nonce))


def test_tampered_nonce_refused(allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    key = sites["alpha"]
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    signature = sign_challenge(key, SERVER_ID, nonce)
    tampered = bytes([nonce[0] ^ 1]) + nonce[1:]
    with pytest.raises(AuthError, match="unknown or expired nonce"):
        auth.verify(public, tampered, signature)
    # A signature over a tampered nonce does not answer the real one either.
    with pytest.raises(AuthError, match="bad signature"):
        auth.verify(public, nonce, sign_challenge(key, SERVER_ID, tampered))


def test_transcript_is_length_prefixed_and_bound() -> None:
    nonce, key, cert = bytes(range(32)), bytes(32), bytes(range(100, 132))
    t = join_transcript("ab", nonce, key)
    assert t == b"fedlearn-join-v2" + b"\x00\x00\x00\x02ab" + b"\x00" + nonce + key
    assert join_transcript("ab", nonce, key, cert) == (
        b"fedlearn-join-v2" + b"\x00\x00\x00\x02ab" + b"\x20" + cert + nonce + key
    )
    assert join_transcript("a", nonce, key) != join_transcript("ab", nonce, key)
    with pytest.raises(AuthError, match="malformed certificate digest"):
        join_transcript("ab", nonce, key, cert[:31])


def test_proof_is_bound_to_the_coordinators_certificate(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    """A proof over another certificate (a coordinator that relays this one's challenge),
    or over none (plaintext), is refused by a TLS coordinator, and the reverse."""
    mine, theirs = bytes(range(32)), bytes(range(1, 33))
    key = sites["alpha"]
    public = public_key_bytes(key)
    auth = Authenticator(allowlist, SERVER_ID, server_cert_sha256=mine)
    assert auth.server_cert_sha256 == mine
    for cert in (theirs, None):
        nonce = auth.challenge(public)
        refused = r"bad signature for site 'alpha'.*for this coordinator"
        with pytest.raises(AuthError, match=refused):
            auth.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce, cert))
    nonce = auth.challenge(public)
    assert auth.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce, mine)).name == "alpha"
    plaintext = Authenticator(allowlist, SERVER_ID)
    nonce = plaintext.challenge(public)
    with pytest.raises(AuthError, match="bad signature"):
        plaintext.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce, mine))
    with pytest.raises(ConfigError, match="certificate digest"):
        Authenticator(allowlist, SERVER_ID, server_cert_sha256=b"short")


def test_malformed_inputs_are_auth_errors(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    public = public_key_bytes(sites["alpha"])
    nonce = auth.challenge(public)
    with pytest.raises(AuthError, match="malformed public key"):
        auth.challenge(public[:31])
    with pytest.raises(AuthError, match="malformed nonce"):
        auth.verify(public, nonce[:16], bytes(64))
    with pytest.raises(AuthError, match="malformed signature"):
        auth.verify(public, nonce, bytes(63))
    with pytest.raises(AuthError, match="expected bytes"):
        auth.verify(public, "not bytes", bytes(64))  # type: ignore[arg-type]


def test_bounded_memory(allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]) -> None:
    clock = FakeClock()
    auth = Authenticator(allowlist, SERVER_ID, nonce_ttl_s=10, max_outstanding=5, clock=clock)
    alpha, beta = public_key_bytes(sites["alpha"]), public_key_bytes(sites["beta"])
    first = auth.challenge(alpha)
    others = [auth.challenge(alpha) for _ in range(4)]
    assert auth.outstanding == 5
    with pytest.raises(AuthError, match="too many outstanding") as info:
        auth.challenge(beta)  # refused, and retryable: nobody's challenge was dropped for it
    assert info.value.retryable
    assert (
        auth.verify(alpha, first, sign_challenge(sites["alpha"], SERVER_ID, first)).name == "alpha"
    )
    auth.withdraw(others[0])  # its stream ended
    assert auth.outstanding == 3
    with pytest.raises(AuthError, match="unknown or expired nonce"):
        auth.verify(alpha, others[0], sign_challenge(sites["alpha"], SERVER_ID, others[0]))
    auth.challenge(beta)
    clock.now += 10  # everything expires and is purged
    assert auth.outstanding == 0
    assert _join(auth, sites["beta"]).name == "beta"


def test_a_challenge_is_never_dropped_for_newer_ones(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    """Hole (unauthenticated flood): the 9th challenge for a key evicted the oldest, so
    anyone who knows a site's public key could make its join fail."""
    auth = Authenticator(allowlist, SERVER_ID)
    key = sites["alpha"]
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    for _ in range(100):
        auth.challenge(public)
    assert auth.verify(public, nonce, sign_challenge(key, SERVER_ID, nonce)).name == "alpha"


def test_admitted_follows_the_allowlist(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    alpha = public_key_bytes(sites["alpha"])
    assert auth.admitted(alpha) == allowlist.by_name("alpha")
    assert auth.admitted(public_key_bytes(sites["gone"])) is None
    assert auth.admitted(public_key_bytes(generate_site_key())) is None
    auth.replace_allowlist(Allowlist([SiteEntry("alpha", alpha, revoked=True)]))
    assert auth.admitted(alpha) is None


def test_errors_never_carry_key_material(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    auth = Authenticator(allowlist, SERVER_ID)
    key = sites["alpha"]
    public = public_key_bytes(key)
    nonce = auth.challenge(public)
    signature = sites["beta"].sign(join_transcript(SERVER_ID, nonce, public))
    with pytest.raises(AuthError) as info:
        auth.verify(public, nonce, signature)
    message = str(info.value)
    for secret in (public, nonce, signature):
        assert secret.hex() not in message
        assert base64.b64encode(secret).decode() not in message
    assert fingerprint(public) in message


def test_concurrent_verify_accepts_each_nonce_once(
    allowlist: Allowlist, sites: dict[str, Ed25519PrivateKey]
) -> None:
    import threading

    key = sites["alpha"]
    public = public_key_bytes(key)
    auth = Authenticator(allowlist, SERVER_ID)
    answers = [
        (n, sign_challenge(key, SERVER_ID, n)) for n in (auth.challenge(public) for _ in range(200))
    ]
    accepted: list[bytes] = []
    lock = threading.Lock()

    def worker() -> None:
        for nonce, signature in answers:
            try:
                auth.verify(public, nonce, signature)
            except AuthError:
                continue
            with lock:
                accepted.append(nonce)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(accepted) == sorted(n for n, _ in answers)
    assert auth.outstanding == 0


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        Authenticator(Allowlist(), "")
    with pytest.raises(ConfigError):
        Authenticator(Allowlist(), SERVER_ID, nonce_ttl_s=0)


_HYP_KEY = generate_site_key()
_HYP_ALLOWLIST = Allowlist([SiteEntry("hyp", public_key_bytes(_HYP_KEY))])


@settings(max_examples=200, deadline=None)
@given(
    nonce=st.binary(min_size=0, max_size=40),
    signature=st.binary(min_size=0, max_size=70),
    public_key=st.one_of(st.just(public_key_bytes(_HYP_KEY)), st.binary(max_size=40)),
    answer_real_nonce=st.booleans(),
)
def test_random_answers_never_verify(
    nonce: bytes, signature: bytes, public_key: bytes, answer_real_nonce: bool
) -> None:
    auth = Authenticator(_HYP_ALLOWLIST, SERVER_ID)
    real = auth.challenge(public_key_bytes(_HYP_KEY))
    with pytest.raises(AuthError):
        auth.verify(public_key, real if answer_real_nonce else nonce, signature)


@settings(max_examples=100, deadline=None)
@given(public_key=st.binary(max_size=64))
def test_random_keys_never_get_a_challenge(public_key: bytes) -> None:
    auth = Authenticator(_HYP_ALLOWLIST, SERVER_ID)
    if public_key == public_key_bytes(_HYP_KEY):  # pragma: no cover - 2**-256
        return
    with pytest.raises(AuthError):
        auth.challenge(public_key)


def test_auth_error_is_a_fedlearn_error() -> None:
    assert issubclass(AuthError, FedlearnError)


# ---------------------------------------------------------------------------------------------
# commands


def test_cli_certs_dev(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    result = runner.invoke(
        certs_app, ["dev", "--out", str(out), "--host", "localhost", "--host", "127.0.0.1"]
    )
    assert result.exit_code == 0, result.output
    assert "sha256:" in result.output
    assert "PRIVATE KEY" not in result.output
    assert _mode(out / "server.key") == 0o600
    cert = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((out / "ca.pem").read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]

    again = runner.invoke(certs_app, ["dev", "--out", str(out)])
    assert again.exit_code == 2 and "refusing to overwrite" in again.output
    forced = runner.invoke(certs_app, ["dev", "--out", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    bad = runner.invoke(certs_app, ["dev", "--out", str(tmp_path / "x"), "--host", "bad host"])
    assert bad.exit_code == 2 and "invalid hostname" in bad.output


def test_cli_keys_generate_show_and_allowlist(tmp_path: Path) -> None:
    key_path = tmp_path / "site.key"
    result = runner.invoke(keys_app, ["generate", "--out", str(key_path), "--name", "site-1"])
    assert result.exit_code == 0, result.output
    assert "PRIVATE KEY" not in result.output
    assert _mode(key_path) == 0o600
    public = public_key_bytes(load_private_key(key_path))
    assert encode_public_key(public) in result.output
    assert fingerprint(public) in result.output

    # The printed entry pastes into a valid allowlist.
    entry_text = result.output[result.output.index("[[site]]") :]
    allow_path = tmp_path / "allow.toml"
    allow_path.write_text(entry_text)
    allowlist = load_allowlist(allow_path)
    assert allowlist.lookup(public) == SiteEntry("site-1", public)
    assert tomllib.loads(entry_text)["site"][0]["revoked"] is False

    shown = runner.invoke(keys_app, ["show", str(key_path), "--name", "site-1"])
    assert shown.exit_code == 0, shown.output
    assert fingerprint(public) in shown.output and encode_public_key(public) in shown.output
    assert shown.output[shown.output.index("[[site]]") :] == entry_text

    listed = runner.invoke(keys_app, ["allowlist", str(allow_path)])
    assert listed.exit_code == 0, listed.output
    assert f"site-1  {fingerprint(public)}  active" in listed.output

    again = runner.invoke(keys_app, ["generate", "--out", str(key_path), "--name", "site-1"])
    assert again.exit_code == 2 and "already exists" in again.output
    assert public_key_bytes(load_private_key(key_path)) == public


def test_cli_keys_errors(tmp_path: Path) -> None:
    missing = runner.invoke(keys_app, ["show", str(tmp_path / "none.key")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    bad_name = runner.invoke(
        keys_app, ["generate", "--out", str(tmp_path / "k.key"), "--name", "no spaces"]
    )
    assert bad_name.exit_code == 2 and "invalid site name" in bad_name.output
    assert not (tmp_path / "k.key").exists()
    bad_list = tmp_path / "bad.toml"
    bad_list.write_text('[[site]]\nname = "x"\n')
    listed = runner.invoke(keys_app, ["allowlist", str(bad_list)])
    assert listed.exit_code == 2 and "site #1 ('x'): missing public_key" in listed.output


def test_key_file_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        path = save_private_key(tmp_path / "strict.key", generate_site_key())
    finally:
        os.umask(old)
    assert _mode(path) == 0o600
