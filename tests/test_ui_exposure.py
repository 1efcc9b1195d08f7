"""The live page beyond loopback: TLS only, over the coordinator's certificate, and with
``client_ca`` only to clients that present a certificate it signed (as sites must)."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from fedlearn.config.deployment import ServerSection
from fedlearn.config.loading import validate
from fedlearn.errors import ConfigError
from fedlearn.security.certs import write_dev_pki, write_site_cert

pytest.importorskip("uvicorn")


def test_a_page_beyond_loopback_without_tls_is_a_config_error(tmp_path: Path) -> None:
    raw = {"insecure": True, "ui_port": 8050, "ui_address": "0.0.0.0"}
    with pytest.raises(ConfigError, match=r"ui_address '0\.0\.0\.0' is beyond loopback"):
        validate(ServerSection, raw, "coordinator.toml")
    # loopback addresses stay plain HTTP, with or without TLS on the gRPC port
    for address in ("127.0.0.1", "::1", "localhost"):
        section = validate(ServerSection, {**raw, "ui_address": address})
        assert section.ui_address == address

    from fedlearn.ui.page import start_live_page

    with pytest.raises(ConfigError, match="not a loopback address"):
        start_live_page(tmp_path, None, host="10.1.2.3")


def test_an_exposed_page_uses_the_coordinators_certificate(tmp_path: Path) -> None:
    from fedlearn.deploy.server import page_exposure

    pki = write_dev_pki(tmp_path / "pki", ["127.0.0.1"], keep_ca_key=True)
    section = validate(
        ServerSection,
        {
            "cert": str(pki.server_cert),
            "key": str(pki.server_key),
            "client_ca": str(pki.ca_cert),
            "ui_port": 8050,
            "ui_address": "0.0.0.0",
        },
    )
    exposure = page_exposure(section)
    assert exposure["host"] == "0.0.0.0" and exposure["port"] == 8050
    tls = exposure["tls"]
    assert (tls.cert, tls.key, tls.client_ca) == (pki.server_cert, pki.server_key, pki.ca_cert)
    # on loopback (the default) the page stays plain HTTP
    loopback = page_exposure(section.model_copy(update={"ui_address": None}))
    assert loopback == {"host": "127.0.0.1", "port": 8050}


def test_an_exposed_page_answers_over_tls_and_refuses_clients_without_a_certificate(
    tmp_path: Path,
) -> None:
    from fedlearn.ui.page import PageTls, start_live_page

    pki = write_dev_pki(tmp_path / "pki", ["127.0.0.1"], keep_ca_key=True)
    site = write_site_cert(tmp_path / "pki", "browser", tmp_path / "pki")
    write_dev_pki(tmp_path / "other", ["127.0.0.1"], keep_ca_key=True)  # another CA
    foreign = write_site_cert(tmp_path / "other", "intruder", tmp_path / "other")

    # TLS without client_ca: anyone who trusts the CA reads the page; plain HTTP fails
    with start_live_page(tmp_path, None, tls=PageTls(pki.server_cert, pki.server_key)) as page:
        assert page.url.startswith("https://127.0.0.1:")
        trust = ssl.create_default_context(cafile=str(pki.ca_cert))
        got = httpx.get(page.url + "api/snapshot", verify=trust, timeout=10)
        assert got.status_code == 200 and got.json()["live"] is False
        with pytest.raises(httpx.HTTPError):
            httpx.get(page.url.replace("https", "http") + "api/snapshot", timeout=5)

    # with client_ca: only a certificate the CA signed gets in
    tls = PageTls(pki.server_cert, pki.server_key, pki.ca_cert)
    with start_live_page(tmp_path, None, tls=tls) as page:

        def client(cert: tuple[Path, Path] | None) -> ssl.SSLContext:
            context = ssl.create_default_context(cafile=str(pki.ca_cert))
            if cert is not None:
                context.load_cert_chain(str(cert[0]), str(cert[1]))
            return context

        ok = httpx.get(page.url, verify=client((site.cert, site.key)), timeout=10)
        assert ok.status_code == 200 and "<html" in ok.text.lower()
        for refused in (None, (foreign.cert, foreign.key)):
            with pytest.raises((httpx.HTTPError, ssl.SSLError)):
                httpx.get(page.url + "api/snapshot", verify=client(refused), timeout=10)
