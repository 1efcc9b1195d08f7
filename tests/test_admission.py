"""Admission against hostile peers: the holes of issue 10 that concern who may join.

Each test names the hole it closes. Real parts throughout: a coordinator on loopback
(``run_coordinator`` in a thread, TLS with the harness's dev PKI), SiteClients in
threads or ``fedlearn client`` processes, raw gRPC streams for what a hostile peer sends.
"""

from __future__ import annotations

import datetime
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from deployment import (
    FAULT_APP,
    FAULT_PARAMS,
    Deployment,
    RawStream,
    Running,
    hello,
    in_process_coordinator,
    join,
    proof,
    reader_threads,
    sign,
    site_key,
)
from fedlearn.cli.keys import certs_app, keys_app
from fedlearn.config.deployment import CoordinatorConfig, SiteConfig
from fedlearn.config.loading import load_toml
from fedlearn.deploy.admission import JoinGate, JoinLimits, peer_address
from fedlearn.deploy.enrollment import Enrollment
from fedlearn.deploy.launch import build_site
from fedlearn.deploy.site import FATAL, SiteClient
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import RunStore
from fedlearn.errors import ConfigError, FedlearnError
from fedlearn.security.auth import Authenticator
from fedlearn.security.certs import load_server_pem, write_dev_pki, write_site_cert
from fedlearn.security.keys import (
    allowlist_entry_toml,
    encode_public_key,
    generate_site_key,
    load_allowlist,
    load_private_key,
    public_key_bytes,
    save_private_key,
)
from fedlearn.wire import PROTOCOL_VERSION
from fedlearn.wire import fedlearn_pb2 as pb
from run_state import committed_round


def fault_deployment(root: Path, **settings: Any) -> Deployment:
    settings.setdefault("app", FAULT_APP)
    settings.setdefault("params", dict(FAULT_PARAMS))
    return Deployment(root, **settings)


class Hooks:
    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        pass

    def reply_received(self, record: ClientRecord) -> None:
        pass

    def round_finished(self, record: RoundRecord) -> None:
        pass


@dataclass
class SiteRun:
    """A SiteClient running in a thread; how and when it ended."""

    site: SiteClient
    thread: threading.Thread
    stop: threading.Event
    error: BaseException | None = None
    ended_at: float | None = None

    def wait(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the site did not stop"


def run_site(site: SiteClient) -> SiteRun:
    stop = threading.Event()
    run = SiteRun(site, threading.Thread(), stop)

    def target() -> None:
        try:
            site.run(stop)
        except BaseException as exc:
            run.error = exc
        finally:
            run.ended_at = time.monotonic()

    run.thread = threading.Thread(target=target, daemon=True, name=f"site-{site.site_name}")
    run.thread.start()
    return run


def site_from(path: Path, **overrides: Any) -> SiteClient:
    return build_site(load_toml(SiteConfig, path, overrides or None))


def entries(d: Deployment, *, revoked: tuple[int, ...] = (), only: range | None = None) -> str:
    indices = range(d.num_sites) if only is None else only
    return "\n".join(
        allowlist_entry_toml(f"site-{i}", public_key_bytes(site_key(d, i)), revoked=i in revoked)
        for i in indices
    )


def status_of(call: RawStream) -> tuple[grpc.StatusCode, str]:
    return call.status()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


# ------------------------------------------------------ hole: server identity is not bound


class Relay:
    """A hostile coordinator B with its own certificate: it passes a site's join through
    to coordinator A as its own, and records what A answered."""

    def __init__(self, root: Path, upstream: Running) -> None:
        self.pki = write_dev_pki(root / "relay-pki", ["localhost", "127.0.0.1"])
        self.upstream = upstream
        self.answers: list[str] = []
        handler = grpc.method_handlers_generic_handler(
            "fedlearn.v1.Coordinator",
            {
                "Connect": grpc.stream_stream_rpc_method_handler(
                    self._connect,
                    request_deserializer=pb.ClientMessage.FromString,
                    response_serializer=pb.ServerMessage.SerializeToString,
                )
            },
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers((handler,))
        creds = grpc.ssl_server_credentials(
            [(self.pki.server_key.read_bytes(), self.pki.server_cert.read_bytes())]
        )
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def _connect(
        self, requests: Iterator[pb.ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.ServerMessage]:
        with self.upstream.channel() as channel:
            upstream = RawStream(channel, timeout=10)
            upstream.send(next(requests))  # the site's Hello
            yield upstream.recv()  # A's challenge, server_id and all
            upstream.send(next(requests))  # the site's proof
            try:
                self.answers.append(upstream.recv().WhichOneof("kind") or "?")
            except grpc.RpcError as exc:
                self.answers.append(f"{exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
            upstream.cancel()
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details("relay done")

    def close(self) -> None:
        self.server.stop(0).wait()


def test_a_join_relayed_through_another_coordinator_is_refused(tmp_path: Path) -> None:
    """Hole: the site signed whatever server_id the server sent, so a coordinator B it
    joins could pass A's challenge on, and A admitted B in the site's name. The proof now
    covers the certificate the site verified, and A refuses one made at B."""
    d = fault_deployment(tmp_path, rounds=1)
    with in_process_coordinator(d) as c:
        relay = Relay(tmp_path, c)
        try:
            path = d.write_site_config(0)
            text = path.read_text().replace(f'"127.0.0.1:{d.port}"', f'"127.0.0.1:{relay.port}"')
            path.write_text(text.replace(str(d.pki.ca_cert), str(relay.pki.ca_cert)))
            run = run_site(site_from(path))
            wait_until(lambda: relay.answers, 20, "the relay saw no join")
            run.stop.set()
            run.wait(10)
        finally:
            relay.close()
        assert c.registry is not None and c.registry.get(0) is None
    assert relay.answers[0].startswith("UNAUTHENTICATED: bad signature for site 'site-0'")


def test_a_site_with_a_pinned_server_id_refuses_another_coordinator(tmp_path: Path) -> None:
    """Hole: the site config had no expected server_id. With ``server_id`` pinned, a
    coordinator calling itself anything else is refused by the site, which stops."""
    d = fault_deployment(tmp_path, rounds=1)
    with in_process_coordinator(d):
        path = d.write_site_config(0)
        path.write_text(
            path.read_text().replace(
                "[coordinator]\n", '[coordinator]\nserver_id = "hospital-net"\n'
            )
        )
        run = run_site(site_from(path))
        run.wait(20)
    assert isinstance(run.error, FedlearnError)
    assert str(run.error) == (
        f"the coordinator at 127.0.0.1:{d.port} calls itself 'fedlearn-coordinator', but this "
        "site expects 'hospital-net' (coordinator.server_id): it is another coordinator, "
        "or its server_id changed; the site did not sign anything"
    )


# ----------------------------------------------------------- hole: accepted but ignored


def test_server_ca_is_refused_instead_of_ignored(tmp_path: Path) -> None:
    d = fault_deployment(tmp_path)
    path = d.root / "coordinator.toml"
    path.write_text(path.read_text().replace("[server]\n", f'[server]\nca = "{d.pki.ca_cert}"\n'))
    with pytest.raises(ConfigError, match=r"server\.ca: unknown field; .* set server\.client_ca"):
        load_toml(CoordinatorConfig, path)


def test_site_tls_cert_and_key_are_used_not_ignored(tmp_path: Path) -> None:
    """Hole: a site's [coordinator] cert and key were accepted and never read."""
    d = fault_deployment(tmp_path)
    path = d.write_site_config(0)
    config = load_toml(
        SiteConfig,
        path,
        {
            "coordinator.cert": str(tmp_path / "missing.pem"),
            "coordinator.key": str(tmp_path / "missing.key"),
        },
    )
    with pytest.raises(ConfigError, match=r"missing\.pem does not exist"):
        build_site(config)
    with pytest.raises(ConfigError, match=r"set both coordinator\.cert and coordinator\.key"):
        load_toml(SiteConfig, path, {"coordinator.cert": str(tmp_path / "site.pem")})


# -------------------------------------------------------- hole: revocation needs a restart


def test_a_site_revoked_mid_run_is_cut_off_and_refused_on_reconnect(tmp_path: Path) -> None:
    """Hole: a site set ``revoked = true`` while the coordinator ran kept training. Now
    its stream ends within 2 s with PERMISSION_DENIED, the task it was training is that
    client's failure of the round, the run goes on with the others, and the key is refused
    when it comes back."""
    d = fault_deployment(tmp_path, rounds=4, stage_timeout_s=30, min_clients=2)
    d.write_site_config(2, sleep_round=2, sleep_s=4.0)  # busy with round 2 when revoked
    box: dict[str, Any] = {}

    class Revoke(Hooks):
        def round_finished(self, record: RoundRecord) -> None:
            if record.round == 1:  # all three take part in round 2
                box["c"].wait_joined(2)

        def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
            c: Running = box["c"]
            if (round, stage) == (2, Stage.TRAIN):
                box["session"] = c.wait_joined(2)

                def revoke() -> None:
                    time.sleep(0.5)  # site-2 is training
                    (d.root / "sites.toml").write_text(entries(d, revoked=(2,)))
                    box["revoked_at"] = time.monotonic()
                    assert c.registry is not None
                    wait_until(lambda: c.registry.get(2) is None, 10, "site-2 still connected")
                    box["closed_at"] = time.monotonic()

                box["revoker"] = threading.Thread(target=revoke)
                box["revoker"].start()
            if (round, stage) == (3, Stage.TRAIN):
                with c.channel() as channel:
                    raw = RawStream(channel)
                    raw.send(hello(site_key(d, 2)))
                    box["rejoin"] = raw.status()

    with in_process_coordinator(d, observer=Revoke()) as c:
        box["c"] = c
        runs = [run_site(site_from(d.root / f"site-{i}.toml")) for i in range(3)]
        result = c.wait(60)
        box["revoker"].join(10)
        runs[2].wait(20)
        store = c.store()
        try:
            rows = store.clients(Stage.TRAIN)
        finally:
            store.close()
    assert box["closed_at"] - box["revoked_at"] < 2.0
    assert box["session"].closed
    assert isinstance(runs[2].error, FedlearnError)
    assert "site 'site-2' was revoked" in str(runs[2].error)
    assert [r.ok for r in result.rounds] == [True] * 4
    assert [r.train_selected for r in result.rounds][1:] == [3, 2, 2]
    revoked_row = next(r for r in rows if (r.round, r.client_id) == (2, 2))
    assert not revoked_row.ok and "site 'site-2' was revoked" in (revoked_row.error or "")
    assert not [r for r in rows if r.client_id == 2 and r.round > 2]
    assert box["rejoin"] == (grpc.StatusCode.PERMISSION_DENIED, "site 'site-2' is revoked")
    for run in runs[:2]:
        run.wait(20)
        assert run.error is None


def test_a_site_enrolled_mid_run_joins_without_a_restart(tmp_path: Path) -> None:
    """Hole: the allowlist was read once, at start. A site added to the file while the
    coordinator runs now joins with the next client id and takes part in the next round;
    the ids of the sites already there do not change."""
    d = fault_deployment(tmp_path, rounds=3, min_clients=2)
    (d.root / "sites.toml").write_text(entries(d, only=range(2)))
    box: dict[str, Any] = {}

    class Enroll(Hooks):
        def round_finished(self, record: RoundRecord) -> None:
            c: Running = box["c"]
            if record.round == 3:
                box["after"] = [c.registry.get(i) for i in range(2)]  # type: ignore[union-attr]
            if record.round != 1:
                return
            box["before"] = [c.wait_joined(i) for i in range(2)]
            (d.root / "sites.toml").write_text(entries(d))
            box["run"] = run_site(site_from(d.root / "site-2.toml"))
            box["joined"] = c.wait_joined(2, timeout=10)

    with in_process_coordinator(d, observer=Enroll()) as c:
        box["c"] = c
        runs = [run_site(site_from(d.root / f"site-{i}.toml")) for i in range(2)]
        result = c.wait(60)
        store = c.store()
        try:
            rows = store.clients(Stage.TRAIN)
        finally:
            store.close()
    assert [r.ok for r in result.rounds] == [True] * 3
    assert [r.train_selected for r in result.rounds] == [2, 3, 3]
    assert box["joined"].site == "site-2" and box["joined"].client_id == 2
    assert box["after"] == box["before"]  # the same sessions: nobody was cut off or renumbered
    assert sorted((r.round, r.client_id) for r in rows if r.client_id == 2) == [(2, 2), (3, 2)]
    assert all(r.ok for r in rows)
    for run in [*runs, box["run"]]:
        run.wait(20)
        assert run.error is None


# ------------------------------------------------------------- hole: unauthenticated flood


def test_a_hello_flood_for_a_sites_key_does_not_keep_it_out(tmp_path: Path) -> None:
    """Hole: whoever knows a site's public key could evict its pending challenges (8 per
    key) and hold the coordinator's workers with unanswered Hellos. Here a flood from
    127.0.0.1 sends Hellos for site-0's key on many streams and never proves anything,
    while site-0 itself dials in over ::1: it joins within a few seconds."""
    d = fault_deployment(tmp_path, rounds=1)
    stop = threading.Event()
    sent: list[int] = []
    overrides = {"server.address": f"localhost:{d.port}"}

    def flood(channel: grpc.Channel) -> None:
        streams: list[RawStream] = []
        while not stop.is_set():
            raw = RawStream(channel, timeout=30)
            raw.send(hello(site_key(d, 0)))
            streams.append(raw)
            sent.append(1)
            time.sleep(0.002)
        for raw in streams:
            raw.cancel()

    with in_process_coordinator(d, overrides) as c, c.channel() as channel:
        flooders = [threading.Thread(target=flood, args=(channel,)) for _ in range(4)]
        for thread in flooders:
            thread.start()
        try:
            time.sleep(1.0)
            path = d.write_site_config(0)
            path.write_text(
                path.read_text().replace(
                    f'address = "127.0.0.1:{d.port}"',
                    f'address = "[::1]:{d.port}"\nserver_name = "localhost"',
                )
            )
            before = len(sent)
            started = time.monotonic()
            run = run_site(site_from(path))
            session = c.wait_joined(0, timeout=15)
            joined_after = time.monotonic() - started
            during = len(sent) - before
        finally:
            stop.set()
            for thread in flooders:
                thread.join(30)
        run.stop.set()
        run.wait(10)
    assert session.site == "site-0"
    # The flood had far more Hellos pending for the key than its 8 challenge slots before
    # the site dialed, and kept sending while it joined (counts, not rates: CI is loaded).
    assert before > 4 * 8
    assert during > 0
    assert joined_after < 5.0


def test_hellos_on_other_streams_do_not_evict_a_sites_challenge(tmp_path: Path) -> None:
    """Hole: the 9th Hello for a key evicted the oldest of its 8 pending challenges, so
    anyone could make a site's join fail. A challenge now belongs to the stream that asked
    for it: a dozen Hellos for the same key from the same address leave it valid."""
    d = fault_deployment(tmp_path, rounds=1)
    key = site_key(d, 0)
    with in_process_coordinator(d) as c, c.channel() as channel:
        victim = RawStream(channel)
        victim.send(hello(key))
        challenge = victim.recv().challenge
        others = []
        for _ in range(12):
            raw = RawStream(channel)
            raw.send(hello(key))
            others.append(raw)
        time.sleep(0.5)  # their Hellos are in
        victim.send(proof(sign(victim, key, challenge)))
        answer = victim.recv()
        for raw in others:
            raw.cancel()
        victim.cancel()
    assert answer.WhichOneof("kind") == "welcome"


# --------------------------------------- hole: a plaintext site against TLS retries forever


def test_a_site_whose_tls_setting_differs_from_its_coordinators_stops_with_a_clear_error(
    tmp_path: Path,
) -> None:
    """Hole: a plaintext site against a TLS coordinator retried forever (and so did a TLS
    site against a plaintext one). Both ``fedlearn client`` daemons now exit 2 at once,
    saying what to change."""
    tls = fault_deployment(tmp_path / "tls", rounds=1)
    plain = fault_deployment(tmp_path / "plain", rounds=1)
    try:
        with (
            in_process_coordinator(tls),
            in_process_coordinator(plain, {"server.insecure": True}),
        ):
            sites = [
                tls._spawn("client", "--config", str(tls.root / "site-0.toml"), "--insecure"),
                plain.start_site(0),
            ]
            (code, out), (plain_code, plain_out) = (
                tls.wait(sites[0], 30),
                plain.wait(sites[1], 30),
            )
    finally:
        tls.stop_all()  # a site that retries forever must not outlive the test
        plain.stop_all()
    assert code == 2, out
    assert (
        f"the coordinator at 127.0.0.1:{tls.port} speaks TLS, but this site is set to plaintext"
        in " ".join(out.split())
    ), out
    assert plain_code == 2, plain_out
    assert f"the coordinator at 127.0.0.1:{plain.port} does not speak TLS" in " ".join(
        plain_out.split()
    ), plain_out


def test_statuses_a_site_retries_and_those_it_stops_on() -> None:
    assert grpc.StatusCode.ABORTED not in FATAL  # a lapsed challenge: join again
    assert grpc.StatusCode.RESOURCE_EXHAUSTED not in FATAL  # too many joins: join later
    assert grpc.StatusCode.PERMISSION_DENIED in FATAL  # unknown, revoked


# ------------------------------------------------------------------------------ mutual TLS


def test_under_mutual_tls_a_site_without_a_client_certificate_is_refused_in_the_handshake(
    tmp_path: Path,
) -> None:
    d = fault_deployment(tmp_path, rounds=1, mtls=True)
    write_dev_pki(tmp_path / "other-ca", ["localhost"], keep_ca_key=True)
    foreign = write_site_cert(tmp_path / "other-ca", "site-0", tmp_path / "other-ca")
    with in_process_coordinator(d) as c:
        # A raw client without a certificate: the TLS layer ends it, the servicer never
        # sees a stream (no join in progress, nothing refused by the join logic).
        creds = grpc.ssl_channel_credentials(root_certificates=d.pki.ca_cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{d.port}", creds) as channel:
            raw = RawStream(channel, timeout=5)
            raw.send(hello(site_key(d, 0)))
            code, _ = raw.status()
        assert code == grpc.StatusCode.UNAVAILABLE
        assert c.servicer is not None
        assert (c.servicer.rejected, c.servicer.gate.joining) == (0, 0)
        # SiteClients without a certificate, and with one from another CA, stop at once
        runs = {}
        for what, overrides in {
            "none": {},
            "foreign": {"coordinator.cert": str(foreign.cert), "coordinator.key": str(foreign.key)},
        }.items():
            path = d.write_site_config(0)
            text = path.read_text()
            path.write_text("\n".join(ln for ln in text.splitlines() if "-tls." not in ln))
            runs[what] = run_site(site_from(path, **overrides))
        for run in runs.values():
            run.wait(20)
        assert (c.servicer.rejected, c.servicer.gate.joining) == (0, 0)
    expected = (
        f"the coordinator at 127.0.0.1:{d.port} closed the connection right after the TLS "
        "handshake: it requires a client certificate it accepts (mutual TLS), and this site "
        "presented {}; set coordinator.cert and coordinator.key"
    )
    assert str(runs["none"].error).startswith(expected.format("none"))
    assert str(runs["foreign"].error).startswith(expected.format(foreign.cert))


# ------------------------------------------------------------------------------- commands


runner = CliRunner()


def test_keys_enroll_and_revoke_edit_the_allowlist_in_place(tmp_path: Path) -> None:
    allowlist = tmp_path / "sites.toml"
    keys = []
    for name in ("alpha", "beta"):
        key = tmp_path / f"{name}.key"
        save_private_key(key, generate_site_key())
        keys.append(key)
    assert (
        runner.invoke(
            keys_app, ["enroll", "alpha", "--allowlist", str(allowlist), "--key", str(keys[0])]
        ).exit_code
        == 0
    )
    text = allowlist.read_text().replace("[[site]]\n", "[[site]]  # the first one\n")
    allowlist.write_text("# sites of the federation\n" + text)
    public = encode_public_key(public_key_bytes(load_private_key(keys[1])))
    result = runner.invoke(
        keys_app, ["enroll", "beta", "--allowlist", str(allowlist), "--public-key", public]
    )
    assert result.exit_code == 0, result.output
    assert "enrolled beta (ed25519:" in result.output
    again = runner.invoke(
        keys_app, ["enroll", "gamma", "--allowlist", str(allowlist), "--key", str(keys[0])]
    )
    assert again.exit_code == 2 and "is already enrolled as 'alpha'" in again.output
    before = allowlist.read_text()
    result = runner.invoke(keys_app, ["revoke", "beta", "--allowlist", str(allowlist)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("revoked beta (ed25519:")
    after = allowlist.read_text()
    assert after.startswith("# sites of the federation\n[[site]]  # the first one\n")
    assert after == before.replace(
        'public_key = "' + public + '"\nrevoked = false',
        'public_key = "' + public + '"\nrevoked = true',
    )
    assert [(e.name, e.revoked) for e in load_allowlist(allowlist)] == [
        ("alpha", False),
        ("beta", True),
    ]
    result = runner.invoke(keys_app, ["revoke", "beta", "--allowlist", str(allowlist)])
    assert result.exit_code == 0 and "already revoked" in result.output
    result = runner.invoke(keys_app, ["revoke", "delta", "--allowlist", str(allowlist)])
    assert result.exit_code == 2
    assert "site 'delta' is not in" in result.output and "(sites: alpha, beta)" in result.output


def test_certs_site_issues_a_client_certificate_from_the_dev_ca(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert runner.invoke(certs_app, ["dev", "--out", str(pki)]).exit_code == 0
    refused = runner.invoke(certs_app, ["site", "site-0", "--ca-dir", str(pki)])
    assert refused.exit_code == 2 and "fedlearn certs dev --keep-ca-key" in refused.output
    result = runner.invoke(certs_app, ["dev", "--out", str(pki), "--force", "--keep-ca-key"])
    assert result.exit_code == 0, result.output
    assert (pki / "ca.key").stat().st_mode & 0o777 == 0o600
    result = runner.invoke(
        certs_app, ["site", "site-0", "--ca-dir", str(pki), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "PRIVATE KEY" not in result.output
    cert = x509.load_pem_x509_certificate((tmp_path / "site-0-tls.pem").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()))
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "site-0"
    assert (tmp_path / "site-0-tls.key").stat().st_mode & 0o777 == 0o600
    load_server_pem(tmp_path / "site-0-tls.pem", tmp_path / "site-0-tls.key")  # a pair


# ----------------------------------------------------------- RELIABILITY.md figure (e)


def test_admission_table(tmp_path: Path) -> None:
    """The small version of ``benchmarks/reliability/admission.py`` (the same cases):
    each case refused by the right party, with its status and message."""
    from benchmarks.reliability.admission import measure, table

    rows = {row.case: row for row in measure(tmp_path)}
    print(table(list(rows.values())))
    bad_signature = "bad signature for site 'site-0' (ed25519:"
    expected = {
        "unknown key": ("coordinator", "PERMISSION_DENIED", "unknown site key ed25519:"),
        "replayed proof": ("coordinator", "UNAUTHENTICATED", bad_signature),
        "older protocol version": (
            "coordinator",
            "FAILED_PRECONDITION",
            f"protocol version {PROTOCOL_VERSION - 1} is not supported; this coordinator "
            f"speaks version {PROTOCOL_VERSION}",
        ),
        "expired challenge (no proof in time)": (
            "coordinator",
            "DEADLINE_EXCEEDED",
            "no proof within the 1.5 s join deadline",
        ),
        "proof for another coordinator (relayed by it)": (
            "coordinator",
            "UNAUTHENTICATED",
            bad_signature,
        ),
        "coordinator with another server_id than the pinned one": (
            "site",
            "ConfigError",
            "the coordinator at 127.0.0.1:",
        ),
        "plaintext site against TLS": ("site", "ConfigError", "the coordinator at 127.0.0.1:"),
        "site revoked while connected": (
            "coordinator",
            "PERMISSION_DENIED",
            "site 'site-2' was revoked",
        ),
        "revoked key joins again": ("coordinator", "PERMISSION_DENIED", "site 'site-2' is revoked"),
        "TLS site against plaintext": ("site", "ConfigError", "the coordinator at 127.0.0.1:"),
        "no client certificate under mutual TLS (raw gRPC)": (
            "TLS handshake",
            "UNAVAILABLE",
            "failed to connect",
        ),
        "no client certificate under mutual TLS (site)": (
            "site",
            "ConfigError",
            "the coordinator at 127.0.0.1:",
        ),
    }
    flood = next(case for case in rows if case.startswith("Hello flood"))
    assert set(rows) == {*expected, flood}
    for case, (by, code, message) in expected.items():
        row = rows[case]
        assert (row.refused_by, row.code) == (by, code), row
        assert row.message.startswith(message), row
    assert (
        "calls itself 'fedlearn-coordinator', but this site expects"
        in rows["coordinator with another server_id than the pinned one"].message
    )
    assert (
        "speaks TLS, but this site is set to plaintext"
        in rows["plaintext site against TLS"].message
    )
    assert "does not speak TLS" in rows["TLS site against plaintext"].message
    assert (
        "requires a client certificate"
        in rows["no client certificate under mutual TLS (site)"].message
    )
    assert rows["no client certificate under mutual TLS (raw gRPC)"].message.endswith(
        "(streams the coordinator saw: 0)"
    )
    assert rows["site revoked while connected"].seconds < 4.0
    assert rows[flood].code == "RESOURCE_EXHAUSTED" and rows[flood].seconds < 4.0
    for row in rows.values():  # a refusal is prompt: no retrying until something gives up
        assert row.seconds < 5.0, row


# --------------------------------------------------------------- the live allowlist itself


def _allowlist_file(path: Path, sites: dict[str, bytes], revoked: tuple[str, ...] = ()) -> None:
    path.write_text(
        "\n".join(allowlist_entry_toml(n, k, revoked=n in revoked) for n, k in sites.items())
    )


def test_client_ids_follow_names_and_survive_edits_and_restarts(tmp_path: Path) -> None:
    keys = {n: public_key_bytes(generate_site_key()) for n in ("a", "b", "c", "d")}
    path, ids_file = tmp_path / "sites.toml", tmp_path / "state" / "client_ids.json"
    _allowlist_file(path, {n: keys[n] for n in ("a", "b", "c")})
    auth = Authenticator(load_allowlist(path), "coordinator")
    enrollment = Enrollment(auth, path, ids_file=ids_file)
    revoked: list[tuple[str, int, str]] = []
    enrollment.on_revoke = lambda *args: revoked.append(args)
    assert [enrollment.client_id(n) for n in "abc"] == [0, 1, 2]  # the file's order
    assert list(enrollment.ids) == [0, 1, 2]

    # b removed, d added in its place, c revoked: nobody's id moves, d gets the next one
    _allowlist_file(path, {n: keys[n] for n in ("a", "d", "c")}, revoked=("c",))
    change = enrollment.reload()
    assert change is not None and change.enrolled == ("d",)
    assert [enrollment.client_id(n) for n in "abcd"] == [0, 1, 2, 3]
    assert list(enrollment.ids) == [0, 3] and len(enrollment.ids) == 2 and 3 in enrollment.ids
    assert sorted(revoked) == [
        ("b", 1, "site 'b' was removed from the allowlist"),
        ("c", 2, "site 'c' was revoked"),
    ]
    assert auth.admitted(keys["c"]) is None and auth.admitted(keys["d"]) is not None
    assert enrollment.reload() is None  # unchanged

    # half an edit: ignored, the last good allowlist stays in force
    path.write_text(path.read_text() + "\n[[site]]\nname = ")
    assert enrollment.reload() is None
    assert auth.admitted(keys["d"]) is not None

    # a key replaced: the old key is out (its session ends), the name keeps its id
    new_a = public_key_bytes(generate_site_key())
    _allowlist_file(path, {"a": new_a, "d": keys["d"], "b": keys["b"]})
    revoked.clear()
    enrollment.reload()
    assert revoked == [("a", 0, "site 'a' was given a new key; its old key was revoked")]
    assert enrollment.client_id("b") == 1  # b is back with its own id
    assert auth.admitted(new_a) is not None and auth.admitted(keys["a"]) is None

    # a restart with the entries in another order keeps every id (client_ids.json)
    _allowlist_file(path, {"d": keys["d"], "c": keys["c"], "b": keys["b"], "a": new_a})
    again = Enrollment(Authenticator(load_allowlist(path), "coordinator"), path, ids_file=ids_file)
    assert [again.client_id(n) for n in "abcd"] == [0, 1, 2, 3]
    ids_file.write_text('{"version": 1, "sites": {"a": 0, "b": 0}}')
    with pytest.raises(ConfigError, match=r"client_ids\.json .* cannot be read"):
        Enrollment(Authenticator(load_allowlist(path), "coordinator"), path, ids_file=ids_file)


def test_join_gate_limits_each_address_and_all_of_them() -> None:
    now = [0.0]
    gate = JoinGate(JoinLimits(per_peer=3, total=5, rate_per_s=2.0, burst=4), lambda: now[0])
    assert [gate.enter("10.0.0.1") for _ in range(3)] == [None, None, None]
    assert (
        gate.enter("10.0.0.1") == "3 joins from 10.0.0.1 are already in progress; try again later"
    )
    gate.leave("10.0.0.1")
    assert gate.enter("10.0.0.1") is None  # the 4th token of the burst
    gate.leave("10.0.0.1")
    assert gate.enter("10.0.0.1") == (
        "joins from 10.0.0.1 arrive faster than 2 a second; try again later"
    )
    now[0] += 0.5  # one token back
    assert gate.enter("10.0.0.1") is None
    assert [gate.enter("10.0.0.2") for _ in range(3)] == [
        None,
        None,
        "5 joins are already in progress; try again later",
    ]
    assert gate.joining == 5 and gate.refused == 3
    assert peer_address("ipv4:127.0.0.1:5123") == "127.0.0.1"
    assert peer_address("ipv6:[::1]:5123") == "::1"
    assert peer_address("ipv6:%5B2001:db8::5%5D:443") == "2001:db8::/64"
    assert peer_address("unix:/run/x.sock") == "unix:/run/x.sock"


def test_a_revoked_stream_that_sends_garbage_leaves_nothing_behind(tmp_path: Path) -> None:
    """The status of a revoked stream is sent while its reader may still be waiting for
    a message; bytes that do not parse arriving then must not leave the call pending
    (it would hold up the coordinator's shutdown) or a reader thread behind."""
    d = fault_deployment(tmp_path, rounds=1)
    threads_before = reader_threads()
    with in_process_coordinator(d) as c, c.channel() as channel:
        streams = []
        for i in range(3):
            raw = RawStream(channel)
            join(raw, site_key(d, i))
            streams.append(raw)
        for i in (1, 2):
            c.wait_joined(i)

        def chatter(raw: RawStream) -> None:  # reads keep arriving around the revocation
            heartbeat = pb.ClientMessage(heartbeat=pb.Heartbeat())
            for _ in range(400):
                raw.send(heartbeat)
                time.sleep(0.0025)
            raw.send(*[b"\xff\xff\xff\xff not a message"] * 20)

        chatters = [threading.Thread(target=chatter, args=(raw,)) for raw in streams]
        for thread in chatters:
            thread.start()
        time.sleep(0.1)
        (d.root / "sites.toml").write_text(entries(d, revoked=(0, 1, 2)))
        statuses = [raw.status(half_close=False) for raw in streams]
        for thread in chatters:
            thread.join(10)
        for raw in streams:
            raw.close()
        stopped = time.monotonic()
    assert time.monotonic() - stopped < 10  # the coordinator shut down promptly
    assert statuses == [
        (grpc.StatusCode.PERMISSION_DENIED, f"site 'site-{i}' was revoked") for i in range(3)
    ]
    wait_until(lambda: reader_threads() == threads_before, 10, "a reader thread is left")


def test_fedlearn_keys_revoke_and_sighup_cut_a_site_off_a_running_coordinator(
    tmp_path: Path,
) -> None:
    """Processes, as an operator runs them: ``fedlearn server`` that polls its allowlist
    only once an hour, three ``fedlearn client`` daemons, then ``fedlearn keys revoke`` and
    SIGHUP. site-2 (training round 2) is cut off within 2 s, its round-2 task fails with
    the reason, the run finishes with the other two, and site-2's daemon stops (exit 2)."""
    d = fault_deployment(tmp_path, rounds=2)  # both rounds wait for all three sites
    config = d.root / "coordinator.toml"
    config.write_text(
        config.read_text().replace("[server]\n", "[server]\nallowlist_poll_s = 3600\n")
    )
    d.write_site_config(2, sleep_round=2, sleep_s=2.5)
    try:
        coordinator = d.start_coordinator()
        sites = [d.start_site(i) for i in range(3)]
        deadline = time.monotonic() + 60
        while committed_round(d.state_dir / "run.db", "run") < 1:
            assert time.monotonic() < deadline, "round 1 was not committed"
            time.sleep(0.05)
        time.sleep(0.5)  # site-2 is training round 2
        result = runner.invoke(
            keys_app, ["revoke", "site-2", "--allowlist", str(d.root / "sites.toml")]
        )
        assert result.exit_code == 0, result.output
        hangup = datetime.datetime.now()
        coordinator.send_signal(signal.SIGHUP)
        code, out = d.wait(coordinator, 60)
        site_results = [d.wait(site, 30) for site in sites]
    finally:
        d.stop_all()
    assert code == 0, out
    assert site_results[0][0] == site_results[1][0] == 0
    assert site_results[2][0] == 2, site_results[2][1]
    assert "the coordinator ended this site's session: site 'site-2' was revoked" in " ".join(
        site_results[2][1].split()
    )
    line = next(ln for ln in out.splitlines() if "stream ended: site 'site-2' was revoked" in ln)
    ended = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    assert (ended - hangup).total_seconds() < 10.0, line  # the poll is an hour away
    store = RunStore(d.state_dir / "run.db", run_id="run", read_only=True)
    try:
        rounds, rows = store.rounds(), store.clients(Stage.TRAIN)
    finally:
        store.close()
    assert [(r.ok, r.train_selected, r.train_ok) for r in rounds] == [(True, 3, 3), (True, 3, 2)]
    row = next(r for r in rows if (r.round, r.client_id) == (2, 2))
    assert not row.ok and row.error == "site 'site-2' was revoked"


def test_a_site_whose_coordinator_is_down_keeps_retrying(tmp_path: Path) -> None:
    """Only a coordinator that answers in a way that cannot work stops a site: one that
    does not answer at all (down, restarting) is retried, over TLS and plaintext alike."""
    d = fault_deployment(tmp_path)  # its coordinator is never started
    runs = [
        run_site(site_from(d.root / "site-0.toml")),
        run_site(site_from(d.root / "site-1.toml", **{"coordinator.insecure": True})),
    ]
    time.sleep(2.0)
    assert [run.thread.is_alive() for run in runs] == [True, True]
    for run in runs:
        run.stop.set()
        run.wait(10)
        assert run.error is None
