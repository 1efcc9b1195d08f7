"""RELIABILITY.md (c): 1000 concurrent enrolled sites on one coordinator.

One ``fedlearn`` coordinator process (``run_coordinator``: TLS, Ed25519 admission of every
site, SQLite checkpoint every round) and ``--sites`` ``SiteClient`` threads spread over
``--procs`` processes (at most 8), each site with its own channel, TLS session and key,
all connected at once; the model is the Flower peer's 21 float64 and the app echoes it
(``bench_deploy_vs_flower.py``'s part (c) pieces, reused). Each round is a train and an
evaluate stage with every site. Recorded: updates lost (tasks of a round that did not
come back as valid replies: must be 0), the time from the first process start until every
site had joined, round time (between consecutive round ends, median of rounds 2..R) and
that time per client, the coordinator's peak RSS, and the same for ``--baseline`` sites
(100: BENCHMARKS.md 3(c)) in the same run, for comparison.

    .venv/bin/python benchmarks/reliability/load.py        # 1000 sites, 8 procs, 5 rounds
    .venv/bin/python benchmarks/reliability/load.py --sites 200 --procs 4 --rounds 3 --baseline 0

``tests/test_deploy_load.py`` runs 50 sites over 2 processes for 2 rounds in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
sys.path.insert(0, str(ROOT))

from benchmarks import bench_deploy_vs_flower as bench  # noqa: E402

MAX_PROCS = 8


@dataclass
class LoadResult:
    """One run's figures."""

    sites: int
    procs: int
    rounds: int
    tls: bool
    lost_updates: int
    train_ok: list[int]
    eval_ok: list[int]
    site_errors: list[str]
    join_s: float
    """First process started -> the first round's training stage started (all joined)."""
    round_ms: float
    """Median time between consecutive round ends (rounds 2..R), train + evaluate stages."""
    per_client_ms: float
    coordinator_cpu_ms: float
    """Median CPU time of the coordinator process per round (rounds 2..R)."""
    coordinator_peak_rss_mib: float
    site_process_peak_rss_mib: float
    rounds_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost_updates == 0 and not self.site_errors


def run_load(work: Path, sites: int, procs: int, rounds: int, tls: bool = True) -> LoadResult:
    """Start a coordinator and ``sites`` sites in ``procs`` processes; run ``rounds``."""
    if not 1 <= procs <= MAX_PROCS:
        raise ValueError(f"procs must be in 1..{MAX_PROCS}, not {procs}")
    if rounds < 2:
        raise ValueError("rounds must be at least 2 (round time is between round ends)")
    work.mkdir(parents=True, exist_ok=True)
    material = bench.write_pki_and_keys(work, sites)
    port = bench.free_port()
    config = bench.coordinator_toml(
        work / "coordinator.toml",
        material,
        port=port,
        state_dir=work / "state",
        rounds=rounds,
        min_clients=sites,
        tls=tls,
        model_factory="benchmarks.peer_site:initial_arrays",
    )
    # a thousand TLS handshakes and admissions on a few cores take a while
    text = config.read_text().replace("join_timeout_s = 120", "join_timeout_s = 900")
    # Every site here dials from 127.0.0.1, one peer address for the join limits, which
    # are meant against a flood from one address (a real federation's sites each have
    # their own): that one address gets the whole federation's limits.
    text = text.replace(
        f'state_dir = "{work / "state"}"',
        f'state_dir = "{work / "state"}"\n'
        "max_joins = 256\nmax_joins_per_peer = 256\n"
        f"joins_per_peer_per_s = {max(50, sites)}\njoin_burst_per_peer = {max(100, sites)}",
    )
    config.write_text(text)
    started = time.perf_counter()  # CLOCK_MONOTONIC: the children's clocks are the same
    coordinator = bench.Child("c-coord", {"config": str(config)})
    children: list[bench.Child] = []
    try:
        coordinator.expect("READY", 120)
        for p in range(procs):
            role = {
                "tls": tls,
                "ca": material["ca"],
                "port": port,
                "site_keys": material["site_keys"],
                "indices": list(range(p, sites, procs)),
            }
            children.append(bench.Child("c-sites", role))
        result = coordinator.expect("RESULT", 1800)
        site_results = [child.expect("RESULT", 300) for child in children]
    finally:
        coordinator.stop()
        for child in children:
            child.stop()
    ends = {r: t for kind, r, t in result["marks"] if kind == "end"}
    cpu = {r: t for kind, r, t in result["marks"] if kind == "cpu"}
    first_stage = min(t for kind, r, t in result["marks"] if kind.startswith("start-"))
    intervals = [(ends[r] - ends[r - 1]) * 1e3 for r in range(2, rounds + 1)]
    round_ms = statistics.median(intervals)
    train_ok, eval_ok = result["train_ok"], result["eval_ok"]
    return LoadResult(
        sites=sites,
        procs=procs,
        rounds=rounds,
        tls=tls,
        lost_updates=sum(sites - ok for ok in train_ok) + sum(sites - ok for ok in eval_ok),
        train_ok=train_ok,
        eval_ok=eval_ok,
        site_errors=[e for s in site_results for e in s["errors"]],
        join_s=first_stage - started,
        round_ms=round_ms,
        per_client_ms=round_ms / sites,
        coordinator_cpu_ms=statistics.median(
            (cpu[r] - cpu[r - 1]) * 1e3 for r in range(2, rounds + 1)
        ),
        coordinator_peak_rss_mib=result["peak_rss"] / bench.MIB,
        site_process_peak_rss_mib=max(s["peak_rss"] for s in site_results) / bench.MIB,
        rounds_ms=intervals,
        wall_s=time.perf_counter() - started,
    )


def describe(r: LoadResult) -> str:
    return (
        f"{r.sites} sites ({r.procs} processes, {'TLS' if r.tls else 'plaintext'}), "
        f"{r.rounds} rounds: lost updates {r.lost_updates} (train ok {r.train_ok}, evaluate "
        f"ok {r.eval_ok}), site errors {len(r.site_errors)}; all joined after {r.join_s:.1f} s; "
        f"round {r.round_ms:.0f} ms (rounds 2..{r.rounds}: "
        f"{', '.join(f'{x:.0f}' for x in r.rounds_ms)}) = {r.per_client_ms:.2f} ms per client; "
        f"coordinator CPU {r.coordinator_cpu_ms:.0f} ms per round, peak RSS "
        f"{r.coordinator_peak_rss_mib:.0f} MiB; largest site process "
        f"{r.site_process_peak_rss_mib:.0f} MiB; wall {r.wall_s:.0f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=8, help=f"site processes (<= {MAX_PROCS})")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--baseline", type=int, default=100, help="also run this many sites first (0: no)"
    )
    parser.add_argument("--insecure", action="store_true", help="plaintext (TLS by default)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedlearn-load-") as tmp:
        for sites, procs in [(args.baseline, min(2, args.procs)), (args.sites, args.procs)]:
            if sites <= 0:
                continue
            result = run_load(Path(tmp) / f"n{sites}", sites, procs, args.rounds, not args.insecure)
            print(describe(result), flush=True)
            for error in result.site_errors[:10]:
                print(f"  site error: {error}")
            results.append(result)
    print(f"load average at end: {os.getloadavg()}")
    if len(results) == 2:
        base, big = results
        ratio = big.per_client_ms / base.per_client_ms
        print(
            f"per client: {big.per_client_ms:.2f} ms at {big.sites} sites vs "
            f"{base.per_client_ms:.2f} ms at {base.sites} ({ratio:.2f}x); "
            f"coordinator peak RSS {big.coordinator_peak_rss_mib:.0f} vs "
            f"{base.coordinator_peak_rss_mib:.0f} MiB"
        )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
