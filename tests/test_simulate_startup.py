"""What ``fedlearn simulate`` does to start and end faster: the report's plots drawn by a
child forked at start-up (the same bytes as drawn in-process), and the collector off
during start-up, frozen when the first stage starts (only in the program's own process)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedlearn.cli.collector import StartupCollector
from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import RunStore
from fedlearn.errors import FedlearnError
from fedlearn.report import plot_process
from fedlearn.report.files import write_report
from fedlearn.report.plots import can_plot, plot_clients, plot_metrics
from fedlearn.report.summary import summarize

pytestmark = pytest.mark.skipif(not can_plot(), reason="needs matplotlib (the report extra)")

T, E = Stage.TRAIN, Stage.EVALUATE
FILES = (
    "report.json",
    "clients.csv",
    "rounds.csv",
    "metrics_per_round.png",
    "clients_per_round.png",
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    """Two rounds of three clients (round 2: one client fails to evaluate)."""
    s = RunStore(tmp_path / "run.db", run_id="r")
    s.start_run(seed=1, config={"rounds": 2})
    empty: dict[str, np.ndarray] = {}
    for rnd in (1, 2):
        clients = [ClientRecord(rnd, T, c, True, 10 * c, None, {}) for c in (1, 2, 3)]
        clients += [
            ClientRecord(rnd, E, c, True, 10 * c, 1.0 / c, {"accuracy": 0.2 * c + 0.1 * rnd})
            for c in (1, 2)
        ]
        clients.append(ClientRecord(rnd, E, 3, rnd == 1, 30, 0.5, {"accuracy": 0.5}))
        record = RoundRecord(rnd, True, 3, 3, 3, 3 - (rnd == 2), {}, {}, 0.1)
        s.record_round(record, clients, empty, empty)
    s.set_status("finished")
    yield s
    s.close()


def test_the_child_draws_the_same_bytes_as_this_process(store: RunStore, tmp_path: Path) -> None:
    report = summarize(store)
    child = plot_process.PlotProcess()
    try:
        metrics, clients = tmp_path / "m.png", tmp_path / "c.png"
        assert child.request(store.path, "r", {"metrics": metrics, "clients": clients})
        assert child.wait() is True
    finally:
        child.close()
    assert metrics.read_bytes() == plot_metrics(report)
    assert clients.read_bytes() == plot_clients(report)


def test_write_report_uses_the_active_child_and_writes_identical_files(
    store: RunStore, tmp_path: Path
) -> None:
    write_report(store, tmp_path / "here")
    child = plot_process.start_plot_process()
    assert child is not None and plot_process.active() is child
    try:
        write_report(store, tmp_path / "child")
    finally:
        child.close()
    assert plot_process.active() is None
    for name in FILES:
        assert (tmp_path / "child" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()


def test_a_failure_in_the_child_is_raised_here(tmp_path: Path) -> None:
    child = plot_process.PlotProcess()
    try:
        assert child.request(tmp_path / "missing.db", "r", {"metrics": tmp_path / "m.png"})
        with pytest.raises(FedlearnError, match=r"missing\.db does not exist"):
            child.wait()
    finally:
        child.close()
    assert not (tmp_path / "m.png").exists()


def test_plots_are_drawn_here_when_the_child_is_gone(store: RunStore, tmp_path: Path) -> None:
    write_report(store, tmp_path / "here")
    child = plot_process.PlotProcess()
    child._process.kill()
    child._process.join()
    try:
        write_report(store, tmp_path / "fallback")
    finally:
        child.close()
    for name in FILES:
        assert (tmp_path / "fallback" / name).read_bytes() == (
            tmp_path / "here" / name
        ).read_bytes()


def test_the_collector_is_off_until_the_first_stage_then_startup_is_frozen() -> None:
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    collector = StartupCollector(active=True)
    try:
        assert not gc.isenabled()
        collector.stage_started(1, T, 3)
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen
        gc.disable()
        collector.stage_started(1, E, 3)  # once only
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()


def test_outside_the_program_s_process_the_collector_is_left_alone() -> None:
    collector = StartupCollector()  # a test process never called mark_command_process()
    assert not collector.active
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    collector.stage_started(1, T, 3)
    collector.started()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
