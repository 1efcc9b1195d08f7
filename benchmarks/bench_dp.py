"""Differential privacy: what it costs in accuracy and in time, fedlearn beside Flower 1.42.

**Utility** (issue 11, acceptance 4). fedlearn's main job, MNIST-5k with the CNN of
``clients/mnist.py`` over ``--clients`` clients (Dirichlet 0.5), every client training
(1 local epoch, SGD lr 0.1, batch 32) and evaluating in each of ``--rounds`` rounds. For
each target ε ∈ ``--epsilons`` at δ = ``--delta`` the noise multiplier σ comes from
:mod:`fedlearn.privacy.calibrate` (dp-accounting, RDP):

* central DP and distributed DP: one Gaussian sum per round, every client every round
  (no amplification by sampling), ``GaussianDpEvent(σ)`` composed ``rounds`` times;
* local DP: each client's own update, noise ``σC`` with sensitivity ``2C`` per round,
  ``GaussianDpEvent(σ/2)`` composed ``rounds`` times.

fedlearn runs ``fedlearn simulate`` with ``--set privacy.*`` (the commands are printed; the
ε column is what fedlearn's own ledger wrote to ``rounds.csv``, which must come out at the
target). Flower runs ``flower_dp.py`` in its venv, the same σ and C through its own
mechanisms: ``DifferentialPrivacyServerSideFixedClipping`` and
``...ClientSideFixedClipping`` (central; its own RDP accountant's ε is shown) and
``LocalDpMod`` (local; Flower does not compose it over rounds). Flower has no distributed
DP. The clip C is chosen from the norms of the non-private updates (printed, with a small
sweep of C under central DP at the largest ε).

**Cost** (acceptance 5, central and local). Round time with DP over round time without,
in-process, by CPU time (``time.process_time``; wall time is printed too): the privacy
wrapper ``fedlearn simulate`` builds (``make_privacy``) and its accountant's bookkeeping
after every round, on the Flower peer workload (``benchmarks/peer_workload.py``: numpy
logistic regression, 100 clients, as ``bench_sim_vs_flower.py`` runs it) and on the MNIST
job; off, central and local interleaved, medians over rounds and repetitions;
``--cost-blas-one`` measures again with numpy's BLAS on one thread. The utility runs'
steady rounds are printed as well, but they are wall time, side by side with ``--jobs``.

Usage (from the repository root; the Flower venv is made by
``shared/peers/flower/setup.sh .peer-venv-flower`` plus torch 2.13.0 and mlxtend, see
``shared/peers/flower/README.md``)::

    python benchmarks/bench_dp.py                       # everything (about 30 min on 2 cores)
    python benchmarks/bench_dp.py --part flower --json flower.json
    python benchmarks/bench_dp.py --part fedlearn --part cost --jobs 3 --flower-json flower.json

Flower runs with telemetry and update checks off and Ray in a private temp dir; its
leftover processes (those carrying that dir in their environment) are killed by pid.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_sim_vs_flower import run_in_flower_env  # noqa: E402
from benchmarks.peers import flower_peer_dir  # noqa: E402
from fedlearn.privacy.calibrate import (  # noqa: E402
    central_noise_multiplier,
    local_noise_multiplier,
)

DEFAULT_FLOWER_VENV = REPO / ".peer-venv-flower"
FLOWER_DRIVER = REPO / "benchmarks" / "flower_dp.py"
FEDLEARN_MODES = ("central", "distributed", "local")
FLOWER_MODES = ("central-server", "central-client", "local")


@dataclass(frozen=True)
class Workload:
    """The MNIST job every cell runs."""

    clients: int
    rounds: int
    epochs: int
    clip: float
    delta: float


# --------------------------------------------------------------------------- calibration
def calibrate(w: Workload, epsilons: Sequence[float]) -> dict[str, dict[float, float]]:
    """σ per (kind, ε): ``central`` (also distributed) and ``local``."""
    out: dict[str, dict[float, float]] = {"central": {}, "local": {}}
    for eps in epsilons:
        out["central"][eps] = central_noise_multiplier(eps, w.delta, w.rounds, rate=1.0)
        out["local"][eps] = local_noise_multiplier(eps, w.delta, w.rounds)
    return out


# --------------------------------------------------------------------------- fedlearn
def privacy_sets(mode: str, sigma: float, w: Workload) -> list[str]:
    """The ``--set`` assignments that turn on ``mode`` (``off``: none)."""
    if mode == "off":
        return []
    sets = [
        f"privacy.mode={mode}",
        f"privacy.noise_multiplier={sigma!r}",
        f"privacy.clip={w.clip!r}",
        f"privacy.delta={w.delta!r}",
        "privacy.accountant=rdp",
    ]
    if mode in ("central", "distributed"):
        sets.append("privacy.sampling=poisson")  # q = fraction_train = 1: every client
    if mode == "distributed":
        sets += ["secagg.enabled=true", f"secagg.clip={w.clip!r}"]
    return sets


def simulate_command(w: Workload, out_dir: Path, sets: Sequence[str]) -> list[str]:
    """``fedlearn simulate`` for the MNIST job with extra ``sets``."""
    base = [
        "publish.enabled=false",
        f"client.params.epochs={w.epochs}",
        "client.params.batch_size=32",
        "client.params.lr=0.1",
    ]
    cmd = [
        "simulate",
        "--clients",
        str(w.clients),
        "--rounds",
        str(w.rounds),
        "--out",
        str(out_dir),
        "--no-check-serving",
    ]
    for s in [*base, *sets]:
        cmd += ["--set", s]
    return cmd


def read_rounds(out_dir: Path) -> list[dict[str, str]]:
    with (out_dir / "rounds.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _float(row: dict[str, str], key: str) -> float | None:
    value = row.get(key)
    return float(value) if value not in (None, "") else None


def summarize_rounds(rows: list[dict[str, str]]) -> dict[str, Any]:
    """Final accuracy, ε after the last round, per-round accuracy and steady round time."""
    acc = [_float(r, "accuracy_mean") for r in rows]
    times = [float(r["duration_s"]) for r in rows]
    last = rows[-1] if rows else {}
    return {
        "final_acc": acc[-1] if acc else None,
        "acc_by_round": acc,
        "epsilon": _float(last, "epsilon"),
        "round_s": times,
        "steady_round_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "rounds_done": len(rows),
    }


def run_fedlearn(
    w: Workload, mode: str, sigma: float, root: Path, timeout: float
) -> dict[str, Any]:
    """One ``fedlearn simulate`` run in a fresh directory under ``root``."""
    out_dir = root / f"{mode}-{sigma:.4f}"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = simulate_command(w, out_dir, privacy_sets(mode, sigma, w))
    shown = "fedlearn " + " ".join(args)
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fedlearn.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    result: dict[str, Any] = {"mode": mode, "sigma": sigma, "command": shown, "wall_s": wall}
    if proc.returncode != 0 or not (out_dir / "rounds.csv").exists():
        result["error"] = (proc.stderr + proc.stdout)[-2000:]
        print(f"  FAILED (rc {proc.returncode}): {result['error'][-600:]}", flush=True)
        return result
    result.update(summarize_rounds(read_rounds(out_dir)))
    print(
        f"  acc {fmt(result['final_acc'], 4)}  eps {fmt(result['epsilon'], 4)}  "
        f"steady round {fmt(result['steady_round_s'], 3)} s  wall {wall:.1f} s",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- Flower
def run_flower(
    python: Path, w: Workload, mode: str, sigma: float, clip: float, timeout: float
) -> dict[str, Any]:
    """One run of ``flower_dp.py`` in the Flower venv; its BENCH_RESULT."""
    cmd = [
        str(python),
        str(FLOWER_DRIVER),
        "--mode",
        mode,
        "--clients",
        str(w.clients),
        "--rounds",
        str(w.rounds),
        "--local-epochs",
        str(w.epochs),
        "--noise-multiplier",
        repr(sigma),
        "--clip",
        repr(clip),
        "--delta",
        repr(w.delta),
    ]
    shown = " ".join(["flower_dp.py", *cmd[2:]])
    print(f"$ {shown}", flush=True)
    out, err, wall, rc, _ = run_in_flower_env(
        cmd,
        timeout,
        "flwr-dp-bench-",
        RAY_DEDUP_LOGS="1",
        FLOWER_PEER_DIR=str(flower_peer_dir()),
    )
    result: dict[str, Any] = {"mode": mode, "sigma": sigma, "clip": clip, "command": shown}
    result["wall_s"] = wall
    for line in out.splitlines():
        if line.startswith("BENCH_RESULT "):
            bench = json.loads(line[len("BENCH_RESULT ") :])
            times = [float(v) for _, v in sorted(bench["round_seconds"].items(), key=_round)]
            result.update(
                final_acc=bench["final_eval_acc"],
                epsilon=bench.get("flower_epsilon"),
                round_s=times,
                steady_round_s=statistics.median(times[1:]) if len(times) > 1 else None,
                update_norms=bench.get("update_norms"),
            )
    if "final_acc" not in result:
        result["error"] = (err + out)[-2000:]
        print(f"  FAILED (rc {rc}): {result['error'][-600:]}", flush=True)
    else:
        print(
            f"  acc {fmt(result['final_acc'], 4)}  flower eps {fmt(result['epsilon'], 4)}  "
            f"steady round {fmt(result['steady_round_s'], 3)} s  wall {wall:.1f} s",
            flush=True,
        )
    return result


def _round(item: tuple[str, Any]) -> int:
    return int(item[0])


class Clock:
    """A round sink that does the run's privacy bookkeeping and notes the time."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self.marks: list[tuple[float, float]] = []
        self.accounting: list[float] = []

    def record_round(self, round: Any, clients: Any, arrays: Any, state: Any) -> None:
        t0 = time.process_time()
        if self.tracker is not None:
            self.tracker.record(round, clients)
        self.accounting.append(time.process_time() - t0)
        self.marks.append((time.perf_counter(), time.process_time()))


class MechanismTimer:
    """CPU time spent inside the DP mechanism's own code (clipping, noise, secret
    sampling, accounting), by wrapping those functions while a run goes.

    Whole-run ratios also carry what the noise does to the model: on the peer workload a
    noised logistic regression drives ``np.exp`` into overflow, whose slow path makes the
    peer's own training dearer. This separates the two.
    """

    def __init__(self) -> None:
        self.total = 0.0
        self._saved: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self.total += time.process_time() - t0

        self._saved.append((owner, name, original))
        setattr(owner, name, timed)

    def __enter__(self) -> MechanismTimer:
        from fedlearn.privacy import central, local

        for name in ("privatize", "local_dp", "dp_metrics"):  # called by PrivateTraining
            self.wrap(local, name)
        for name in ("add", "result"):
            self.wrap(central.CentralFold, name)
        self.wrap(central.CentralPrivacy, "select_train")
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def mnist_factory(clients: int, epochs: int) -> Any:
    """The ClientApp factory ``fedlearn simulate`` builds for the MNIST job."""
    from fedlearn.config.simulation import load_config
    from fedlearn.run.job import client_app_factory

    config = load_config(
        None,
        {
            "run": {"clients": clients, "seed": 0},
            "client": {"params": {"epochs": epochs, "batch_size": 32, "lr": 0.1}},
        },
    )
    return client_app_factory(config)


def model_size(factory: Any) -> int:
    """Number of parameters (all arrays) of the factory's initial model."""
    return int(sum(a.size for a in factory().initial_arrays(0).values()))


# --------------------------------------------------------------------------- distributed
def distributed_parts(w: Workload, sigma: float, length: int) -> tuple[Any, Any]:
    """SecAgg+ with distributed DP (Skellam) of noise multiplier ``sigma`` and clip C, and
    the round's DP event as a function of the number of survivors, as ``fedlearn simulate``
    builds them (``make_distributed``)."""
    from fedlearn.config.simulation import PrivacySection, SecAggSection
    from fedlearn.run.builders import make_distributed, make_secure

    privacy = PrivacySection(
        mode="distributed",
        noise_multiplier=sigma,
        clip=w.clip,
        delta=w.delta,
        accountant="rdp",
        sampling="poisson",
    )
    secagg = SecAggSection(enabled=True, clip=w.clip)
    return make_distributed(
        privacy,
        secagg,
        make_secure(secagg),
        clients_per_round=w.clients,
        num_params=lambda: length,
        seed=0,
    )


def calibrate_distributed(
    w: Workload, epsilons: Sequence[float], gaussian: dict[float, float], length: int
) -> dict[float, float]:
    """σ per ε for distributed DP, on the Skellam round event the ledger composes (its
    zCDP bound costs a little more than a Gaussian of the same variance)."""
    from fedlearn.privacy.calibrate import noise_multiplier_for

    out = {}
    for eps in epsilons:
        g = gaussian[eps]
        out[eps] = noise_multiplier_for(
            eps,
            w.delta,
            w.rounds,
            lambda s: distributed_parts(w, s, length)[1](w.clients),
            bracket=(0.5 * g, 8.0 * g),
            tol=1e-4,
        )
    return out


def run_fedlearn_distributed_api(w: Workload, sigma: float, factory: Any) -> dict[str, Any]:
    """Distributed DP through the Python API (SecAgg+ with noise, the run's tracker):
    for a checkout where ``fedlearn simulate`` does not wire the mode yet."""
    from fedlearn.config.simulation import PrivacySection
    from fedlearn.run.builders import make_privacy
    from fedlearn.simulation.engine import run_simulation
    from fedlearn.strategy import FedAvg

    secure, event = distributed_parts(w, sigma, model_size(factory))
    section = PrivacySection(
        mode="distributed",
        noise_multiplier=sigma,
        clip=w.clip,
        delta=w.delta,
        accountant="rdp",
        sampling="poisson",
    )
    strategy, tracker = make_privacy(
        section,
        FedAvg(),
        num_clients=w.clients,
        seed=0,
        secure=secure,
        distributed_event=event,
    )
    secure.check(strategy, w.clients)
    clock = Clock(tracker)
    print(f"$ (Python API) distributed DP, sigma {sigma:.4f}, pool backend", flush=True)
    t0 = time.perf_counter()
    result = run_simulation(
        factory,
        strategy,
        num_clients=w.clients,
        rounds=w.rounds,
        seed=0,
        backend="pool",
        sink=clock,  # type: ignore[arg-type]
        stop_before=None if tracker is None else tracker.stop_reason,
        secure=secure,
    )
    times = [r.duration_s for r in result.rounds]
    out: dict[str, Any] = {
        "mode": "distributed",
        "sigma": sigma,
        "command": "Python API (run_simulation + SecureAggregation.with_noise + make_privacy)",
        "wall_s": time.perf_counter() - t0,
        "final_acc": float(result.rounds[-1].eval_metrics["accuracy"]),
        "acc_by_round": [float(r.eval_metrics.get("accuracy", math.nan)) for r in result.rounds],
        "epsilon": None if tracker is None else float(tracker.epsilon()),
        "round_s": times,
        "steady_round_s": statistics.median(times[1:]) if len(times) > 1 else None,
        "rounds_done": len(result.rounds),
    }
    print(
        f"  acc {fmt(out['final_acc'], 4)}  eps {fmt(out['epsilon'], 4)}  "
        f"steady round {fmt(out['steady_round_s'], 3)} s  wall {out['wall_s']:.1f} s",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------- cost
def cost(
    workload: str,
    clients: int,
    rounds: int,
    reps: int,
    sigmas: dict[str, float],
    delta: float,
    blas_threads: int | None = None,
) -> dict[str, Any]:
    """Per-round wall and CPU time of ``workload`` (``peer`` or ``mnist``) with DP off,
    central and local, in-process: the wrapper ``fedlearn simulate`` builds
    (``make_privacy``) and its accountant's bookkeeping after every round.

    A round's time is the time between the ends of consecutive rounds (training,
    aggregation with clipping and noise, evaluation, accounting), so round 1 (warm-up) is
    left out; CPU time is this process's (``time.process_time``), which other work on a
    shared machine disturbs far less than wall time. The three configurations are
    interleaved ``reps`` times after one warm-up each; medians over rounds and reps.
    ``blas_threads`` limits numpy's BLAS thread pool (threadpoolctl) for these runs: on a
    small loaded machine an idle BLAS thread pool can make one ``np.dot`` of a model-sized
    vector cost milliseconds.
    """
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(blas_threads, user_api="blas"):
            out = cost(workload, clients, rounds, reps, sigmas, delta)
        out["blas_threads"] = blas_threads
        return out
    from benchmarks.peer_workload import PeerLogReg
    from fedlearn.config.simulation import PrivacySection
    from fedlearn.run.builders import make_privacy
    from fedlearn.simulation.engine import run_simulation
    from fedlearn.strategy import FedAvg

    factory: Any = PeerLogReg if workload == "peer" else mnist_factory(clients, 1)
    if workload == "mnist":  # one thread, as in a pool worker: idle threads spin otherwise
        import torch

        torch.set_num_threads(1)

    def one(
        mode: str,
    ) -> tuple[list[float], list[float], list[float], float, float | None, float]:
        section = PrivacySection(
            mode=mode,  # type: ignore[arg-type]
            noise_multiplier=sigmas.get(mode, 1.0),
            clip=1.0 if workload == "peer" else 0.4,
            delta=delta,
            sampling="poisson",
        )
        strategy, tracker = make_privacy(
            section, FedAvg(), num_clients=clients, seed=0, secure=None
        )
        clock = Clock(tracker)
        with MechanismTimer() as mechanism:
            result = run_simulation(
                factory,
                strategy,
                num_clients=clients,
                rounds=rounds,
                seed=0,
                backend="inprocess",
                sink=clock,  # type: ignore[arg-type]
                stop_before=None if tracker is None else tracker.stop_reason,
            )
        m = clock.marks
        wall = [b[0] - a[0] for a, b in itertools.pairwise(m)]
        cpu = [b[1] - a[1] for a, b in itertools.pairwise(m)]
        acc = float(result.rounds[-1].eval_metrics.get("accuracy", math.nan))
        eps = None if tracker is None else float(tracker.epsilon())
        own = (mechanism.total + sum(clock.accounting)) / rounds  # every round, with round 1
        return wall, cpu, clock.accounting[1:], acc, eps, own

    modes = ("off", "central", "local")
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    acct: dict[str, list[float]] = {m: [] for m in modes}
    own: dict[str, list[float]] = {m: [] for m in modes}
    final: dict[str, tuple[float, float | None]] = {}
    for m in modes:
        one(m)  # warm-up: imports, first data generation, dp-accounting's caches
    for _ in range(reps):
        for m in modes:  # interleaved, so drift in the machine's load hits all three
            a, b, c, acc, eps, mech = one(m)
            wall[m] += a
            cpu[m] += b
            acct[m] += c
            own[m].append(mech)
            final[m] = (acc, eps)
    out: dict[str, Any] = {
        "workload": workload,
        "clients": clients,
        "rounds": rounds,
        "reps": reps,
        "sigmas": sigmas,
    }
    for m in modes:
        out[m] = {
            "wall_round_s": statistics.median(wall[m]),
            "cpu_round_s": statistics.median(cpu[m]),
            "accounting_cpu_s": statistics.median(acct[m]),
            "mechanism_cpu_s": statistics.median(own[m]),
            "final_acc": final[m][0],
            "epsilon": final[m][1],
        }
    return out


# --------------------------------------------------------------------------- output
def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.3f}"


def print_tables(results: dict[str, Any]) -> None:
    w = results["workload"]
    eps_list = results["epsilons"]
    fed = {(r["mode"], r.get("epsilon_target")): r for r in results.get("fedlearn", [])}
    flw = {(r["mode"], r.get("epsilon_target")): r for r in results.get("flower", [])}
    sig = results["sigmas"]
    print()
    print(
        f"Utility: MNIST-5k, {w['clients']} clients (Dirichlet 0.5), {w['rounds']} rounds, "
        f"every client every round, {w['epochs']} local epoch, C = {w['clip']}, "
        f"delta = {w['delta']:g}; final eval accuracy (epsilon reported)"
    )
    header = f"{'mechanism':<40} | " + " | ".join(f"{'eps=' + f'{e:g}':>22}" for e in eps_list)
    print(header)
    print("-" * len(header))

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{'not run':>22}"
        if "error" in r:
            return f"{'FAILED':>22}"
        return f"{fmt(r.get('final_acc'), 4) + ' (eps ' + fmt(r.get('epsilon'), 3) + ')':>22}"

    base_f = fed.get(("off", None))
    base_w = flw.get(("none", None))
    print(f"{'non-private: fedlearn':<40} | {cell(base_f)}")
    print(f"{'non-private: Flower':<40} | {cell(base_w)}")
    for mode in FEDLEARN_MODES:
        kind = {"local": "local", "distributed": "distributed"}.get(mode, "central")
        sigmas = ", ".join(f"{sig.get(kind, {}).get(str(e), math.nan):.3f}" for e in eps_list)
        print(
            f"{'fedlearn ' + mode:<40} | "
            + " | ".join(cell(fed.get((mode, e))) for e in eps_list)
            + f"   sigma = {sigmas}"
        )
    for mode in FLOWER_MODES:
        print(f"{'Flower ' + mode:<40} | " + " | ".join(cell(flw.get((mode, e))) for e in eps_list))
    print("(Flower's eps: its own RDP accountant, central wrappers only; LocalDpMod has none)")
    norms = (base_w or {}).get("update_norms")
    if norms:
        print(
            f"non-private update norms over all rounds and clients: p10 {norms['p10']:.3f}, "
            f"median {norms['p50']:.3f}, p90 {norms['p90']:.3f}, max {norms['max']:.3f}"
        )
    sweep = results.get("clip_sweep", [])
    if sweep:
        print(
            "clip sweep (central, largest eps): "
            + ", ".join(
                f"C={r['clip']:g}: {r['framework']} {fmt(r.get('final_acc'), 4)}" for r in sweep
            )
        )
    print()
    print("Cost: round time with DP / without (same run)")
    print("  (utility runs' steady rounds: indicative only, wall time, side by side with --jobs)")
    if base_f is not None and "error" not in base_f:
        top = max(eps_list)
        for mode in FEDLEARN_MODES:
            r = fed.get((mode, top))
            if r is not None and "error" not in r:
                print(
                    f"  MNIST {mode} (eps={top:g}) / off: steady round "
                    f"{fmt(r['steady_round_s'])} / {fmt(base_f['steady_round_s'])} s = "
                    f"{ratio(r['steady_round_s'], base_f['steady_round_s'])}"
                )
    if base_w is not None and "error" not in base_w:
        top = max(eps_list)
        for mode in FLOWER_MODES:
            r = flw.get((mode, top))
            if r is not None and "error" not in r:
                print(
                    f"  (Flower) MNIST {mode} / none: steady round {fmt(r['steady_round_s'])} "
                    f"/ {fmt(base_w['steady_round_s'])} s = "
                    f"{ratio(r['steady_round_s'], base_w['steady_round_s'])}"
                )
    for cost_result in results.get("cost", []):
        off = cost_result["off"]
        blas = cost_result.get("blas_threads")
        for mode in ("central", "local"):
            c = cost_result[mode]
            print(
                f"  {cost_result['workload']} ({cost_result['clients']} clients, in-process, "
                f"BLAS threads {'default' if blas is None else blas}, "
                f"{cost_result['rounds']} rounds x {cost_result['reps']}) {mode} / off: "
                f"wall {c['wall_round_s'] * 1e3:.1f} / {off['wall_round_s'] * 1e3:.1f} ms = "
                f"{ratio(c['wall_round_s'], off['wall_round_s'])}; CPU "
                f"{c['cpu_round_s'] * 1e3:.1f} / {off['cpu_round_s'] * 1e3:.1f} ms = "
                f"{ratio(c['cpu_round_s'], off['cpu_round_s'])} (accounting "
                f"{c['accounting_cpu_s'] * 1e3:.1f} ms of it)"
            )
            if "mechanism_cpu_s" in c:
                print(
                    f"    the mechanism's own code (clip, noise, sampling, accounting): "
                    f"{c['mechanism_cpu_s'] * 1e3:.2f} ms a round; (off + it) / off = "
                    f"{(off['cpu_round_s'] + c['mechanism_cpu_s']) / off['cpu_round_s']:.3f}"
                )


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--part",
        action="append",
        choices=("fedlearn", "flower", "clip", "cost"),
        help="what to run (repeatable; default: all)",
    )
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--clip", type=float, default=0.4)
    p.add_argument("--clips", default="0.2,0.8", help="extra clips for the sweep")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--epsilons", default="1,3,8")
    p.add_argument("--modes", default=",".join(FEDLEARN_MODES), help="fedlearn DP modes")
    p.add_argument("--flower-modes", default=",".join(FLOWER_MODES))
    p.add_argument("--flower-venv", type=Path, default=DEFAULT_FLOWER_VENV)
    p.add_argument("--flower-json", type=Path, help="reuse the Flower cells of an earlier run")
    p.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    p.add_argument("--cost-clients", type=int, default=100)
    p.add_argument("--cost-rounds", type=int, default=20)
    p.add_argument("--cost-mnist-rounds", type=int, default=4)
    p.add_argument(
        "--cost-blas-one",
        action="store_true",
        help="measure the cost again with numpy's BLAS on one thread (threadpoolctl)",
    )
    p.add_argument("--cost-reps", type=int, default=3)
    p.add_argument(
        "--distributed-api",
        action="store_true",
        help="run distributed DP through the Python API when `fedlearn simulate` refuses it",
    )
    p.add_argument("--jobs", type=int, default=1, help="fedlearn cells side by side")
    p.add_argument("--runs-dir", type=Path, default=None, help="fedlearn run directories")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    args = p.parse_args()
    parts = set(args.part or ("fedlearn", "flower", "clip", "cost"))
    eps_list = [float(e) for e in args.epsilons.split(",") if e]
    w = Workload(args.clients, args.rounds, args.epochs, args.clip, args.delta)

    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}; python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
        flush=True,
    )
    t0 = time.perf_counter()
    sigmas = calibrate(w, eps_list)
    print(
        f"calibrated sigma (RDP, delta={w.delta:g}, {w.rounds} rounds, every client every "
        f"round; {time.perf_counter() - t0:.1f} s): "
        + "; ".join(
            f"{kind}: " + ", ".join(f"eps {e:g} -> {s:.4f}" for e, s in d.items())
            for kind, d in sigmas.items()
        ),
        flush=True,
    )
    results: dict[str, Any] = {
        "workload": w.__dict__,
        "epsilons": eps_list,
        "sigmas": {k: {str(e): s for e, s in d.items()} for k, d in sigmas.items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_at_start": load,
    }
    if args.flower_json is not None:
        prior = json.loads(args.flower_json.read_text())
        results["flower"] = prior.get("flower", [])
        results["clip_sweep"] = prior.get("clip_sweep", [])
        results["flower_from"] = prior.get("started")

    if "flower" in parts or "clip" in parts:
        python = args.flower_venv / "bin" / "python"
        if not python.exists():
            raise SystemExit(f"no Flower venv at {args.flower_venv} (see the docstring)")
        flower: list[dict[str, Any]] = []
        if "flower" in parts:
            r = run_flower(python, w, "none", 1.0, w.clip, args.timeout)
            r["epsilon_target"] = None
            flower.append(r)
            for mode in [m for m in args.flower_modes.split(",") if m]:
                kind = "local" if mode == "local" else "central"
                for eps in eps_list:
                    r = run_flower(python, w, mode, sigmas[kind][eps], w.clip, args.timeout)
                    r["epsilon_target"] = eps
                    flower.append(r)
            results["flower"] = flower
        if "clip" in parts:
            top = max(eps_list)
            sweep = []
            for clip in [float(c) for c in args.clips.split(",") if c]:
                r = run_flower(
                    python, w, "central-server", sigmas["central"][top], clip, args.timeout
                )
                r["framework"] = "Flower central-server"
                sweep.append(r)
            results["clip_sweep"] = sweep

    if "fedlearn" in parts:
        root = args.runs_dir or Path(tempfile.mkdtemp(prefix="fedlearn-dp-bench-"))
        modes = [m for m in args.modes.split(",") if m]
        factory = mnist_factory(w.clients, w.epochs)
        if "distributed" in modes:
            t1 = time.perf_counter()
            sigmas["distributed"] = calibrate_distributed(
                w, eps_list, sigmas["central"], model_size(factory)
            )
            results["sigmas"]["distributed"] = {str(e): s for e, s in sigmas["distributed"].items()}
            print(
                f"calibrated sigma for distributed DP on its Skellam event "
                f"({time.perf_counter() - t1:.1f} s): "
                + ", ".join(f"eps {e:g} -> {s:.4f}" for e, s in sigmas["distributed"].items()),
                flush=True,
            )
        cells = [("off", None, 0.0)]
        for mode in modes:
            kind = {"local": "local", "distributed": "distributed"}.get(mode, "central")
            cells += [(mode, eps, sigmas[kind][eps]) for eps in eps_list]
        # the cells are separate processes: with --jobs > 1 they run side by side (their
        # accuracy and epsilon do not depend on it; their round times then mean nothing,
        # which is why the cost part measures on its own)
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = [
                pool.submit(run_fedlearn, w, mode, sigma, root, args.timeout)
                for mode, _, sigma in cells
            ]
            fed = [f.result() for f in futures]
        for r, (_, eps, _) in zip(fed, cells, strict=True):
            r["epsilon_target"] = eps
            r["jobs"] = args.jobs
        for i, (mode, eps, sigma) in enumerate(cells):
            if mode == "distributed" and "error" in fed[i] and args.distributed_api:
                fed[i] = run_fedlearn_distributed_api(w, sigma, factory)
                fed[i]["epsilon_target"] = eps
        results["fedlearn"] = fed
        if args.runs_dir is None:
            shutil.rmtree(root, ignore_errors=True)

    if "cost" in parts:
        top = max(eps_list)
        results["cost"] = []
        for name, clients, rounds in (
            ("peer", args.cost_clients, args.cost_rounds),
            ("mnist", args.clients, args.cost_mnist_rounds),
        ):
            sig = {
                "central": central_noise_multiplier(top, w.delta, rounds),
                "local": local_noise_multiplier(top, w.delta, rounds),
            }
            for blas in (None, 1) if args.cost_blas_one else (None,):
                results["cost"].append(
                    cost(name, clients, rounds, args.cost_reps, sig, w.delta, blas)
                )

    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    results["load_at_end"] = os.getloadavg()
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
