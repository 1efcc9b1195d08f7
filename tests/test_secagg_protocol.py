"""The SecAgg+ state machines end to end: exact sums within the quantization bound,
dropouts at every stage, clean aborts, what the server can see, and refusals of
malformed or inconsistent messages."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlearn.errors import (
    ConfigError,
    RoundFailed,
    SecAggError,
    SerializationError,
    UpdateRejected,
)
from fedlearn.secagg import (
    AdvertiseKeys,
    EncryptedShares,
    MaskedInput,
    PeerKey,
    PeerKeys,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    SecAggSimulation,
    Setup,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskShares,
    decode_message,
    flatten,
    run_secure_sum,
    unflatten,
)
from fedlearn.secagg.graph import neighbour_graph, shuffled
from fedlearn.secagg.quantize import quantize

SEED = b"fedlearn-secagg-test-seed-000000"
CLIP = 1.0

Updates = dict[int, tuple[np.ndarray, int]]


def make_updates(n: int, d: int, seed: int = 0, max_weight: int = 50) -> Updates:
    rng = np.random.default_rng(seed)
    return {
        c: (
            rng.normal(scale=0.7, size=d).astype(np.float32),  # some values beyond the clip
            int(rng.integers(1, max_weight + 1)),
        )
        for c in range(n)
    }


def plain_sum(updates: Updates, who: Any) -> tuple[np.ndarray, int]:
    total = np.zeros(next(iter(updates.values()))[0].size)
    weight = 0
    for c in who:
        x, w = updates[c]
        total += w * np.clip(x, -CLIP, CLIP).astype(np.float64)
        weight += w
    return total, weight


def config(n: int, d: int, **kw: Any) -> SecAggConfig:
    kw.setdefault("max_weight", 50)
    kw.setdefault("clip", CLIP)
    kw.setdefault("graph_seed", SEED)
    return SecAggConfig.create(range(n), d, **kw)


def check(sim: SecAggSimulation, updates: Updates, drop: Any = None) -> set[int]:
    result = sim.run(drop)
    want, weight = plain_sum(updates, result.survivors)
    assert result.total_weight == weight
    err = np.max(np.abs(result.weighted_sum - want))
    assert err <= result.error_bound, (err, result.error_bound)
    assert result.error_bound == len(result.survivors) / 2 ** (sim.config.scale_bits + 1)
    return set(result.survivors)


# ------------------------------------------------------------------------- correctness


def test_secure_sum_equals_plain_weighted_sum() -> None:
    updates = make_updates(16, 300)
    cfg = config(16, 300)
    assert (cfg.num_neighbours, cfg.threshold) == (8, 5)
    sim = SecAggSimulation(updates, cfg, round=3)
    assert check(sim, updates) == set(range(16))
    mean = sim.server.result().mean()
    want, weight = plain_sum(updates, range(16))
    assert np.max(np.abs(mean - want / weight)) <= cfg.error_bound / weight
    assert not sim.client_errors and not sim.server_errors


def test_run_secure_sum_helper() -> None:
    updates = make_updates(6, 20, seed=4)
    total, weight = run_secure_sum(updates, config(6, 20))
    want, want_w = plain_sum(updates, range(6))
    assert weight == want_w
    assert np.max(np.abs(total - want)) <= 6 / 2 ** (config(6, 20).scale_bits + 1)


def test_complete_graph_is_the_original_secagg() -> None:
    updates = make_updates(7, 50, seed=1)
    cfg = config(7, 50, num_neighbours=6, threshold=4)
    g = neighbour_graph(cfg.clients, 6, cfg.graph_seed)
    assert all(g[c] == set(range(7)) - {c} for c in range(7))
    assert check(SecAggSimulation(updates, cfg), updates) == set(range(7))
    cfg = config(7, 50, num_neighbours=6, threshold=4)
    survivors = check(SecAggSimulation(updates, cfg), updates, {Stage.MASKED: {0, 1, 2}})
    assert survivors == {3, 4, 5, 6}


@pytest.mark.parametrize("bits", [24, 32, 64])
def test_other_moduli(bits: int) -> None:
    updates = make_updates(8, 40, seed=bits)
    cfg = config(8, 40, modulus_bits=bits)
    check(SecAggSimulation(updates, cfg, serialize=bits == 64), updates, {"masked": {2}})


def test_model_arrays_round_trip_through_secure_aggregation() -> None:
    rng = np.random.default_rng(5)
    models = {
        c: {
            "w": rng.normal(scale=0.1, size=(4, 3)).astype(np.float32),
            "b": rng.normal(scale=0.1, size=3).astype(np.float32),
        }
        for c in range(5)
    }
    weights = {0: 10, 1: 20, 2: 5, 3: 1, 4: 14}
    updates = {}
    for c, arrays in models.items():
        vec, spec = flatten(arrays)
        updates[c] = (vec, weights[c])
    cfg = config(5, spec.size)
    total, weight = run_secure_sum(updates, cfg)
    mean = unflatten(total / weight, spec)
    for name in ("w", "b"):
        want = sum(weights[c] * models[c][name].astype(np.float64) for c in models) / weight
        assert np.max(np.abs(mean[name] - want)) <= cfg.error_bound / weight + 1e-7


# ----------------------------------------------------------------------------- dropouts


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.UNMASK])
def test_dropouts_at_each_stage_are_recovered(stage: Stage) -> None:
    n = 14
    updates = make_updates(n, 64, seed=int(stage))
    cfg = config(n, 64)
    sim = SecAggSimulation(updates, cfg)
    survivors = check(sim, updates, {stage: {1, 6, 9}})
    if stage is Stage.UNMASK:
        assert survivors == set(range(n))  # their inputs are in; only their shares are missing
    else:
        assert survivors == set(range(n)) - {1, 6, 9}


def test_dropouts_across_all_stages_over_thirty_percent() -> None:
    n = 24
    updates = make_updates(n, 100, seed=2)
    cfg = config(n, 100)  # k = 10, t = 6: each client tolerates 5 lost share holders
    assert (cfg.num_neighbours, cfg.threshold) == (10, 6)
    # Every third client along the graph's ring drops: 8 of 24, at most 4 per neighbourhood.
    ring = shuffled(cfg.clients, cfg.graph_seed)
    out = ring[::3]
    drop = {
        Stage.ADVERTISE: set(out[0:2]),
        Stage.SHARE: set(out[2:4]),
        Stage.MASKED: set(out[4:6]),
        Stage.UNMASK: set(out[6:8]),
    }
    gone = set(out)
    assert len(gone) / n >= 0.3
    sim = SecAggSimulation(updates, cfg)
    survivors = check(sim, updates, drop)
    assert survivors == set(range(n)) - gone | drop[Stage.UNMASK]
    assert sim.server.members[Stage.UNMASK] == frozenset(set(range(n)) - gone)


def test_forty_percent_dropouts_with_the_complete_graph() -> None:
    n = 10
    updates = make_updates(n, 30, seed=9)
    cfg = config(n, 30, num_neighbours=n - 1, threshold=6)
    drop = {Stage.SHARE: {0}, Stage.MASKED: {1, 2}, Stage.UNMASK: {3}}
    assert check(SecAggSimulation(updates, cfg), updates, drop) == set(range(4, n)) | {3}


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.UNMASK])
def test_too_few_survivors_abort_cleanly(stage: Stage) -> None:
    n = 6
    updates = make_updates(n, 16)
    cfg = config(n, 16, num_neighbours=5, threshold=4)
    sim = SecAggSimulation(updates, cfg)
    with pytest.raises(RoundFailed):
        sim.run({stage: {0, 1, 2}})
    server = sim.server
    assert server.stage is Stage.ABORTED
    assert server._acc is None
    with pytest.raises(SecAggError, match="no result"):
        server.result()
    with pytest.raises(RoundFailed):
        server.advance()


def test_a_secret_with_fewer_than_t_live_holders_aborts() -> None:
    n = 12
    updates = make_updates(n, 16)
    cfg = config(n, 16, num_neighbours=4, threshold=3)
    g = neighbour_graph(cfg.clients, 4, cfg.graph_seed)
    victim = 0
    two = sorted(g[victim])[:2]
    sim = SecAggSimulation(updates, cfg)
    # The victim's input is in the sum, but only 2 of its 5 holders answer the unmasking.
    with pytest.raises(RoundFailed, match=f"b-shares of client {victim}"):
        sim.run({Stage.UNMASK: {victim, *two}})
    assert sim.server.stage is Stage.ABORTED


def test_clients_with_too_few_live_neighbours_are_pruned() -> None:
    n = 12
    updates = make_updates(n, 16, seed=3)
    cfg = config(n, 16, num_neighbours=4, threshold=3)
    g = neighbour_graph(cfg.clients, 4, cfg.graph_seed)
    lonely = 5
    gone = set(sorted(g[lonely])[:3])  # leaves it 1 neighbour + itself < t = 3
    sim = SecAggSimulation(updates, cfg)
    survivors = check(sim, updates, {Stage.ADVERTISE: gone})
    assert lonely not in survivors and not gone & survivors
    assert lonely not in sim.server.members[Stage.ADVERTISE]


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 9),
    sparse=st.booleans(),
    drops=st.lists(st.sampled_from(list(Stage)[1:5]), min_size=9, max_size=9),
    mask=st.lists(st.booleans(), min_size=9, max_size=9),
)
def test_any_dropout_pattern_gives_the_exact_sum_or_a_clean_abort(
    n: int, sparse: bool, drops: list[Stage], mask: list[bool]
) -> None:
    k = max(2, n // 2) if sparse and n > 3 else n - 1
    updates = make_updates(n, 8, seed=n)
    cfg = config(n, 8, num_neighbours=k)
    schedule: dict[Stage, set[int]] = {}
    for c in range(n):
        if mask[c]:
            schedule.setdefault(drops[c], set()).add(c)
    sim = SecAggSimulation(updates, cfg, serialize=False)
    try:
        survivors = check(sim, updates, schedule)
    except RoundFailed:
        assert sim.server.stage is Stage.ABORTED
        return
    dropped_early = set().union(*(v for s, v in schedule.items() if s is not Stage.UNMASK), set())
    assert not survivors & dropped_early
    assert len(survivors) >= cfg.threshold


# ------------------------------------------------------------------------------ privacy


def _chi_square_z(counts: np.ndarray) -> float:
    expected = float(counts.sum()) / counts.size
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = int(counts.size) - 1
    return float((chi2 / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def _looks_uniform(words: np.ndarray) -> bool:
    z = _chi_square_z(np.bincount(words.view(np.uint8), minlength=256))
    bits = np.unpackbits(words.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    sigma = 0.5 / math.sqrt(words.size)
    return abs(z) < 5 and bool(np.all(np.abs(bits - 0.5) < 6 * sigma))


def test_masked_inputs_are_indistinguishable_from_uniform() -> None:
    n, d = 6, 40_000
    # The most structured inputs there are: all zeros (and one constant vector).
    updates = {c: (np.zeros(d, np.float32), 1) for c in range(n)}
    updates[0] = (np.full(d, 0.25, np.float32), 7)
    cfg = config(n, d, num_neighbours=3, threshold=3)
    sim = SecAggSimulation(updates, cfg)
    sim.run()
    masked = [m for m in sim.received if isinstance(m, MaskedInput)]
    assert len(masked) == n
    for m in masked:
        assert _looks_uniform(m.masked)
    # The test has power: the unmasked quantized input is nowhere near uniform.
    plain = quantize(updates[0][0], 7, clip=CLIP, scale_bits=cfg.scale_bits, modulus_bits=32)
    assert not _looks_uniform(plain[:-1])
    # And two masked inputs are not related to each other either.
    diff = masked[1].masked - masked[2].masked
    assert _looks_uniform(diff)


def _arrays_in(obj: Any, seen: set[int] | None = None) -> Iterator[np.ndarray]:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _arrays_in(k, seen)
            yield from _arrays_in(v, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            yield from _arrays_in(v, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _arrays_in(getattr(obj, f.name), seen)
    elif hasattr(obj, "__dict__"):
        yield from _arrays_in(vars(obj), seen)


def test_server_state_never_holds_an_individual_input() -> None:
    n, d = 8, 64
    updates = make_updates(n, d, seed=11)
    cfg = config(n, d, num_neighbours=4, threshold=3)
    plains = [
        quantize(x, w, clip=CLIP, scale_bits=cfg.scale_bits, modulus_bits=32)
        for x, w in updates.values()
    ]
    snapshots = 0

    def inspect(msg: Any) -> Any:
        nonlocal snapshots
        arrays = list(_arrays_in(sim.server))
        assert len(arrays) <= 1  # at most the running masked sum
        for a in arrays:
            for p in plains:
                assert not np.array_equal(a, p)
                assert not np.array_equal(a[:-1], updates[0][0])
        snapshots += 1
        return msg

    sim = SecAggSimulation(updates, cfg, tamper=inspect)
    drop = {Stage.MASKED: {2}}
    check(sim, updates, drop)
    assert snapshots > 4 * n
    # After the round only the result holds an array: the sum, never a single input.
    assert [a.size for a in _arrays_in(sim.server)] == [d]


def test_server_never_gets_both_shares_of_a_client() -> None:
    n = 10
    updates = make_updates(n, 8)
    cfg = config(n, 8, num_neighbours=6, threshold=4)
    sim = SecAggSimulation(updates, cfg)
    sim.run({Stage.MASKED: {0, 4}, Stage.SHARE: {7}})
    b_of: set[int] = set()
    sk_of: set[int] = set()
    for m in sim.received:
        if isinstance(m, UnmaskShares):
            b_of |= {o for o, _ in m.b_shares}
            sk_of |= {o for o, _ in m.sk_shares}
    assert sk_of == {0, 4}
    assert not b_of & sk_of


# ------------------------------------------------------- a hand-driven round for tampering


class Round:
    """Server and clients stepped by hand so single messages can be altered."""

    def __init__(self, n: int = 6, k: int = 5, t: int = 4, d: int = 8) -> None:
        self.updates = make_updates(n, d)
        self.cfg = config(n, d, num_neighbours=k, threshold=t)
        self.server = SecAggServer(self.cfg, round=2)
        self.clients = {c: SecAggClient(c, round=2) for c in range(n)}
        for c, (x, w) in self.updates.items():
            self.clients[c].set_input(x, w)
        self.outbox: list[Any] = self.server.start()

    def step(self, skip: set[int] | frozenset[int] = frozenset()) -> list[Any]:
        replies = []
        for msg in self.outbox:
            if msg.client_id in skip:
                continue
            reply = self.clients[msg.client_id].handle(msg)
            replies.append(reply)
        return replies

    def deliver(self, replies: list[Any]) -> None:
        for r in replies:
            self.server.receive(r)
        self.outbox = self.server.advance()

    def to(self, stage: Stage) -> None:
        while self.server.stage < stage:
            self.deliver(self.step())


def test_client_refuses_an_unmask_request_for_both_shares_of_a_peer() -> None:
    r = Round()
    r.to(Stage.UNMASK)
    req = r.outbox[0]
    me = req.client_id
    peer = next(p for p in req.b_share_of if p != me)
    bad = dataclasses.replace(req, sk_share_of=(*req.sk_share_of, peer))
    client = r.clients[me]
    with pytest.raises(SecAggError, match="both shares"):
        client.handle(bad)
    assert client.stage is Stage.ABORTED
    assert client._held == {} and client._own_b_share is None  # secrets forgotten
    with pytest.raises(SecAggError):
        client.handle(req)  # and it stays silent afterwards


@pytest.mark.parametrize(
    ("b_of", "sk_of", "match"),
    [
        ((0, 1, 2, 3, 4), (4, 5), "both shares"),
        ((0, 1, 2), (3, 4, 5), "fewer than"),  # reveal s_sk-shares while < t survive
        ((0, 1, 2, 3, 4, 99), (5,), "holds shares of"),  # a non-neighbour
        ((0, 1, 2, 3), (5,), "holds shares of"),  # a peer left out
        ((1, 2, 3, 4), (0, 5), "as dropped"),  # this client did send its input
        ((0, 1, 1, 2, 3, 4), (5,), "repeats"),
    ],
)
def test_client_refuses_inconsistent_unmask_requests(
    b_of: tuple[int, ...], sk_of: tuple[int, ...], match: str
) -> None:
    r = Round(n=6, k=5, t=4)
    r.to(Stage.MASKED)
    r.deliver(r.step(skip={5}))  # client 5 dropped: its s_sk-shares are requested
    req = next(m for m in r.outbox if m.client_id == 0)
    assert (req.b_share_of, req.sk_share_of) == ((0, 1, 2, 3, 4), (5,))
    client = r.clients[0]
    with pytest.raises(SecAggError, match=match):
        client.handle(dataclasses.replace(req, b_share_of=b_of, sk_share_of=sk_of))
    assert client.stage is Stage.ABORTED and client._held == {}
    r = Round(n=6, k=5, t=4)
    r.to(Stage.MASKED)
    r.deliver(r.step(skip={5}))
    req = next(m for m in r.outbox if m.client_id == 0)
    with pytest.raises(SecAggError, match="round"):
        r.clients[0].handle(dataclasses.replace(req, round=3))


def test_client_refuses_out_of_order_and_misaddressed_messages() -> None:
    r = Round()
    setup = r.outbox[0]
    client = r.clients[setup.client_id]
    with pytest.raises(SecAggError, match="at stage SETUP"):
        client.handle(UnmaskRequest(2, setup.client_id, (), ()))
    fresh = SecAggClient(1, round=2)
    with pytest.raises(SecAggError, match="reached"):
        fresh.handle(dataclasses.replace(setup, client_id=0))
    fresh = SecAggClient(setup.client_id, round=7)
    with pytest.raises(SecAggError, match="expected 7"):
        fresh.handle(setup)


def test_client_refuses_an_inconsistent_neighbour_list() -> None:
    r = Round(n=8, k=3, t=3)
    setup = next(m for m in r.outbox if m.client_id == 0)
    stranger = next(c for c in range(1, 8) if c not in setup.neighbours)
    bad = dataclasses.replace(setup, neighbours=(*setup.neighbours[1:], stranger))
    with pytest.raises(SecAggError, match="neighbour list"):
        SecAggClient(0).handle(bad)
    with pytest.raises(SecAggError, match="neighbour list"):
        SecAggClient(0).handle(dataclasses.replace(setup, neighbours=setup.neighbours[:-1]))


def test_client_refuses_bad_peer_key_lists() -> None:
    r = Round(n=8, k=3, t=3)
    r.to(Stage.SHARE)
    msg = next(m for m in r.outbox if m.client_id == 0)
    client = r.clients[0]
    stranger = next(c for c in range(1, 8) if c not in client.neighbours)
    extra = PeerKey(stranger, b"\x09" * 32, b"\x0a" * 32)
    cases = [
        (dataclasses.replace(msg, peers=(*msg.peers, extra)), "non-neighbours"),
        (dataclasses.replace(msg, peers=msg.peers[:1]), "neighbours left"),
        (
            dataclasses.replace(
                msg,
                peers=(*msg.peers[:-1], dataclasses.replace(msg.peers[-1], s_pk=msg.peers[0].c_pk)),
            ),
            "not distinct",
        ),
        (dataclasses.replace(msg, peers=(*msg.peers, msg.peers[0])), "twice"),
    ]
    for bad, match in cases:
        fresh = SecAggClient(0, round=2)
        fresh.handle(next(m for m in Round(n=8, k=3, t=3).outbox if m.client_id == 0))
        with pytest.raises(SecAggError, match=match):
            fresh.handle(bad)


def test_tampered_or_redirected_share_ciphertexts_are_refused() -> None:
    r = Round()
    r.to(Stage.MASKED)
    msg = next(m for m in r.outbox if m.client_id == 0)
    (s1, ct1), (s2, ct2) = msg.ciphertexts[:2]
    for pos in (0, 20, len(ct1) - 1):  # nonce, body, tag
        bad = bytearray(ct1)
        bad[pos] ^= 0x40
        fresh = Round()
        fresh.to(Stage.MASKED)
        target = next(m for m in fresh.outbox if m.client_id == 0)
        cts = ((target.ciphertexts[0][0], bytes(bad)), *target.ciphertexts[1:])
        with pytest.raises(SecAggError, match="authentication"):
            fresh.clients[0].handle(dataclasses.replace(target, ciphertexts=cts))
        assert fresh.clients[0].stage is Stage.ABORTED
    swapped = ((s1, ct2), (s2, ct1), *msg.ciphertexts[2:])
    with pytest.raises(SecAggError, match="authentication"):
        r.clients[0].handle(dataclasses.replace(msg, ciphertexts=swapped))


def test_a_tampering_server_loses_only_that_client() -> None:
    """A flipped bit in transit makes the receiving client refuse and drop out; the
    others still finish with the exact sum of the remaining survivors."""
    n = 8
    updates = make_updates(n, 16)
    cfg = config(n, 16, num_neighbours=7, threshold=5)

    def flip(msg: Any) -> Any:
        if isinstance(msg, EncryptedShares) and msg.client_id == 3:
            sender, blob = msg.ciphertexts[0]
            bad = bytes([blob[0] ^ 1]) + blob[1:]
            return dataclasses.replace(msg, ciphertexts=((sender, bad), *msg.ciphertexts[1:]))
        return msg

    sim = SecAggSimulation(updates, cfg, tamper=flip)
    survivors = check(sim, updates)
    assert survivors == set(range(n)) - {3}
    assert isinstance(sim.client_errors[3], SecAggError)


def test_server_refuses_malformed_and_inconsistent_client_messages() -> None:
    r = Round(n=18, k=17, t=10)
    replies = r.step()
    srv = r.server
    dup = dataclasses.replace(replies[1], client_id=replies[1].client_id)
    srv.receive(replies[0])
    with pytest.raises(SecAggError, match="already answered"):
        srv.receive(replies[0])
    with pytest.raises(SecAggError, match="another client's key"):
        srv.receive(dataclasses.replace(replies[1], c_pk=replies[0].c_pk))
    assert 1 in srv.rejected  # refused clients are out of the round
    with pytest.raises(SecAggError, match="not \\(or no longer\\)"):
        srv.receive(dup)
    with pytest.raises(SecAggError, match="round"):
        srv.receive(dataclasses.replace(replies[2], round=9))
    with pytest.raises(SecAggError, match="does not take"):
        srv.receive(ShareKeys(2, 3, ()))
    with pytest.raises(SecAggError, match="not \\(or no longer\\)"):
        srv.receive(dataclasses.replace(replies[3], client_id=42))
    for reply in replies[2:]:
        srv.receive(reply)
    r.outbox = srv.advance()
    shares = r.step()
    srv.receive(shares[0])
    with pytest.raises(SecAggError, match="expected its live neighbours"):
        srv.receive(dataclasses.replace(shares[1], ciphertexts=shares[1].ciphertexts[1:]))
    with pytest.raises(SerializationError, match="bytes"):
        srv.receive(
            dataclasses.replace(
                shares[2],
                ciphertexts=((shares[2].ciphertexts[0][0], b"x"), *shares[2].ciphertexts[1:]),
            )
        )
    for reply in shares[3:]:
        srv.receive(reply)
    r.outbox = srv.advance()
    masked = r.step()
    with pytest.raises(SerializationError, match="masked input"):
        srv.receive(dataclasses.replace(masked[0], masked=masked[0].masked[:-1]))
    with pytest.raises(SerializationError, match="masked input"):
        srv.receive(dataclasses.replace(masked[1], masked=masked[1].masked.astype(np.uint64)))
    for reply in masked[2:]:
        srv.receive(reply)
    r.outbox = srv.advance()
    unmask = r.step()
    owner, raw = unmask[0].b_shares[0]
    with pytest.raises(SerializationError):
        srv.receive(
            dataclasses.replace(unmask[0], b_shares=((owner, raw[:-1]), *unmask[0].b_shares[1:]))
        )
    with pytest.raises(SecAggError, match="asked for"):
        srv.receive(dataclasses.replace(unmask[1], b_shares=unmask[1].b_shares[1:]))
    stolen = dataclasses.replace(
        unmask[2], b_shares=(unmask[3].b_shares[0], *unmask[2].b_shares[1:])
    )
    assert stolen.b_shares[0][0] == unmask[2].b_shares[0][0]
    with pytest.raises(SecAggError, match="not its own"):
        srv.receive(stolen)
    for reply in unmask[3:]:
        srv.receive(reply)
    # Eight clients were refused along the way; the ten left (= t) still finish exactly.
    srv.advance()
    result = srv.result()
    want, weight = plain_sum(r.updates, result.survivors)
    assert result.total_weight == weight
    assert np.max(np.abs(result.weighted_sum - want)) <= result.error_bound


def test_corrupted_share_makes_the_round_fail_loudly() -> None:
    n = 7
    updates = make_updates(n, 8)
    cfg = config(n, 8, num_neighbours=6, threshold=4)

    def corrupt(msg: Any) -> Any:
        if isinstance(msg, UnmaskShares) and msg.sk_shares:
            owner, raw = msg.sk_shares[0]
            value = (int.from_bytes(raw[10:], "big") + 1).to_bytes(33, "big")
            return dataclasses.replace(
                msg, sk_shares=((owner, raw[:10] + value), *msg.sk_shares[1:])
            )
        return msg

    sim = SecAggSimulation(updates, cfg, tamper=corrupt)
    with pytest.raises(SecAggError, match=r"do not agree|does not match"):
        sim.run({Stage.MASKED: {6}})
    assert sim.server.stage is Stage.ABORTED


def test_client_input_validation() -> None:
    r = Round(n=5, k=4, t=3, d=8)
    r.clients[0].set_input(np.zeros(9, np.float32), 1)  # wrong length for the round
    r.to(Stage.SHARE)
    r.deliver(r.step())
    with pytest.raises(UpdateRejected, match="expects 8"):
        r.clients[0].handle(next(m for m in r.outbox if m.client_id == 0))
    with pytest.raises(UpdateRejected):
        SecAggClient(1).set_input(np.zeros((2, 2)), 1)
    with pytest.raises(UpdateRejected):
        SecAggClient(1).set_input(np.zeros(2), -3)
    r = Round(n=5, k=4, t=3, d=8)
    r.clients[1].set_input(np.zeros(8, np.float32), 10_000)  # above max_weight
    r.to(Stage.SHARE)
    r.deliver(r.step())
    with pytest.raises(UpdateRejected, match="exceeds"):
        r.clients[1].handle(next(m for m in r.outbox if m.client_id == 1))


# ----------------------------------------------------------------------- config and wire


def test_config_is_validated_before_any_round() -> None:
    with pytest.raises(ConfigError, match="strict majority"):
        SecAggConfig(tuple(range(10)), 4, num_neighbours=6, threshold=3, graph_seed=SEED)
    with pytest.raises(ConfigError, match="threshold"):
        SecAggConfig(tuple(range(10)), 4, num_neighbours=4, threshold=6, graph_seed=SEED)
    with pytest.raises(ConfigError, match="wrap"):
        SecAggConfig(
            tuple(range(100)),
            4,
            num_neighbours=14,
            threshold=8,
            max_weight=1000,
            scale_bits=20,
            graph_seed=SEED,
        )
    with pytest.raises(ConfigError, match="k must be"):
        SecAggConfig(tuple(range(5)), 4, num_neighbours=5, threshold=4, graph_seed=SEED)
    with pytest.raises(ConfigError, match="min_survivors"):
        SecAggConfig(
            tuple(range(5)), 4, num_neighbours=4, threshold=3, min_survivors=9, graph_seed=SEED
        )
    with pytest.raises(ConfigError):
        SecAggConfig.create(range(2**20), 4, max_weight=2**12)
    cfg = SecAggConfig.create(range(100), 10, max_weight=1000)
    assert (cfg.num_neighbours, cfg.threshold, cfg.min_survivors) == (14, 8, 8)
    assert cfg.scale_bits == 14  # the largest scale that cannot wrap for 100 x 1000 x 1.0


def test_every_message_round_trips_through_bytes() -> None:
    r = Round(n=5, k=4, t=3)
    seen: list[Any] = []
    while r.server.stage < Stage.DONE:
        seen += r.outbox
        replies = r.step()
        seen += replies
        r.deliver(replies)
    kinds = {type(m) for m in seen}
    assert kinds == {
        Setup,
        AdvertiseKeys,
        PeerKeys,
        ShareKeys,
        EncryptedShares,
        MaskedInput,
        UnmaskRequest,
        UnmaskShares,
    }
    for m in seen:
        back = type(m).from_bytes(m.to_bytes())
        if isinstance(m, MaskedInput):
            assert np.array_equal(back.masked, m.masked) and back.client_id == m.client_id
        else:
            assert back == m


def test_decoding_rejects_malformed_bytes() -> None:
    msg = AdvertiseKeys(1, 2, b"\x01" * 32, b"\x02" * 32)
    raw = msg.to_bytes()
    bad_inputs = [
        b"",
        b"XXXX" + raw[4:],
        raw[:4] + b"\x63" + raw[5:],  # unknown type
        raw[:-3],
        raw + b"trailing",
        raw.replace(b'"round":1', b'"round":true'),
        raw.replace(b'"round":1', b'"round":-1'),
        raw.replace(b'"round":1', b'"rounds":1'),
    ]
    for bad in bad_inputs:
        with pytest.raises(SerializationError):
            decode_message(bad)
    short_key = AdvertiseKeys(1, 2, b"\x01" * 31, b"\x02" * 32).to_bytes()
    with pytest.raises(SerializationError, match="32 bytes"):
        decode_message(short_key)
    with pytest.raises(SerializationError, match="expected ShareKeys"):
        ShareKeys.from_bytes(raw)
    masked = MaskedInput(1, 2, np.zeros(3, np.float32)).to_bytes()
    with pytest.raises(SerializationError, match="uint32 or uint64"):
        decode_message(masked)
    setup = Round(n=5, k=4, t=3).outbox[0].to_bytes()
    with pytest.raises(SerializationError, match="config"):
        decode_message(setup.replace(b'"threshold":3', b'"threshold":2'))
