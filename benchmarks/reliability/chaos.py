"""Chaos: sites and the coordinator SIGKILLed at random points of a deployed run.

RELIABILITY.md (b). A real deployment on loopback (``fedlearn server`` and ``fedlearn
client`` processes, TLS, Ed25519 site keys, an allowlist; each site reads its own ``.npz``)
runs a seeded FedAvg of a logistic regression whose training takes ``--delay`` seconds
(0.5-1.5x, per task) and whose model is padded to ``--pad-kib`` KiB, so that training and
uploads last long enough to be struck. A seeded RNG then, in every round:

* SIGKILLs ``--site-kill-fraction`` of the sites, each at a point drawn from: during its
  training, the moment its training ends (its upload), or after its upload (between the
  training and evaluation stages); each killed site is restarted with the same command
  after 0-0.5 s;
* in ``--coordinator-kills`` distinct rounds (not the last), SIGKILLs the coordinator
  during training, during evaluation or just after the round commits, and restarts it
  with the same command at once.

The sites' app appends a line per task phase to a trace file (``tests/chaos_app.py``),
which tells the driver when to strike and, afterwards, where each kill landed. After each
coordinator kill, the run store's rows are read (every committed round); at the end, three
checks:

1. the run finished: the coordinator exited 0, status ``finished``, every round recorded;
2. every row committed before each coordinator kill is still in the store, unchanged, and
   each restart resumed after the round the store held;
3. the final model equals, bit for bit, a replay of the run fed the same recorded
   survivors (:func:`fedlearn.run.replay.replay_run`: each round selects from the recorded
   candidates; exactly the clients recorded as answering answer), and so does every
   round's and client's record.

Usage (from the repo root)::

    python benchmarks/reliability/chaos.py                   # the figure: 20 sites, 10 rounds
    python benchmarks/reliability/chaos.py --seed 1 --keep runs/chaos

Every process this script starts is stopped by its pid when it ends, however it ends
(Ctrl-C and SIGTERM included). ``tests/test_chaos.py`` runs a small version in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
# first, ahead of site-packages: Opacus's wheel installs a top-level package named "benchmarks"
for _path in (REPO, REPO / "tests"):
    sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

from deployment import Deployment, simulated_data  # noqa: E402
from fedlearn.engine.messages import Stage  # noqa: E402
from fedlearn.engine.results import ClientRecord, RoundRecord  # noqa: E402
from fedlearn.engine.store import RunStore  # noqa: E402
from fedlearn.run.replay import Replay, replay_run  # noqa: E402
from run_state import committed_round, table_rows  # noqa: E402

APP = "chaos_app:make_app"
LR = 0.5
RUN_ID = "run"
KEPT_TABLES = ("rounds", "candidates", "client_results", "config_changes", "events", "published")
"""The run store's append-only tables: what a coordinator kill must never lose or change."""
SITE_PHASES = ("training", "upload", "between stages")
COORDINATOR_PHASES = ("training", "evaluation", "just after the commit")


class ChaosError(Exception):
    """The chaos run could not be driven (a round never started, a process would not start)."""


@dataclass(frozen=True)
class ChaosSettings:
    """What to run and how hard to strike."""

    sites: int = 20
    rounds: int = 10
    site_kill_fraction: float = 0.3
    coordinator_kills: int = 3
    seed: int = 0
    delay_s: float = 1.0
    """Mean time a training task takes (each takes 0.5-1.5x this)."""
    pad_kib: int = 2048
    """Model padding, so that uploads last long enough to be struck."""
    stage_timeout_s: float = 10.0
    min_clients: int | None = None
    """Sites connected before a round starts (default: all but a round's kills)."""
    min_train_clients: int | None = None
    """The training quorum (default: a fifth of the sites)."""

    def __post_init__(self) -> None:
        if not 0 <= self.coordinator_kills < self.rounds:
            raise ValueError("coordinator kills: at most one a round, none in the last")
        if self.sites < 2 or not 0 < self.site_kill_fraction < 1:
            raise ValueError("at least 2 sites, and a kill fraction in (0, 1)")

    @property
    def site_kills_per_round(self) -> int:
        return max(1, round(self.site_kill_fraction * self.sites))

    @property
    def quorum(self) -> int:
        return self.min_train_clients or max(1, self.sites // 5)

    @property
    def wait_for(self) -> int:
        return self.min_clients or max(1, self.sites - self.site_kills_per_round)


@dataclass(frozen=True)
class Mark:
    """One line of the trace: a site's task reached ``phase`` at ``at``."""

    site: int
    phase: str
    round: int
    at: float


@dataclass
class SiteKill:
    round: int
    site: int
    aimed: str
    round_started: float
    at: float = 0.0
    landed: str = ""


@dataclass
class CoordinatorKill:
    round: int
    aimed: str
    at: float = 0.0
    committed: int = 0
    """The last committed round when it died."""
    rows: dict[str, list[str]] = field(default_factory=dict)
    """The store's append-only tables right after it died."""
    resumed_after: int | None = None
    """The committed round the next coordinator said it continued from."""
    missed: bool = False
    """The coordinator had already exited (the run was over): nothing was killed."""


@dataclass
class ChaosOutcome:
    settings: ChaosSettings
    root: Path
    wall_s: float
    site_kills: list[SiteKill]
    coordinator_kills: list[CoordinatorKill]
    rounds: list[RoundRecord]
    clients: list[ClientRecord]
    status: str
    coordinator_exit: int | None
    sites_exited_cleanly: int
    lost_rows: list[str]
    replay: Replay | None
    replay_error: str | None = None

    @property
    def finished(self) -> bool:
        numbers = [r.round for r in self.rounds]
        return (
            self.coordinator_exit == 0
            and self.status == "finished"
            and numbers == list(range(1, self.settings.rounds + 1))
        )

    @property
    def kept(self) -> bool:
        resumed = all(k.resumed_after == k.committed for k in self.struck)
        return not self.lost_rows and resumed

    @property
    def struck(self) -> list[CoordinatorKill]:
        """The coordinator kills that killed a running coordinator."""
        return [k for k in self.coordinator_kills if not k.missed]

    @property
    def replayed(self) -> bool:
        return self.replay is not None and self.replay.matches

    @property
    def passed(self) -> bool:
        return self.finished and self.kept and self.replayed


# ------------------------------------------------------------------ the trace


class Trace:
    """Follows the trace file the sites append to; waits for marks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.marks: list[Mark] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="trace")
        self._thread.start()

    def _follow(self) -> None:
        offset, rest = 0, b""
        while not self._stop.wait(0.002):
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            offset += len(data)
            *lines, rest = (rest + data).split(b"\n")
            marks = []
            for line in lines:
                try:
                    site, phase, rnd, at = line.decode().split()
                    marks.append(Mark(int(site), phase, int(rnd), float(at)))
                except ValueError:  # not a mark: nothing to strike on
                    continue
            with self._cond:
                self.marks.extend(marks)
                self._cond.notify_all()

    def wait(
        self,
        match: Callable[[Mark], bool],
        timeout: float,
        give_up: Callable[[], bool] = lambda: False,
    ) -> Mark | None:
        """The first mark that ``match``es, waiting up to ``timeout`` s (None if none came,
        or ``give_up()`` said so)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for mark in self.marks[seen:]:
                    if match(mark):
                        return mark
                seen = len(self.marks)
                left = deadline - time.monotonic()
                if left <= 0 or give_up():
                    return None
                self._cond.wait(min(left, 0.05))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ------------------------------------------------------------------ processes


class Fleet:
    """The coordinator and site processes: started, SIGKILLed and restarted by pid."""

    def __init__(self, d: Deployment, logs: Path) -> None:
        self.d = d
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
        self.started: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self.coordinator_logs: list[Path] = []
        self.sites: dict[int, subprocess.Popen[bytes]] = {}
        self.coordinator: subprocess.Popen[bytes] | None = None
        self._locks = {i: threading.Lock() for i in range(d.num_sites)}
        self._lock = threading.Lock()
        self.closing = False

    def _spawn(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        with self._lock:
            if self.closing:
                raise ChaosError("the fleet is stopping")
            n = sum(1 for _ in self.logs.glob(f"{name}.*.log"))
            path = self.logs / f"{name}.{n}.log"
            log = open(path, "wb")  # noqa: SIM115 - closed in stop_all
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedlearn.cli", *args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self.started.append((proc, log))
        return proc, path

    def start_coordinator(self) -> None:
        proc, path = self._spawn("coordinator", "server", "--config", str(self.coordinator_config))
        self.coordinator = proc
        self.coordinator_logs.append(path)

    @property
    def coordinator_config(self) -> Path:
        return self.d.root / "coordinator.toml"

    def start_site(self, i: int) -> None:
        with self._locks[i]:
            self.sites[i], _ = self._spawn(
                f"site-{i}", "client", "--config", site_config(self.d, i)
            )

    def kill_coordinator(self) -> float:
        assert self.coordinator is not None
        at = time.monotonic()
        self.coordinator.send_signal(signal.SIGKILL)
        self.coordinator.wait(30)
        return at

    def kill_site(self, i: int, restart_after: float, restart: Callable[[], bool]) -> float:
        """SIGKILL site ``i``; restart it ``restart_after`` s later if ``restart()``."""
        with self._locks[i]:
            proc = self.sites[i]
            at = time.monotonic()
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        time.sleep(restart_after)
        if restart():
            self.start_site(i)
        return at

    def stop_all(self) -> None:
        with self._lock:
            self.closing = True
        for proc, log in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            log.close()


def site_config(d: Deployment, i: int) -> str:
    return str(d.root / f"site-{i}.toml")


def write_site(d: Deployment, i: int, settings: ChaosSettings, trace: Path) -> None:
    """Site ``i``'s own data as an .npz (the partition client id ``i`` has in a
    simulation) and its site.toml."""
    part = partitions(d.num_sites, d.seed).client(i)
    npz = d.root / f"site-{i}.npz"
    np.savez(
        npz, x_train=part.x_train, y_train=part.y_train, x_test=part.x_test, y_test=part.y_test
    )
    params = (
        f"{{ lr = {LR}, pad_kib = {settings.pad_kib}, delay_s = {settings.delay_s}, "
        f'trace = "{trace}" }}'
    )
    Path(site_config(d, i)).write_text(
        f"""
[coordinator]
address = "127.0.0.1:{d.port}"
ca = "{d.pki.ca_cert}"
backoff_initial_s = 0.2
backoff_max_s = 1.0
exit_when_finished = true

[site]
name = "site-{i}"
key = "{d.root / f"site-{i}.key"}"

[data]
path = "{npz}"

[client]
app = "{APP}"
params = {params}
"""
    )


@functools.cache
def partitions(num_sites: int, seed: int) -> Any:
    return simulated_data(num_sites, seed)


def app_factory(settings: ChaosSettings) -> Callable[[], Any]:
    """The sites' ClientApp over every site's data, without its delay and trace: what
    the replay runs."""
    from chaos_app import make_app

    return functools.partial(
        make_app, partitions(settings.sites, settings.seed), lr=LR, pad_kib=settings.pad_kib
    )


# ------------------------------------------------------------------ the run


@contextmanager
def _stopping_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the processes are stopped either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_chaos(
    settings: ChaosSettings, root: Path, say: Callable[[str], None] = lambda s: None
) -> ChaosOutcome:
    """Deploy in ``root``, strike, and check what survived (see the module doc)."""
    n = settings.sites
    d = Deployment(
        root,
        num_sites=n,
        rounds=settings.rounds,
        seed=settings.seed,
        stage_timeout_s=settings.stage_timeout_s,
        min_clients=settings.wait_for,
        app=APP,
        params={"lr": LR, "pad_kib": settings.pad_kib},
        strategy_params={"min_train_clients": settings.quorum},
    )
    trace_path = root / "trace.log"
    for i in range(n):
        write_site(d, i, settings, trace_path)
    db = d.state_dir / "run.db"
    rng = random.Random(settings.seed)
    # Not in the last round: a strike timed by what the driver sees might come only after
    # the run has finished (on a loaded machine) and hit nothing.
    strike_rounds = sorted(rng.sample(range(1, settings.rounds), settings.coordinator_kills))
    plan = {r: rng.choice(COORDINATOR_PHASES) for r in strike_rounds}
    fleet = Fleet(d, root / "logs")
    trace = Trace(trace_path)
    site_kills: list[SiteKill] = []
    coordinator_kills: list[CoordinatorKill] = []
    threads: list[threading.Thread] = []
    t0 = time.monotonic()

    def committed() -> int:
        return committed_round(db, RUN_ID)

    def running() -> bool:
        return committed() < settings.rounds

    def coordinator_gone() -> bool:
        return fleet.coordinator is None or fleet.coordinator.poll() is not None

    def strike_site(kill: SiteKill, fraction: float, restart_after: float) -> None:
        def mine(phase: str) -> Callable[[Mark], bool]:
            return lambda m: (
                m.site == kill.site
                and m.phase == phase
                and m.round == kill.round
                and m.at >= kill.round_started
            )

        # A site with a task this round starts it within moments of the round's first
        # (every task is sent at once); one that has none is killed then, wherever it is.
        begun = trace.wait(mine("train-start"), 2.0)
        if begun is not None and kill.aimed == "training":  # tasks train >= 0.5 x delay
            _sleep_until(begun.at + fraction * 0.45 * settings.delay_s)
        elif begun is not None:
            ended = trace.wait(mine("train-end"), 1.5 * settings.delay_s + 2.0)
            if ended is not None and kill.aimed == "between stages":
                _sleep_until(ended.at + 0.3)  # its upload is through; evaluation is to come
        with contextlib.suppress(ChaosError):  # the run is being stopped
            kill.at = fleet.kill_site(kill.site, restart_after, running)

    try:
        with _stopping_on_sigterm():
            fleet.start_coordinator()
            for i in range(n):
                fleet.start_site(i)
            for rnd in range(1, settings.rounds + 1):
                start = trace.wait(
                    lambda m, r=rnd: m.phase == "train-start" and m.round == r,  # type: ignore[misc]
                    timeout=120,
                    give_up=coordinator_gone,
                )
                if start is None:
                    raise ChaosError(f"round {rnd} did not start within 120 s")
                say(f"round {rnd} started at {start.at - t0:.1f} s")
                for site in rng.sample(range(n), settings.site_kills_per_round):
                    kill = SiteKill(rnd, site, rng.choice(SITE_PHASES), start.at)
                    site_kills.append(kill)
                    thread = threading.Thread(
                        target=strike_site,
                        args=(kill, rng.random(), rng.uniform(0.0, 0.5)),
                        daemon=True,
                        name=f"strike-site-{site}",
                    )
                    thread.start()
                    threads.append(thread)
                if rnd in plan:
                    coordinator_kills.append(
                        _strike_coordinator(
                            rnd, plan[rnd], start, rng.uniform(0.1, 0.4), settings, fleet, trace, db
                        )
                    )
                    say(f"coordinator killed in round {rnd} ({plan[rnd]})")
                deadline = time.monotonic() + 120
                while committed() < rnd:
                    if time.monotonic() > deadline:
                        raise ChaosError(f"round {rnd} did not commit within 120 s")
                    if coordinator_gone():
                        raise ChaosError(f"the coordinator exited before round {rnd} committed")
                    time.sleep(0.02)
            assert fleet.coordinator is not None
            try:
                coordinator_exit: int | None = fleet.coordinator.wait(60)
            except subprocess.TimeoutExpired:
                coordinator_exit = None
            for thread in threads:
                thread.join(30)
            # connected sites get the coordinator's goodbye and exit at once; one that
            # restarted after it retries until stopped
            sites_exited_cleanly = _wait_sites(fleet, 5)
    finally:
        fleet.stop_all()
        trace.close()
    wall_s = time.monotonic() - t0
    struck = [k for k in coordinator_kills if not k.missed]
    for k, log in zip(struck, fleet.coordinator_logs[1:], strict=False):
        text = log.read_text(errors="replace")
        found = re.search(r"resuming after committed round (\d+)", text) or re.search(
            r"already finished \((\d+) rounds\)", text
        )
        k.resumed_after = int(found.group(1)) if found else 0 if k.committed == 0 else None
    store = RunStore(db, run_id=RUN_ID, read_only=True)
    try:
        rounds, clients, status = store.rounds(), store.clients(), store.run_info()["status"]
    finally:
        store.close()
    final = table_rows(db, KEPT_TABLES)
    lost = [
        f"coordinator kill {n} (round {k.round}): {table} row {row} lost or changed"
        for n, k in enumerate(coordinator_kills, 1)
        for table in KEPT_TABLES
        for row in sorted(set(k.rows[table]) - set(final[table]))
    ]
    _classify(site_kills, coordinator_kills, trace.marks, clients)
    replay: Replay | None = None
    replay_error: str | None = None
    try:
        replay = replay_run(d.state_dir, app_factory(settings))
    except Exception as exc:  # the figure reports it
        replay_error = f"{type(exc).__name__}: {exc}"
    return ChaosOutcome(
        settings,
        root,
        wall_s,
        site_kills,
        coordinator_kills,
        rounds,
        clients,
        status,
        coordinator_exit,
        sites_exited_cleanly,
        lost,
        replay,
        replay_error,
    )


def _strike_coordinator(
    rnd: int,
    phase: str,
    start: Mark,
    fraction: float,
    settings: ChaosSettings,
    fleet: Fleet,
    trace: Trace,
    db: Path,
) -> CoordinatorKill:
    """SIGKILL the coordinator in round ``rnd`` at ``phase``, read the store, restart it."""
    kill = CoordinatorKill(rnd, phase)
    if phase == "training":
        _sleep_until(start.at + fraction * settings.delay_s)
    elif phase == "evaluation":
        trace.wait(
            lambda m: m.phase == "eval-start" and m.round == rnd and m.at >= start.at,
            timeout=settings.stage_timeout_s + 2 * settings.delay_s + 10,
        )
    else:
        deadline = time.monotonic() + 120
        while committed_round(db, RUN_ID) < rnd and time.monotonic() < deadline:
            time.sleep(0.002)
    assert fleet.coordinator is not None
    kill.missed = fleet.coordinator.poll() is not None
    kill.at = fleet.kill_coordinator()
    kill.committed = committed_round(db, RUN_ID)
    kill.rows = table_rows(db, KEPT_TABLES)
    if not kill.missed:
        fleet.start_coordinator()
    return kill


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def _wait_sites(fleet: Fleet, timeout: float) -> int:
    """How many sites' last processes exit 0 (told the run is over) within ``timeout``."""
    deadline = time.monotonic() + timeout
    clean = 0
    for proc in fleet.sites.values():
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            continue  # restarted after the coordinator's goodbye: stopped with the rest
        clean += code == 0
    return clean


def _classify(
    site_kills: list[SiteKill],
    coordinator_kills: list[CoordinatorKill],
    marks: list[Mark],
    clients: list[ClientRecord],
) -> None:
    """Where each site kill landed, from the site's own marks before it and the record."""
    outcome = {(c.round, c.stage, c.client_id): c.ok for c in clients}
    for kill in site_kills:
        before = [
            m
            for m in marks
            if m.site == kill.site
            and m.round == kill.round
            and kill.round_started <= m.at <= kill.at
        ]
        discarded = any(
            c.committed < kill.round and kill.at < c.at for c in coordinator_kills
        )  # the coordinator died after it, before the round committed: the round ran again
        last = before[-1].phase if before else None
        if last is None:
            kill.landed = "outside its tasks"
        elif last == "train-start":
            kill.landed = "during training"
        elif last == "eval-start":
            kill.landed = "during evaluation"
        elif discarded:
            kill.landed = "after training, in a round re-run"
        elif outcome.get((kill.round, Stage.TRAIN, kill.site)):
            kill.landed = "between stages"
        else:
            kill.landed = "during upload"


# ------------------------------------------------------------------ the figure


def summary(outcome: ChaosOutcome) -> str:
    s = outcome.settings
    lines = [
        f"chaos: {s.sites} sites, {s.rounds} rounds, {s.site_kills_per_round} site SIGKILLs "
        f"per round ({s.site_kill_fraction:.0%}), {s.coordinator_kills} coordinator SIGKILLs, "
        f"seed {s.seed}; delay {s.delay_s:g} s, model {s.pad_kib} KiB, quorum {s.quorum}, "
        f"rounds start with >= {s.wait_for} sites",
        "",
        "round  candidates  train ok/sel  eval ok/sel  failed tasks  site kills  status",
    ]
    failed: dict[int, int] = {}
    for c in outcome.clients:
        failed[c.round] = failed.get(c.round, 0) + (not c.ok)
    kills_in: dict[int, int] = {}
    for k in outcome.site_kills:
        kills_in[k.round] = kills_in.get(k.round, 0) + 1
    for r in outcome.rounds:
        candidates = s.sites if r.candidates is None else len(r.candidates)
        coordinator = [k for k in outcome.coordinator_kills if k.round == r.round]
        note = "ok" if r.ok else f"failed: {r.error}"
        if coordinator:
            note += f"; coordinator killed ({coordinator[0].aimed})"
        lines.append(
            f"{r.round:>5}  {candidates:>10}  {r.train_ok:>6}/{r.train_selected:<5}  "
            f"{r.eval_ok:>5}/{r.eval_selected:<5}  {failed.get(r.round, 0):>12}  "
            f"{kills_in.get(r.round, 0):>10}  {note}"
        )
    landed: dict[str, int] = {}
    for k in outcome.site_kills:
        landed[k.landed] = landed.get(k.landed, 0) + 1
    lines += [
        "",
        f"site kills: {len(outcome.site_kills)} ("
        + ", ".join(f"{v} {k}" for k, v in sorted(landed.items(), key=lambda kv: -kv[1]))
        + ")",
        f"coordinator kills: {len(outcome.coordinator_kills)}",
    ]
    for ck in outcome.coordinator_kills:
        lines.append(
            f"  round {ck.round}, {ck.aimed}: missed, the coordinator had already exited"
            if ck.missed
            else f"  round {ck.round}, {ck.aimed}: store held {ck.committed} committed rounds; "
            f"the restart resumed after round {ck.resumed_after}"
        )
    failed_rounds = [r.round for r in outcome.rounds if not r.ok]
    total_failed = sum(failed.values())
    lines += [
        f"failed tasks: {total_failed}; rounds failed: {len(failed_rounds)} of "
        f"{len(outcome.rounds)}" + (f" ({failed_rounds})" if failed_rounds else ""),
        f"sites whose last process exited 0 at the end: {outcome.sites_exited_cleanly} of "
        f"{s.sites}",
        f"wall time: {outcome.wall_s:.1f} s",
        "",
        f"[{'x' if outcome.finished else ' '}] the run finished: coordinator exit "
        f"{outcome.coordinator_exit}, status {outcome.status}, {len(outcome.rounds)} of "
        f"{s.rounds} rounds recorded",
        f"[{'x' if outcome.kept else ' '}] every row committed before each of the "
        f"{len(outcome.struck)} coordinator kills is kept unchanged"
        + "".join(f"\n      {line}" for line in outcome.lost_rows[:10]),
    ]
    replay = outcome.replay
    if replay is not None:
        model = outcome.root / "state" / "model.safetensors"
        digest = _sha256(model) if model.is_file() else "missing"
        lines.append(
            f"[{'x' if replay.matches else ' '}] the final model (sha256 {digest[:16]}) equals "
            f"the replay fed the recorded survivors, bit for bit; {len(replay.rounds)} rounds "
            f"and {len(replay.clients)} client results replayed, {len(replay.differences)} "
            "differences" + "".join(f"\n      {d}" for d in replay.differences[:10])
        )
    else:
        lines.append(f"[ ] the replay failed: {outcome.replay_error}")
    verdict = "PASS" if outcome.passed else "FAIL"
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    defaults = ChaosSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=defaults.sites)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--site-kill-fraction", type=float, default=defaults.site_kill_fraction)
    parser.add_argument("--coordinator-kills", type=int, default=defaults.coordinator_kills)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--delay", type=float, default=defaults.delay_s, help="training seconds")
    parser.add_argument("--pad-kib", type=int, default=defaults.pad_kib, help="model padding")
    parser.add_argument("--stage-timeout", type=float, default=defaults.stage_timeout_s)
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it")
    args = parser.parse_args(argv)
    settings = ChaosSettings(
        sites=args.sites,
        rounds=args.rounds,
        site_kill_fraction=args.site_kill_fraction,
        coordinator_kills=args.coordinator_kills,
        seed=args.seed,
        delay_s=args.delay,
        pad_kib=args.pad_kib,
        stage_timeout_s=args.stage_timeout,
    )
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load {_load()}", flush=True)
    if args.keep is not None:
        if args.keep.exists():
            shutil.rmtree(args.keep)
        args.keep.mkdir(parents=True)
        root = args.keep
    else:
        root = Path(tempfile.mkdtemp(prefix="fedlearn-chaos-"))
    try:
        outcome = run_chaos(settings, root, say=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print(f"interrupted; every process stopped; the run is in {root}")
        return 130
    print(summary(outcome))
    print(f"load after: {_load()}")
    if args.keep is None:
        if outcome.passed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept for inspection: {root}")
    return 0 if outcome.passed else 1


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
