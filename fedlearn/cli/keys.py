"""``fedlearn certs ...`` and ``fedlearn keys ...``: development PKI and site keys.

Register both on the main app with ``app.add_typer(certs_app, name="certs")`` and
``app.add_typer(keys_app, name="keys")``. No command ever prints private key material.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from fedlearn.errors import FedlearnError

certs_app = typer.Typer(
    help="TLS certificates for a deployment: the coordinator's, and sites' for mutual TLS.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
keys_app = typer.Typer(
    help="Ed25519 site keys and allowlist entries.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@certs_app.callback()
def _certs() -> None:
    """TLS certificates for a deployment: the coordinator's, and sites' for mutual TLS."""


@keys_app.callback()
def _keys() -> None:
    """Ed25519 site keys and allowlist entries."""


@certs_app.command("dev")
def certs_dev(
    out: Annotated[Path, typer.Option(help="directory for ca.pem, server.pem, server.key")],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="DNS name or IP address the server answers to (repeat); "
            "default localhost, 127.0.0.1, ::1",
        ),
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 365,
    force: Annotated[bool, typer.Option(help="replace existing files")] = False,
    keep_ca_key: Annotated[
        bool,
        typer.Option(
            help="also write the CA's key (ca.key, mode 0600), to issue site certificates for "
            "mutual TLS later (fedlearn certs site)"
        ),
    ] = False,
) -> None:
    """Write a development CA and a server certificate/key signed by it (key mode 0600)."""
    from fedlearn.security.certs import (
        DEFAULT_HOSTNAMES,
        cert_fingerprint,
        write_dev_pki,
    )

    hostnames = list(host) if host else list(DEFAULT_HOSTNAMES)
    try:
        paths = write_dev_pki(
            out, hostnames, valid_days=days, overwrite=force, keep_ca_key=keep_ca_key
        )
    except FedlearnError as exc:
        _fail(str(exc))
    from cryptography import x509

    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    typer.echo(f"CA certificate:     {paths.ca_cert}  ({cert_fingerprint(ca)})")
    typer.echo(f"server certificate: {paths.server_cert}  (for {', '.join(hostnames)})")
    typer.echo(f"server key:         {paths.server_key}  (mode 0600; keep it on the coordinator)")
    if paths.ca_key is not None:
        typer.echo(
            f"CA key:             {paths.ca_key}  (mode 0600; keep it off the coordinator and "
            "the sites)"
        )
        typer.echo(
            f"Give {paths.ca_cert.name} to every site; issue each site a client certificate "
            f"with: fedlearn certs site NAME --ca-dir {out}"
        )
    else:
        typer.echo(
            f"Give {paths.ca_cert.name} to every site; the CA key was not kept, so re-running "
            "this command makes a new CA."
        )


@certs_app.command("site")
def certs_site(
    name: Annotated[str, typer.Argument(help="the site's name (as in the allowlist)")],
    ca_dir: Annotated[
        Path, typer.Option(help="the dev CA: ca.pem and ca.key (certs dev --keep-ca-key)")
    ],
    out: Annotated[
        Path | None, typer.Option(help="directory for NAME-tls.pem and NAME-tls.key")
    ] = None,
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 365,
    force: Annotated[bool, typer.Option(help="replace existing files")] = False,
) -> None:
    """Issue a site a TLS client certificate from the dev CA, for a coordinator with
    mutual TLS (server.client_ca = the CA's ca.pem)."""
    from fedlearn.security.certs import write_site_cert

    try:
        paths = write_site_cert(ca_dir, name, out or ca_dir, valid_days=days, overwrite=force)
    except FedlearnError as exc:
        _fail(str(exc))
    typer.echo(f"site certificate: {paths.cert}")
    typer.echo(f"site TLS key:     {paths.key}  (mode 0600; keep it on the site)")
    typer.echo("")
    typer.echo("# in the site's site.toml:")
    typer.echo("[coordinator]")
    typer.echo(f'cert = "{paths.cert}"')
    typer.echo(f'key = "{paths.key}"')


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option(help="where to write the private key (PEM, mode 0600)")],
    name: Annotated[str, typer.Option(help="site name for the allowlist entry")],
    force: Annotated[bool, typer.Option(help="replace an existing key file")] = False,
) -> None:
    """Generate a site's Ed25519 key and print its allowlist entry."""
    from fedlearn.security.keys import (
        allowlist_entry_toml,
        check_site_name,
        encode_public_key,
        fingerprint,
        generate_site_key,
        public_key_bytes,
        save_private_key,
    )

    try:
        check_site_name(name)
        key = generate_site_key()
        save_private_key(out, key, overwrite=force)
    except FedlearnError as exc:
        _fail(str(exc))
    public = public_key_bytes(key)
    typer.echo(f"private key: {out} (mode 0600; keep it on the site)")
    typer.echo(f"public key:  {encode_public_key(public)}")
    typer.echo(f"fingerprint: {fingerprint(public)}")
    typer.echo("")
    typer.echo("# add to the coordinator's allowlist:")
    typer.echo(allowlist_entry_toml(name, public), nl=False)


@keys_app.command("show")
def keys_show(
    key_file: Annotated[Path, typer.Argument(help="a private key written by keys generate")],
    name: Annotated[
        str | None, typer.Option(help="also print an allowlist entry with this site name")
    ] = None,
) -> None:
    """Print the public key and fingerprint of a site key (never the private key)."""
    from fedlearn.security.keys import (
        allowlist_entry_toml,
        check_site_name,
        encode_public_key,
        fingerprint,
        load_private_key,
        public_key_bytes,
    )

    try:
        if name is not None:
            check_site_name(name)
        public = public_key_bytes(load_private_key(key_file))
    except FedlearnError as exc:
        _fail(str(exc))
    typer.echo(f"public key:  {encode_public_key(public)}")
    typer.echo(f"fingerprint: {fingerprint(public)}")
    if name is not None:
        typer.echo("")
        typer.echo(allowlist_entry_toml(name, public), nl=False)


@keys_app.command("allowlist")
def keys_allowlist(
    path: Annotated[Path, typer.Argument(help="allowlist TOML file to validate")],
) -> None:
    """Validate an allowlist file and list its sites by fingerprint."""
    from fedlearn.security.keys import load_allowlist

    try:
        allowlist = load_allowlist(path)
    except FedlearnError as exc:
        _fail(str(exc))
    for entry in allowlist:
        status = "revoked" if entry.revoked else "active"
        typer.echo(f"{entry.name}  {entry.fingerprint}  {status}")
    active = sum(not e.revoked for e in allowlist)
    typer.echo(f"{len(allowlist)} sites, {active} active")


@keys_app.command("enroll")
def keys_enroll(
    name: Annotated[str, typer.Argument(help="the new site's name")],
    allowlist: Annotated[Path, typer.Option(help="the coordinator's allowlist file")],
    key: Annotated[
        Path | None, typer.Option(help="the site's private key file (keys generate)")
    ] = None,
    public_key: Annotated[
        str | None, typer.Option(help="or the site's public key (base64, as keys show prints)")
    ] = None,
) -> None:
    """Add a site to the allowlist (atomically, keeping the rest of the file). A running
    coordinator admits it at once, with the next client id."""
    from fedlearn.security.keys import (
        decode_public_key,
        enroll_site,
        load_private_key,
        public_key_bytes,
    )

    if (key is None) == (public_key is None):
        _fail("give the site's key: --key FILE or --public-key BASE64")
    try:
        if key is not None:
            raw = public_key_bytes(load_private_key(key))
        else:
            assert public_key is not None
            try:
                raw = decode_public_key(public_key)
            except ValueError as exc:
                _fail(f"--public-key: {exc}")
        entry = enroll_site(allowlist, name, raw)
    except FedlearnError as exc:
        _fail(str(exc))
    typer.echo(f"enrolled {entry.name} ({entry.fingerprint}) in {allowlist}")


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="the site to revoke")],
    allowlist: Annotated[Path, typer.Option(help="the coordinator's allowlist file")],
) -> None:
    """Set ``revoked = true`` on a site in the allowlist (atomically, keeping the rest of
    the file). A running coordinator ends the site's stream within a second or two and
    refuses its key from then on."""
    from fedlearn.security.keys import set_revoked

    try:
        before = set_revoked(allowlist, name)
    except FedlearnError as exc:
        _fail(str(exc))
    if before.revoked:
        typer.echo(f"{name} ({before.fingerprint}) was already revoked in {allowlist}")
    else:
        typer.echo(f"revoked {name} ({before.fingerprint}) in {allowlist}")
