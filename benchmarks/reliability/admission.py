"""RELIABILITY.md figure (e): who is refused admission, with which status, how fast.

Real parts on loopback: ``run_coordinator`` (in threads of this process) over TLS with the
test harness's dev PKI (``tests/deployment.py``), a plaintext one and one with mutual TLS;
site daemons (``SiteClient``, built from site.toml files as ``fedlearn client`` builds
them) and raw gRPC streams for what a hostile peer sends; a second coordinator with its
own CA that passes a site's join on to the first (the relay). For each case the table
gives who refuses (the coordinator's status to the peer, or the site itself), the status
code, the message, and the seconds from the attempt (or the revocation) to the refusal.

Usage (from the repo root)::

    .venv/bin/python benchmarks/reliability/admission.py            # the table
    .venv/bin/python benchmarks/reliability/admission.py --json out.json

``tests/test_admission.py::test_admission_table`` runs :func:`measure` and checks every
row. Every coordinator and site here is stopped before the script returns.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
for entry in (str(ROOT), str(ROOT / "tests")):
    sys.path.insert(0, entry)

import grpc  # noqa: E402

from deployment import (  # noqa: E402
    FAULT_APP,
    FAULT_PARAMS,
    Deployment,
    RawStream,
    Running,
    hello,
    in_process_coordinator,
    join,
    proof,
    site_key,
)
from fedlearn.config.deployment import SiteConfig  # noqa: E402
from fedlearn.config.loading import load_toml  # noqa: E402
from fedlearn.deploy.launch import build_site  # noqa: E402
from fedlearn.security.certs import write_dev_pki  # noqa: E402
from fedlearn.security.keys import generate_site_key, set_revoked  # noqa: E402
from fedlearn.wire import PROTOCOL_VERSION  # noqa: E402
from fedlearn.wire import fedlearn_pb2 as pb  # noqa: E402

JOIN_DEADLINE_S = 1.5


@dataclass
class Row:
    """One case: who refused it, how, and how fast."""

    case: str
    refused_by: str
    """``coordinator`` (the status the peer got), ``TLS handshake``, or ``site``."""
    code: str
    message: str
    seconds: float


def _site(d: Deployment, i: int, **overrides: Any) -> Any:
    return build_site(load_toml(SiteConfig, d.root / f"site-{i}.toml", overrides or None))


def _site_outcome(site: Any, timeout: float = 30.0) -> tuple[BaseException | None, float]:
    """Run a SiteClient until it stops (or ``timeout``): what it raised, and when."""
    stop = threading.Event()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            site.run(stop)
        except BaseException as exc:
            box["error"] = exc
        box["at"] = time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        stop.set()
        thread.join(10)
        return None, time.monotonic()
    return box.get("error"), box["at"]


def _status(raw: RawStream) -> tuple[str, str]:
    code, details = raw.status()
    return code.name, details


def _timed(fn: Callable[[], tuple[str, str]]) -> tuple[str, str, float]:
    started = time.monotonic()
    code, message = fn()
    return code, message, time.monotonic() - started


class _Relay:
    """Coordinator B (its own CA and certificate): passes a site's Hello and proof on to
    coordinator A on a stream of its own, and keeps A's answer."""

    def __init__(self, root: Path, upstream: Running) -> None:
        self.pki = write_dev_pki(root / "relay-pki", ["localhost", "127.0.0.1"])
        self.upstream = upstream
        self.answers: list[tuple[str, str, float]] = []
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
            upstream.send(next(requests))
            yield upstream.recv()
            upstream.send(next(requests))
            started = time.monotonic()
            try:
                kind = upstream.recv().WhichOneof("kind") or "?"
                self.answers.append(("OK", f"admitted: {kind}", time.monotonic() - started))
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details()  # type: ignore[attr-defined]
                self.answers.append((code, details, time.monotonic() - started))
            upstream.cancel()
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details("relay done")

    def close(self) -> None:
        self.server.stop(0).wait()


def _tls_coordinator_rows(root: Path) -> list[Row]:
    d = Deployment(root, rounds=1, app=FAULT_APP, params=dict(FAULT_PARAMS))
    rows: list[Row] = []
    key = site_key(d, 0)
    with in_process_coordinator(d, handshake_timeout_s=JOIN_DEADLINE_S) as c, c.channel() as ch:

        def unknown() -> tuple[str, str]:
            raw = RawStream(ch)
            raw.send(hello(generate_site_key()))
            return _status(raw)

        rows.append(Row("unknown key", "coordinator", *_timed(unknown)))

        def replay() -> tuple[str, str]:
            first = RawStream(ch)
            _, signature = join(first, key)
            first.cancel()
            raw = RawStream(ch)
            raw.send(hello(key))
            raw.recv()
            started = time.monotonic()
            raw.send(proof(signature))
            code, message = _status(raw)
            rows.append(
                Row("replayed proof", "coordinator", code, message, time.monotonic() - started)
            )
            return code, message

        replay()

        def version() -> tuple[str, str]:
            raw = RawStream(ch)
            raw.send(hello(key, version=PROTOCOL_VERSION - 1))
            return _status(raw)

        rows.append(Row("older protocol version", "coordinator", *_timed(version)))

        def expired() -> tuple[str, str]:
            raw = RawStream(ch)
            raw.send(hello(key))
            raw.recv()  # the challenge, never answered
            code, details = raw.status(half_close=False)
            return code.name, details

        code, message, seconds = _timed(expired)
        rows.append(
            Row("expired challenge (no proof in time)", "coordinator", code, message, seconds)
        )

        relay = _Relay(root, c)
        try:
            path = d.write_site_config(0)
            text = path.read_text().replace(f'"127.0.0.1:{d.port}"', f'"127.0.0.1:{relay.port}"')
            relayed = root / "relayed-site-0.toml"
            relayed.write_text(text.replace(str(d.pki.ca_cert), str(relay.pki.ca_cert)))
            site = build_site(load_toml(SiteConfig, relayed))
            stop = threading.Event()
            thread = threading.Thread(target=site.run, args=(stop,), daemon=True)
            thread.start()
            deadline = time.monotonic() + 20
            while not relay.answers and time.monotonic() < deadline:
                time.sleep(0.01)
            stop.set()
            thread.join(10)
        finally:
            relay.close()
        rows.append(
            Row("proof for another coordinator (relayed by it)", "coordinator", *relay.answers[0])
        )

        started = time.monotonic()
        error, at = _site_outcome(_site(d, 0, **{"coordinator.server_id": "hospital-net"}))
        rows.append(
            Row(
                "coordinator with another server_id than the pinned one",
                "site",
                type(error).__name__,
                str(error),
                at - started,
            )
        )

        started = time.monotonic()
        error, at = _site_outcome(_site(d, 0, **{"coordinator.insecure": True}))
        rows.append(
            Row(
                "plaintext site against TLS", "site", type(error).__name__, str(error), at - started
            )
        )

        # revoked while connected: site-2 joins, then `fedlearn keys revoke` edits the file
        box: dict[str, Any] = {}
        site2 = _site(d, 2)
        thread = threading.Thread(
            target=lambda: box.update(zip(("error", "at"), _site_outcome(site2), strict=True)),
            daemon=True,
        )
        thread.start()
        c.wait_joined(2)
        revoked_at = time.monotonic()
        set_revoked(d.root / "sites.toml", "site-2")
        thread.join(30)
        error = box.get("error")
        message = str(error).removeprefix("the coordinator ended this site's session: ")
        rows.append(
            Row(
                "site revoked while connected",
                "coordinator",
                "PERMISSION_DENIED" if "was revoked" in message else type(error).__name__,
                message,
                box["at"] - revoked_at,
            )
        )

        def revoked() -> tuple[str, str]:
            raw = RawStream(ch)
            raw.send(hello(site_key(d, 2)))
            return _status(raw)

        rows.append(Row("revoked key joins again", "coordinator", *_timed(revoked)))
    return rows


def _flood_rows(root: Path, threads: int = 4, seconds: float = 1.0) -> list[Row]:
    """A Hello flood for site-0's key from 127.0.0.1 (``threads`` threads opening streams
    and never proving anything) while site-0 itself dials in over ::1."""
    d = Deployment(root, rounds=1, app=FAULT_APP, params=dict(FAULT_PARAMS))
    stop = threading.Event()
    codes: dict[str, int] = {}
    first: dict[str, str] = {}
    lock = threading.Lock()

    def flood(channel: Any) -> None:
        streams: list[RawStream] = []
        while not stop.is_set():
            raw = RawStream(channel, timeout=30)
            raw.send(hello(site_key(d, 0)))
            streams.append(raw)
            try:
                kind = raw.recv().WhichOneof("kind") or "?"
                code, details = "challenge", kind
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details()  # type: ignore[attr-defined]
            with lock:
                codes[code] = codes.get(code, 0) + 1
                first.setdefault(code, details)
        for raw in streams:
            raw.cancel()

    overrides = {"server.address": f"localhost:{d.port}"}
    with in_process_coordinator(d, overrides) as c, c.channel() as channel:
        flooders = [threading.Thread(target=flood, args=(channel,)) for _ in range(threads)]
        for thread in flooders:
            thread.start()
        try:
            time.sleep(seconds)
            path = d.write_site_config(0)
            path.write_text(
                path.read_text().replace(
                    f'address = "127.0.0.1:{d.port}"',
                    f'address = "[::1]:{d.port}"\nserver_name = "localhost"',
                )
            )
            site = build_site(load_toml(SiteConfig, path))
            site_stop = threading.Event()
            started = time.monotonic()
            runner = threading.Thread(target=site.run, args=(site_stop,), daemon=True)
            runner.start()
            c.wait_joined(0, timeout=30)
            joined = time.monotonic() - started
        finally:
            stop.set()
            for thread in flooders:
                thread.join(30)
        site_stop.set()
        runner.join(10)
    total = sum(codes.values())
    refused = codes.get("RESOURCE_EXHAUSTED", 0)
    return [
        Row(
            f"Hello flood for a site's key ({total} streams from 127.0.0.1, never proving); "
            "seconds: the site's own join over ::1",
            "coordinator",
            "RESOURCE_EXHAUSTED",
            f"{refused} of {total} refused, {codes.get('challenge', 0)} challenged; "
            f"first: {first.get('RESOURCE_EXHAUSTED', '-')}",
            joined,
        )
    ]


def _plaintext_coordinator_rows(root: Path) -> list[Row]:
    d = Deployment(root, rounds=1, app=FAULT_APP, params=dict(FAULT_PARAMS))
    with in_process_coordinator(d, {"server.insecure": True}):
        started = time.monotonic()
        error, at = _site_outcome(_site(d, 0))
    return [
        Row("TLS site against plaintext", "site", type(error).__name__, str(error), at - started)
    ]


def _mtls_coordinator_rows(root: Path) -> list[Row]:
    d = Deployment(root, rounds=1, app=FAULT_APP, params=dict(FAULT_PARAMS), mtls=True)
    rows: list[Row] = []
    with in_process_coordinator(d) as c:
        creds = grpc.ssl_channel_credentials(root_certificates=d.pki.ca_cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{d.port}", creds) as channel:

            def bare() -> tuple[str, str]:
                raw = RawStream(channel, timeout=10)
                raw.send(hello(site_key(d, 0)))
                return _status(raw)

            code, message, seconds = _timed(bare)
        assert c.servicer is not None
        seen = c.servicer.rejected + c.servicer.gate.joining
        rows.append(
            Row(
                "no client certificate under mutual TLS (raw gRPC)",
                "TLS handshake",
                code,
                f"{message} (streams the coordinator saw: {seen})",
                seconds,
            )
        )
        path = d.write_site_config(0)
        path.write_text("\n".join(ln for ln in path.read_text().splitlines() if "-tls." not in ln))
        started = time.monotonic()
        error, at = _site_outcome(_site(d, 0))
        rows.append(
            Row(
                "no client certificate under mutual TLS (site)",
                "site",
                type(error).__name__,
                str(error),
                at - started,
            )
        )
    return rows


def measure(root: Path) -> list[Row]:
    """Every case of the table, against coordinators rooted in ``root``."""
    rows = _tls_coordinator_rows(root / "tls")
    rows += _plaintext_coordinator_rows(root / "plaintext")
    rows += _mtls_coordinator_rows(root / "mtls")
    rows += _flood_rows(root / "flood")
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| case | refused by | status | message | seconds |",
        "|---|---|---|---|---:|",
    ]
    for r in rows:
        message = r.message.replace("|", "\\|")
        lines.append(f"| {r.case} | {r.refused_by} | {r.code} | {message} | {r.seconds:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedlearn-admission-") as tmp:
        rows = measure(Path(tmp))
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
