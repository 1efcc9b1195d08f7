"""Traffic policies in serving: A/B split, shadow and canary, against the real endpoint.

The REST app is driven in-process through ASGI (the same Starlette app ``fedlearn serve``
runs, without sockets) where thousands of requests must fit a few seconds; the live policy
change runs against a real endpoint (uvicorn and gRPC on loopback).
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import traffic_models as tm
from prometheus_client.parser import text_string_to_metric_families

from fedlearn.apps.torch_app import model_to_arrays
from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import SCHEMA, ModelRegistry
from fedlearn.registry.traffic import (
    Canary,
    LiveGate,
    Shadow,
    Split,
    parse_steps,
    parse_weights,
    policy_from_json,
    policy_to_json,
)
from fedlearn.serving.endpoint import EndpointSettings, start_endpoint
from fedlearn.serving.grpc_service import start_grpc_server
from fedlearn.serving.metrics import ServingMetrics
from fedlearn.serving.oip import grpc_predict_v2_pb2 as pb
from fedlearn.serving.oip.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from fedlearn.serving.repository import ModelRepository, RepositorySettings
from fedlearn.serving.rest import create_app
from fedlearn.serving.shadow import compare_outputs
from fedlearn.serving.traffic import ROUTE_HEADER, TrafficRouter, route_point

INFER = f"/v2/models/{tm.NAME}/infer"


# -- an in-process ASGI client ------------------------------------------------------------


async def asgi(
    app: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP request through the ASGI interface: ``(status, body)``."""
    raw_headers = [(b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), *raw_headers],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # no disconnect while the app answers
        return {"type": "http.disconnect"}

    status = [0]
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status[0] = message["status"]
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status[0], b"".join(chunks)


def post_many(
    app: Any, bodies: list[bytes], keys: list[str | None] | None = None, concurrency: int = 10
) -> list[tuple[int, dict[str, Any]]]:
    """POST each body to the infer route (``concurrency`` at a time), in order."""

    async def run() -> list[tuple[int, dict[str, Any]]]:
        out: list[tuple[int, dict[str, Any]]] = []
        for start in range(0, len(bodies), concurrency):
            chunk = range(start, min(start + concurrency, len(bodies)))
            calls = [
                asgi(
                    app,
                    "POST",
                    INFER,
                    bodies[i],
                    None if keys is None or keys[i] is None else {ROUTE_HEADER: str(keys[i])},
                )
                for i in chunk
            ]
            for status, data in await asyncio.gather(*calls):
                out.append((status, json.loads(data)))
        return out

    return asyncio.run(run())


def get_json(app: Any, path: str) -> dict[str, Any]:
    status, data = asyncio.run(asgi(app, "GET", path))
    assert status == 200, data
    return json.loads(data)  # type: ignore[no-any-return]


def logits(answer: dict[str, Any]) -> np.ndarray:
    out = answer["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def encode(x: np.ndarray) -> bytes:
    return json.dumps(tm.body(x)).encode()


def samples(app: Any, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of metric family ``name`` in ``/metrics``, by sorted labels."""
    status, data = asyncio.run(asgi(app, "GET", "/metrics"))
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


# -- fixtures -----------------------------------------------------------------------------


class Served:
    """A registry of ``mlp`` versions, its repository, a router and the REST app."""

    def __init__(self, root: Path, modules: list[Any], **router: Any) -> None:
        self.root = root
        self.modules = modules
        self.repository = ModelRepository(root, RepositorySettings(allowed_factories=tm.ALLOWED))
        self.repository.start()
        self.metrics = ServingMetrics()
        options = {"rng": random.Random(1234), "shadow_queue": 100_000, **router}
        self.router = TrafficRouter(root, self.repository, self.metrics.registry, **options)
        self.app = create_app(self.repository, self.metrics, traffic=self.router)
        self.registry = ModelRegistry(root)

    def close(self) -> None:
        self.router.close()
        self.registry.close()
        self.repository.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """v1 (seed 0), v2 (seed 1, production), v3 (seed 2), v4 (batch-limited, seed 3)."""
    modules = tm.publish(tmp_path, (0, 1, 2, 3), production=2, limited=4)
    s = Served(tmp_path, modules)
    yield s
    s.close()


# -- policies and the registry ------------------------------------------------------------


def test_policies_validate_and_round_trip() -> None:
    split = parse_weights("1=90, 2=10")
    assert split.shares() == {1: 0.9, 2: 0.1}
    assert parse_weights("2=1,1=3").weights == {1: 3.0, 2: 1.0}
    for bad, words in [
        ("1=0,2=0", "positive"),
        ("1=-1,2=3", ">= 0"),
        ("1=x", "not a number"),
        ("v1=2", "VERSION=WEIGHT"),
        ("1=1,1=2", "twice"),
        ("1=nan", "finite"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_weights(bad)
    assert parse_steps("5,25,50,100") == (0.05, 0.25, 0.5, 1.0)
    with pytest.raises(ConfigError, match="increase"):
        Canary(3, 2, steps=(0.5, 0.25))
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        Canary(3, 2, steps=(0.5, 1.5))
    with pytest.raises(ConfigError, match="already the baseline"):
        Canary(2, 2)
    with pytest.raises(ConfigError, match="step_requests, step_seconds"):
        Canary(3, 2, step_requests=None)
    with pytest.raises(ConfigError, match="sample"):
        Shadow(3, sample=0)
    with pytest.raises(ConfigError, match="max_error_rate"):
        LiveGate(max_error_rate=2)
    canary = Canary(3, 2, (0.1, 1.0), 10, 5.0, LiveGate(0.02, 40.0, 5.0, 0.1, 7), 1e-3, 1, 9.5)
    for policy in (split, Shadow(3, 0.5, 0.01), canary):
        assert policy_from_json(policy_to_json(policy)) == policy
    with pytest.raises(ConfigError, match="unknown traffic policy kind"):
        policy_from_json('{"kind": "mirror"}')


def test_registry_stores_policies_and_records_every_change(tmp_path: Path) -> None:
    tm.publish(tmp_path, (0, 1, 2), production=2)
    with ModelRegistry(tmp_path) as registry:
        with pytest.raises(ConfigError, match="has no version 7"):
            registry.set_traffic(tm.NAME, Split({1: 1, 7: 1}))
        with pytest.raises(ConfigError, match=r"baseline must be the current production.*v2"):
            registry.set_traffic(tm.NAME, Canary(3, 1))
        first = registry.set_traffic(tm.NAME, Split({1: 1, 2: 3}))
        assert registry.traffic(tm.NAME) == first
        canary = registry.set_traffic(tm.NAME, Canary(3, 2, step_seconds=1.0))
        assert canary.revision > first.revision
        assert isinstance(canary.policy, Canary) and canary.policy.step_started > 0
        stepped = registry.advance_traffic(
            tm.NAME, canary.revision, canary.policy.advanced(1.0), "canary-step", "up"
        )
        assert stepped is not None and stepped.policy.share == 0.25  # type: ignore[union-attr]
        # a decision taken on an outdated revision changes nothing
        assert registry.advance_traffic(tm.NAME, canary.revision, canary.policy, "x", "y") is None
        assert not registry.end_traffic(tm.NAME, canary.revision, "canary-rollback", "old")
        assert registry.clear_traffic(tm.NAME) and not registry.clear_traffic(tm.NAME)
        assert registry.traffic(tm.NAME) is None
        actions = [(d.action, d.version) for d in registry.decisions(tm.NAME)]
    assert actions[-4:] == [
        ("route-set", 2),
        ("route-set", 3),
        ("canary-step", 3),
        ("route-clear", 3),
    ]


def test_a_registry_of_an_older_fedlearn_opens_and_takes_policies(tmp_path: Path) -> None:
    """A registry.db without the traffic table (made by the earlier schema) keeps its
    versions and gets the table when opened."""
    tm.publish(tmp_path / "new", (0, 1), production=2)
    old = sqlite3.connect(tmp_path / "registry.db")
    old.executescript(SCHEMA)
    new = sqlite3.connect(tmp_path / "new" / "registry.db")
    for table in ("versions", "aliases", "production_history", "decisions"):
        rows = new.execute(f"SELECT * FROM {table}").fetchall()
        if rows:
            marks = ",".join("?" * len(rows[0]))
            old.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    old.commit()
    assert "traffic" not in {r[0] for r in old.execute("SELECT name FROM sqlite_master")}
    old.close()
    new.close()
    (tmp_path / tm.NAME).symlink_to(tmp_path / "new" / tm.NAME)
    with ModelRegistry(tmp_path) as registry:
        assert [v.version for v in registry.versions(tm.NAME)] == [1, 2]
        assert registry.traffic_all() == {}
        registry.set_traffic(tm.NAME, Shadow(1))
        assert registry.load(tm.NAME, 1)
        assert registry.aliases(tm.NAME)["production"] == 2


def test_compare_outputs_counts_rows_by_argmax_or_tolerance() -> None:
    a = np.array([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]], dtype=np.float32)
    b = np.array([[0.2, 0.8, 0.0], [0.1, 0.7, 0.2], [0.0, np.nan, 1.0]], dtype=np.float32)
    rows, disagree, largest = compare_outputs({"y": a}, {"y": b}, 1e-4)
    assert (rows, disagree) == (3, 2)  # row 2: argmax moved; row 3: NaN
    assert largest == np.inf
    # a regression output: max-abs over the tolerance, per row
    r1, r2 = np.array([[1.0], [2.0]]), np.array([[1.00001], [2.5]])
    assert compare_outputs({"y": r1}, {"y": r2}, 1e-3)[:2] == (2, 1)
    assert compare_outputs({"y": r1}, {"y": r2}, 1.0)[:2] == (2, 0)
    assert compare_outputs({"y": a}, {"y": a[:2]}, 1.0)[:2] == (3, 3)  # shapes differ


def test_route_points_are_stable_and_spread() -> None:
    assert route_point("m", "user-1") == route_point("m", "user-1")
    assert route_point("m", "user-1") != route_point("other", "user-1")
    points = [route_point("m", f"user-{i}") for i in range(4000)]
    assert all(0 <= p < 1 for p in points)
    assert abs(sum(p < 0.25 for p in points) / 4000 - 0.25) < 0.03


# -- A/B split ----------------------------------------------------------------------------


def test_ab_split_matches_the_weights_over_5000_requests(served: Served) -> None:
    served.registry.set_traffic(tm.NAME, Split({1: 70, 3: 30}))
    served.router.refresh()
    x = tm.rows(1, seed=0)
    answers = post_many(served.app, [encode(x)] * 5000)
    assert all(status == 200 for status, _ in answers)
    versions = Counter(a["model_version"] for _, a in answers)
    assert set(versions) == {"1", "3"}
    assert abs(versions["1"] / 5000 - 0.70) <= 0.03, versions
    assert abs(versions["3"] / 5000 - 0.30) <= 0.03, versions
    # each answer is the answering version's own
    expected = {v: tm.predict(served.modules[int(v) - 1], x) for v in ("1", "3")}
    for _, answer in answers[:200]:
        np.testing.assert_array_equal(logits(answer), expected[answer["model_version"]])
    routed = samples(served.app, "fedlearn_serving_traffic_requests_total")
    for version, count in versions.items():
        key = (("model", tm.NAME), ("policy", "split"), ("version", version))
        assert routed[key] == count
    meta = get_json(served.app, f"/v2/models/{tm.NAME}")
    assert meta["traffic"]["policy"] == {"kind": "split", "weights": {"1": 70.0, "3": 30.0}}
    assert "traffic" not in get_json(served.app, f"/v2/models/{tm.NAME}/versions/1")


def test_split_is_sticky_by_route_key(served: Served) -> None:
    served.registry.set_traffic(tm.NAME, Split({1: 1, 2: 1, 3: 2}))
    served.router.refresh()
    keys: list[str | None] = [f"customer-{i}" for i in range(300)] * 3
    answers = post_many(served.app, [encode(tm.rows(1, seed=1))] * len(keys), keys)
    seen: dict[str, set[str]] = {}
    for key, (status, answer) in zip(keys, answers, strict=True):
        assert status == 200
        seen.setdefault(str(key), set()).add(answer["model_version"])
    assert all(len(v) == 1 for v in seen.values()), "a key moved between versions"
    # and it is the version the key's point falls on: [0, .25) v1, [.25, .5) v2, [.5, 1) v3
    for key, versions in seen.items():
        point = route_point(tm.NAME, key)
        assert versions == {"1" if point < 0.25 else "2" if point < 0.5 else "3"}
    per_version = Counter(next(iter(v)) for v in seen.values())
    assert set(per_version) == {"1", "2", "3"} and per_version["3"] > per_version["1"]
    # an explicit version is never routed
    status, data = asyncio.run(
        asgi(served.app, "POST", f"/v2/models/{tm.NAME}/versions/1/infer", encode(tm.rows(1, 1)))
    )
    assert status == 200 and json.loads(data)["model_version"] == "1"


# -- shadow -------------------------------------------------------------------------------


def test_shadow_never_changes_an_answer_and_measures_disagreement(served: Served) -> None:
    served.registry.set_traffic(tm.NAME, Shadow(3))
    served.router.start()
    xs = [tm.rows(4, seed=100 + i) for i in range(400)]
    bodies = [encode(x) for x in xs]
    answers = post_many(served.app, bodies)
    served.router.drain()
    status, _ = answers[0]
    primary, candidate = served.modules[1], served.modules[2]
    disagreements = 0
    for x, (status, answer) in zip(xs, answers, strict=True):
        assert status == 200 and answer["model_version"] == "2"
        # bit-identical to the primary version's own answer
        np.testing.assert_array_equal(logits(answer), tm.predict(primary, x))
        p, c = tm.predict(primary, x), tm.predict(candidate, x)
        disagreements += int((p.argmax(1) != c.argmax(1)).sum())
    assert 0 < disagreements < 1600  # the two versions really disagree, on some rows
    # the same bytes as the primary answered with no policy at all
    versioned = post_many(served.app, bodies[:50], concurrency=1)
    plain_path = [
        asyncio.run(asgi(served.app, "POST", f"/v2/models/{tm.NAME}/versions/2/infer", b))
        for b in bodies[:50]
    ]
    for (_, shadowed), (_, raw) in zip(versioned, plain_path, strict=True):
        assert shadowed["outputs"] == json.loads(raw)["outputs"]
    served.router.drain()
    pair = (("candidate", "3"), ("model", tm.NAME), ("primary", "2"))
    rows = samples(served.app, "fedlearn_serving_shadow_rows_total")[pair]
    found = samples(served.app, "fedlearn_serving_shadow_disagreements_total")[pair]
    assert rows == 450 * 4
    expected = disagreements + sum(
        int((tm.predict(primary, x).argmax(1) != tm.predict(candidate, x).argmax(1)).sum())
        for x in xs[:50]
    )
    assert found == expected
    assert samples(served.app, "fedlearn_serving_shadow_dropped_total") == {}
    latency = samples(served.app, "fedlearn_serving_shadow_seconds_count")
    assert latency[(*pair, ("side", "candidate"))] == 450
    shadow = get_json(served.app, f"/v2/models/{tm.NAME}")["traffic"]["shadow"]["v2->v3"]
    assert shadow["rows"] == 1800 and shadow["disagreements"] == expected
    assert shadow["disagreement_rate"] == pytest.approx(expected / 1800)


def test_a_full_shadow_queue_drops_mirrors_not_requests(tmp_path: Path) -> None:
    modules = tm.publish(tmp_path, (0, 1, 2), production=2)
    s = Served(tmp_path, modules, shadow_queue=1)
    try:
        s.registry.set_traffic(tm.NAME, Shadow(3))
        s.router.refresh()  # no worker started: the queue holds one mirror, then drops
        answers = post_many(s.app, [encode(tm.rows(2, 5))] * 20)
        assert [status for status, _ in answers] == [200] * 20
        assert samples(s.app, "fedlearn_serving_shadow_dropped_total") == {
            (("model", tm.NAME),): 19.0
        }
    finally:
        s.close()


# -- canary -------------------------------------------------------------------------------


def run_until_decided(served: Served, bodies: list[bytes], every: int = 20) -> list[Any]:
    """Send ``bodies`` in rounds of ``every``, judging after each; stop when the policy
    is gone. Returns the answers."""
    answers = []
    for start in range(0, len(bodies), every):
        answers += post_many(served.app, bodies[start : start + every])
        served.router.refresh()
        if served.router.policy(tm.NAME) is None:
            break
    return answers


def test_a_canary_failing_the_live_gate_is_rolled_back(served: Served) -> None:
    gate = LiveGate(max_error_rate=0.05, min_requests=20)
    served.registry.set_traffic(
        tm.NAME, Canary(4, 2, steps=(0.5, 1.0), step_requests=60, gate=gate)
    )
    served.router.refresh()
    # a fifth of the requests carry 8 rows: v4 was exported for at most 4
    xs = [tm.rows(8 if i % 5 == 0 else 2, seed=i) for i in range(600)]
    answers = run_until_decided(served, [encode(x) for x in xs])
    assert served.router.policy(tm.NAME) is None, "the canary was not rolled back"
    assert all(status == 200 for status, _ in answers)
    for x, (_, answer) in zip(xs, answers, strict=False):
        module = served.modules[int(answer["model_version"]) - 1]
        np.testing.assert_array_equal(logits(answer), tm.predict(module, x))
        if len(x) == 8:
            assert answer["model_version"] == "2"  # the baseline answered for v4
    decisions = served.registry.decisions(tm.NAME)
    last = decisions[-1]
    assert last.action == "canary-rollback" and last.version == 4 and not last.promoted
    assert "error rate" in last.reason and "> 5.00%" in last.reason
    assert served.registry.aliases(tm.NAME)["production"] == 2
    assert served.registry.traffic(tm.NAME) is None
    fallbacks = samples(served.app, "fedlearn_serving_traffic_fallbacks_total")
    assert fallbacks[(("model", tm.NAME), ("version", "4"))] > 0
    assert samples(served.app, "fedlearn_serving_canary_share") == {
        (("candidate", "4"), ("model", tm.NAME)): 0.0
    }
    errors = samples(served.app, "fedlearn_serving_requests_total")
    assert (("model", tm.NAME), ("outcome", "error"), ("protocol", "rest")) not in errors


def test_a_healthy_canary_steps_up_and_is_promoted(served: Served) -> None:
    gate = LiveGate(max_error_rate=0.01, max_disagreement=0.9, min_requests=10)
    served.registry.set_traffic(
        tm.NAME, Canary(3, 2, steps=(0.25, 0.5, 1.0), step_requests=30, gate=gate)
    )
    served.router.start()
    shares = []
    xs = [tm.rows(2, seed=1000 + i) for i in range(2000)]
    answers = []
    for start in range(0, len(xs), 20):
        answers += post_many(served.app, [encode(x) for x in xs[start : start + 20]])
        served.router.drain()
        served.router.refresh()
        policy = served.router.policy(tm.NAME)
        if policy is None:
            break
        assert isinstance(policy, Canary)
        shares.append(policy.share)
    assert served.router.policy(tm.NAME) is None, "the canary was not decided"
    assert all(status == 200 for status, _ in answers)
    assert sorted(set(shares)) == [0.25, 0.5, 1.0]
    actions = [(d.action, d.version, d.promoted) for d in served.registry.decisions(tm.NAME)]
    assert actions[-5:] == [
        ("route-set", 3, False),
        ("canary-step", 3, False),
        ("canary-step", 3, False),
        ("canary-promote", 3, True),
        ("promote", 3, True),
    ]
    assert "disagreement" in served.registry.decisions(tm.NAME)[-2].reason
    assert served.registry.aliases(tm.NAME)["production"] == 3
    # the endpoint serves the new production from the repository's next look
    served.repository.refresh()
    answer = post_many(served.app, [encode(xs[0])])[0][1]
    assert answer["model_version"] == "3"
    np.testing.assert_array_equal(logits(answer), tm.predict(served.modules[2], xs[0]))


# -- live changes on a real endpoint -----------------------------------------------------


def test_policies_change_live_with_no_failed_request(tmp_path: Path) -> None:
    """REST and gRPC clients loop on a real endpoint while split, shadow, canary and no
    policy follow each other in the registry: every request succeeds, with the answer of
    the version it names."""
    modules = tm.publish(tmp_path, (0, 1, 2), production=2)
    settings = EndpointSettings(
        registry=tmp_path,
        http_port=0,
        grpc_port=0,
        allowed_factories=tm.ALLOWED,
        poll_interval_s=0.02,
    )
    x = tm.rows(3, seed=9)
    expected = {str(i + 1): tm.predict(m, x) for i, m in enumerate(modules)}
    failures: list[str] = []
    seen: Counter[str] = Counter()
    stop = threading.Event()

    def rest_loop() -> None:
        with httpx.Client(base_url=endpoint.http_url, timeout=10) as client:
            while not stop.is_set():
                r = client.post(INFER, json=tm.body(x))
                if r.status_code != 200:
                    failures.append(f"REST {r.status_code}: {r.text}")
                    continue
                answer = r.json()
                seen[answer["model_version"]] += 1
                if not np.array_equal(logits(answer), expected[answer["model_version"]]):
                    failures.append(f"REST v{answer['model_version']}: wrong answer")

    def grpc_loop() -> None:
        request = pb.ModelInferRequest(model_name=tm.NAME)
        request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        request.raw_input_contents.append(x.tobytes())
        with grpc.insecure_channel(endpoint.grpc_address) as channel:
            stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            while not stop.is_set():
                try:
                    response = stub.ModelInfer(
                        request, timeout=10, metadata=((ROUTE_HEADER, "sticky"),)
                    )
                except grpc.RpcError as exc:
                    failures.append(f"gRPC {exc}")
                    continue
                got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 3)
                seen["grpc:" + response.model_version] += 1
                if not np.array_equal(got, expected[response.model_version]):
                    failures.append(f"gRPC v{response.model_version}: wrong answer")

    endpoint = start_endpoint(settings)
    try:
        threads = [threading.Thread(target=rest_loop), threading.Thread(target=grpc_loop)]
        for thread in threads:
            thread.start()
        with ModelRegistry(tmp_path) as registry:
            for policy in (
                Split({1: 1, 3: 1}),
                Shadow(3),
                Split({1: 1}),
                Canary(3, 2, steps=(0.5,), step_requests=100_000),
                None,
                Split({3: 1}),
            ):
                time.sleep(0.3)
                if policy is None:
                    registry.clear_traffic(tm.NAME)
                else:
                    registry.set_traffic(tm.NAME, policy)
            time.sleep(0.3)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        sticky = route_point(tm.NAME, "sticky")
    finally:
        stop.set()
        endpoint.close()
    assert failures == []
    assert {"1", "2", "3"} <= set(seen), seen
    assert seen["grpc:3"] > 0 and sticky >= 0  # the last split sends every key to v3


def test_shadow_charges_a_failing_candidate_with_exactly_its_failures(served: Served) -> None:
    """v4 refuses batches over 4 rows: stacked mirrors fail, then run one by one, so the
    errors are the 8-row requests and everything else is compared."""
    served.registry.set_traffic(tm.NAME, Shadow(4))
    served.router.start()
    xs = [tm.rows(8 if i % 4 == 0 else 1, seed=i) for i in range(200)]
    answers = post_many(served.app, [encode(x) for x in xs])
    served.router.drain()
    assert all(status == 200 and a["model_version"] == "2" for status, a in answers)
    pair = (("candidate", "4"), ("model", tm.NAME), ("primary", "2"))
    assert samples(served.app, "fedlearn_serving_shadow_errors_total")[pair] == 50
    assert samples(served.app, "fedlearn_serving_shadow_requests_total")[pair] == 150
    assert samples(served.app, "fedlearn_serving_shadow_rows_total")[pair] == 150


def test_a_canary_answering_nan_falls_back_and_is_rolled_back(served: Served) -> None:
    broken = tm.seeded(5)
    last_layer = list(broken.children())[-1]
    assert isinstance(last_layer, torch.nn.Linear)
    with torch.no_grad():
        last_layer.bias.fill_(float("nan"))
    with ModelRegistry(served.root) as registry:
        registry.publish(
            tm.NAME,
            model_to_arrays(broken),
            run="traffic",
            round=5,
            metrics={"accuracy": 0.5},
            client_summary=None,
            factory=tm.FACTORY,
            factory_params=tm.PARAMS,
            signature=tm.SIGNATURE,
        )
    served.registry.set_traffic(
        tm.NAME, Canary(5, 2, steps=(0.5, 1.0), step_requests=100, gate=LiveGate(min_requests=10))
    )
    served.router.refresh()
    xs = [tm.rows(2, seed=i) for i in range(400)]
    answers = run_until_decided(served, [encode(x) for x in xs])
    assert served.router.policy(tm.NAME) is None
    for x, (status, answer) in zip(xs, answers, strict=False):
        assert status == 200 and answer["model_version"] == "2"
        np.testing.assert_array_equal(logits(answer), tm.predict(served.modules[1], x))
    last = served.registry.decisions(tm.NAME)[-1]
    assert last.action == "canary-rollback" and "error rate 100.00%" in last.reason


def test_a_canary_slower_than_its_p95_bound_is_rolled_back(served: Served) -> None:
    gate = LiveGate(max_p95_ms=1e-6, min_requests=10)
    served.registry.set_traffic(tm.NAME, Canary(3, 2, steps=(0.5, 1.0), gate=gate))
    served.router.refresh()
    answers = run_until_decided(served, [encode(tm.rows(1, seed=i)) for i in range(400)])
    assert all(status == 200 for status, _ in answers)
    last = served.registry.decisions(tm.NAME)[-1]
    assert last.action == "canary-rollback" and "p95" in last.reason and "> 1e-06 ms" in last.reason
    assert served.registry.aliases(tm.NAME)["production"] == 2


def test_grpc_route_key_metadata_makes_a_split_sticky(served: Served) -> None:
    served.registry.set_traffic(tm.NAME, Split({1: 1, 3: 1}))
    served.router.refresh()
    server, port = start_grpc_server(
        served.repository, served.metrics, "127.0.0.1:0", traffic=served.router
    )
    x = tm.rows(2, seed=3)
    request = pb.ModelInferRequest(model_name=tm.NAME)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            answered = set()
            for key in (f"device-{i}" for i in range(30)):
                expected = "1" if route_point(tm.NAME, key) < 0.5 else "3"
                answered.add(expected)
                for _ in range(3):
                    response = stub.ModelInfer(request, timeout=10, metadata=((ROUTE_HEADER, key),))
                    assert response.model_version == expected
                    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4")
                    want = tm.predict(served.modules[int(expected) - 1], x)
                    np.testing.assert_array_equal(got.reshape(want.shape), want)
            assert answered == {"1", "3"}
            # an explicit version is not routed
            request.model_version = "2"
            assert stub.ModelInfer(request, timeout=10).model_version == "2"
    finally:
        server.stop(grace=1).wait()
