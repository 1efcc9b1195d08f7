"""Tests for fedlearn.report: summary numbers, report files and the terminal tables."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from fedlearn.engine.messages import Stage
from fedlearn.engine.results import ClientRecord, RoundRecord
from fedlearn.engine.store import RunStore
from fedlearn.report.console import print_report
from fedlearn.report.files import write_report
from fedlearn.report.summary import ClientFailure, Report, lower_is_better, summarize

T, E = Stage.TRAIN, Stage.EVALUATE
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUND2_ERROR = (
    "round 2: 1 of 3 clients returned valid updates, below the quorum of 2; "
    "the global model is unchanged"
)

# --------------------------------------------------------------------------- fixtures
#
# Round 1: clients 3, 5, 7 train and evaluate.
#   client  n   accuracy  loss  f1   calib_error
#   3       30  0.8       2.5   0.7  0.1
#   5       60  1.0       0.1   0.9  0.3
#   7       10  0.5       2.0   0.6  0.2
#   accuracy: weighted mean (24 + 60 + 5) / 100 = 0.89, worst 0.5 (#7),
#             p10 0.56, p50 0.8, p90 0.96
#   loss:     weighted mean (75 + 6 + 20) / 100 = 1.01, worst 2.5 (#3, the maximum)
#   f1 (higher is better): worst 0.6 (#7); calib_error (lower is better): worst 0.3 (#5)
# Round 2 fails: training clients 5 and 7 fail, client 7 also fails evaluation.
#   accuracy of 3 (n 30) 0.6 and 5 (n 60) 0.9: mean 0.8, worst 0.6 (#3), p50 0.75
# Round 3: trains fine, no evaluation.


def round1() -> tuple[RoundRecord, list[ClientRecord]]:
    clients = [
        ClientRecord(1, T, 3, True, 30, None, {"train_loss": 0.9}),
        ClientRecord(1, T, 5, True, 60, None, {"train_loss": 0.4}),
        ClientRecord(1, T, 7, True, 10, None, {"train_loss": 1.2}),
        ClientRecord(
            1, E, 3, True, 30, 2.5,
            {"accuracy": 0.8, "f1": 0.7, "calib_error": 0.1, "device": "cpu", "converged": True},
        ),
        ClientRecord(1, E, 5, True, 60, 0.1, {"accuracy": 1.0, "f1": 0.9, "calib_error": 0.3}),
        ClientRecord(1, E, 7, True, 10, 2.0, {"accuracy": 0.5, "f1": 0.6, "calib_error": 0.2}),
    ]  # fmt: skip
    rnd = RoundRecord(1, True, 3, 3, 3, 3, {"train_loss": 0.6}, {"accuracy": 0.89}, 1.5)
    return rnd, clients


def round2() -> tuple[RoundRecord, list[ClientRecord]]:
    clients = [
        ClientRecord(2, T, 3, True, 30, None, {"train_loss": 0.8}),
        ClientRecord(2, T, 5, False, 0, error="timeout after 30s"),
        ClientRecord(2, T, 7, False, 10, error="array 'w' contains NaN or Inf"),
        ClientRecord(2, E, 3, True, 30, 1.0, {"accuracy": 0.6}),
        ClientRecord(2, E, 5, True, 60, 0.2, {"accuracy": 0.9}),
        ClientRecord(2, E, 7, False, 0, error="connection [reset] by peer"),
    ]
    rnd = RoundRecord(2, False, 3, 1, 3, 2, {}, {"accuracy": 0.8}, 0.5, ROUND2_ERROR)
    return rnd, clients


def round3() -> tuple[RoundRecord, list[ClientRecord]]:
    clients = [ClientRecord(3, T, cid, True, 10, None, {}) for cid in (3, 5, 7)]
    return RoundRecord(3, True, 3, 3, duration_s=0.25), clients


def record(store: RunStore, rounds: Sequence[tuple[RoundRecord, list[ClientRecord]]]) -> None:
    empty: dict[str, np.ndarray] = {}
    for rnd, clients in rounds:
        store.record_round(rnd, clients, empty, empty)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    s = RunStore(tmp_path / "run.db")
    s.start_run(seed=7, config={"rounds": 3, "strategy": "fedavg"})
    record(s, [round1(), round2(), round3()])
    s.set_status("finished")
    yield s
    s.close()


@pytest.fixture
def report(store: RunStore) -> Report:
    return summarize(store)


def rendered(report: Report, **kwargs: int) -> str:
    console = Console(record=True, width=220, color_system=None)
    print_report(report, console, **kwargs)
    return console.export_text()


def strict_json(path: Path) -> object:
    def refuse(token: str) -> object:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- summary


def test_metric_direction() -> None:
    assert lower_is_better("loss")
    assert lower_is_better("val_loss")
    assert lower_is_better("calib_error")
    assert lower_is_better("Top1_Error")
    assert not lower_is_better("accuracy")
    assert not lower_is_better("f1")
    assert not lower_is_better("loss_scale_reached")


def test_run_and_round_counts(report: Report) -> None:
    assert report.run_id == "run"
    assert report.status == "finished"
    assert report.seed == 7
    assert report.config == {"rounds": 3, "strategy": "fedavg"}
    assert [r.round for r in report.rounds] == [1, 2, 3]
    r1, r2, r3 = report.rounds
    assert (r1.ok, r1.error, r1.duration_s) == (True, None, 1.5)
    assert (r1.train_selected, r1.train_ok, r1.train_failed) == (3, 3, 0)
    assert (r1.eval_selected, r1.eval_ok, r1.eval_failed) == (3, 3, 0)
    assert (r2.ok, r2.error) == (False, ROUND2_ERROR)
    assert (r2.train_selected, r2.train_ok, r2.train_failed) == (3, 1, 2)
    assert (r2.eval_selected, r2.eval_ok, r2.eval_failed) == (3, 2, 1)
    assert (r3.eval_selected, r3.eval_ok, r3.eval_failed) == (0, 0, 0)
    assert r3.metrics == {}
    assert r1.train_metrics == {"train_loss": 0.6}
    assert r2.eval_metrics == {"accuracy": 0.8}
    assert report.failed_rounds == (2,)
    assert not report.ok


def test_accuracy_summary(report: Report) -> None:
    acc = report.rounds[0].metric("accuracy")
    assert acc is not None
    assert not acc.lower_is_better
    assert acc.mean == pytest.approx(0.89)
    assert (acc.worst, acc.worst_client) == (0.5, 7)
    assert acc.p10 == pytest.approx(0.56)
    assert acc.p50 == pytest.approx(0.8)
    assert acc.p90 == pytest.approx(0.96)
    assert (acc.clients, acc.num_examples, acc.nonfinite_clients) == (3, 100, ())

    acc2 = report.rounds[1].metric("accuracy")
    assert acc2 is not None
    assert acc2.mean == pytest.approx(0.8)
    assert (acc2.worst, acc2.worst_client) == (0.6, 3)
    assert acc2.p50 == pytest.approx(0.75)
    assert acc2.clients == 2


def test_loss_worst_is_the_maximum(report: Report) -> None:
    loss = report.rounds[0].metric("loss")
    assert loss is not None
    assert loss.lower_is_better
    assert loss.mean == pytest.approx(1.01)
    assert (loss.worst, loss.worst_client) == (2.5, 3)
    assert loss.p50 == pytest.approx(2.0)


def test_user_metrics(report: Report) -> None:
    assert report.metric_names == ("loss", "accuracy", "calib_error", "f1")
    r1 = report.rounds[0]
    f1, calib = r1.metric("f1"), r1.metric("calib_error")
    assert f1 is not None and calib is not None
    assert (f1.worst, f1.worst_client) == (0.6, 7)
    assert f1.mean == pytest.approx((0.7 * 30 + 0.9 * 60 + 0.6 * 10) / 100)
    assert (calib.worst, calib.worst_client) == (0.3, 5)
    assert calib.lower_is_better
    assert r1.metric("device") is None  # strings and booleans are not metrics
    assert r1.metric("converged") is None
    assert report.rounds[1].metric("f1") is None  # nobody reported it in round 2


def test_failures_name_client_stage_and_error(report: Report) -> None:
    assert report.failures == (
        ClientFailure(2, T, 5, "timeout after 30s"),
        ClientFailure(2, T, 7, "array 'w' contains NaN or Inf"),
        ClientFailure(2, E, 7, "connection [reset] by peer"),
    )


def test_clients_are_in_round_stage_client_order(report: Report) -> None:
    keys = [(c.round, c.stage, c.client_id) for c in report.clients]
    assert keys[:6] == [(1, T, 3), (1, T, 5), (1, T, 7), (1, E, 3), (1, E, 5), (1, E, 7)]
    assert len(keys) == 15


def test_ties_name_the_smallest_client_and_zero_weights_fall_back(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db")
    store.start_run(seed=0, config={})
    clients = [
        ClientRecord(1, E, 9, True, 0, 1.0, {"accuracy": 0.4}),
        ClientRecord(1, E, 4, True, 0, 1.0, {"accuracy": 0.4}),
        ClientRecord(1, E, 6, True, 0, 0.5, {"accuracy": 1.0}),
    ]
    record(store, [(RoundRecord(1, True, 0, 0, 3, 3), clients)])
    acc = summarize(store).rounds[0].metric("accuracy")
    loss = summarize(store).rounds[0].metric("loss")
    store.close()
    assert acc is not None and loss is not None
    assert acc.worst_client == 4 and loss.worst_client == 4
    assert acc.mean == pytest.approx(0.6)  # no examples recorded: the plain mean


def test_nonfinite_values_are_left_out_and_named(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db")
    store.start_run(seed=0, config={})
    clients = [
        ClientRecord(1, E, 1, True, 10, 0.3, {"accuracy": 0.7}),
        ClientRecord(1, E, 2, True, 10, 0.4, {"accuracy": math.nan}),
        ClientRecord(1, E, 3, True, 10, 0.5, {"accuracy": 0.9, "aux": math.inf}),
    ]
    record(store, [(RoundRecord(1, True, 3, 3, 3, 3), clients)])
    store.set_status("finished")
    files = write_report(store, tmp_path / "out")
    store.close()
    acc = files.report.rounds[0].metric("accuracy")
    assert acc is not None
    assert acc.mean == pytest.approx(0.8)
    assert (acc.clients, acc.nonfinite_clients) == (2, (2,))
    assert files.report.rounds[0].metric("aux") is None
    assert "aux" in files.report.metric_names
    data = strict_json(files.report_json)  # NaN/inf become null, so the JSON is standard
    assert isinstance(data, dict)
    assert data["clients"][1]["metrics"]["accuracy"] is None
    rows = read_csv(files.clients_csv)
    assert math.isnan(float(rows[1]["accuracy"]))
    assert "accuracy is NaN or infinite for client(s) #2" in rendered(files.report)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 1000),
            st.floats(0, 1, allow_nan=False),
            st.floats(0, 100, allow_nan=False),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_summary_matches_a_direct_computation(rows: list[tuple[int, float, float]]) -> None:
    store = RunStore(":memory:")
    store.start_run(seed=0, config={})
    clients = [
        ClientRecord(1, E, cid, True, n, loss, {"accuracy": acc})
        for cid, (n, acc, loss) in enumerate(rows)
    ]
    record(store, [(RoundRecord(1, True, 0, 0, len(rows), len(rows)), clients)])
    r = summarize(store).rounds[0]
    store.close()
    acc, loss = r.metric("accuracy"), r.metric("loss")
    assert acc is not None and loss is not None
    n = np.array([row[0] for row in rows], dtype=float)
    accs = np.array([row[1] for row in rows])
    losses = np.array([row[2] for row in rows])
    assert acc.mean == pytest.approx(float(n @ accs / n.sum()), abs=1e-12)
    assert loss.mean == pytest.approx(float(n @ losses / n.sum()), rel=1e-12, abs=1e-12)
    assert acc.worst == accs.min() and accs[acc.worst_client] == acc.worst
    assert loss.worst == losses.max() and losses[loss.worst_client] == loss.worst
    assert acc.worst_client == int(np.argmin(accs))  # first (smallest id) on ties
    for s, values in ((acc, accs), (loss, losses)):
        expected = np.percentile(values, [10, 50, 90])
        assert [s.p10, s.p50, s.p90] == pytest.approx(list(expected))
        assert min(values) <= s.p10 <= s.p50 <= s.p90 <= max(values)
        assert min(values) - 1e-9 <= s.mean <= max(values) + 1e-9


# --------------------------------------------------------------------------- files


def test_report_json_round_trips(store: RunStore, tmp_path: Path) -> None:
    files = write_report(store, tmp_path / "out")
    assert files.report == summarize(store)
    data = strict_json(files.report_json)
    assert isinstance(data, dict)
    history = data["run"].pop("history")
    assert [(e["kind"], e["round"], e["detail"]) for e in history] == [("started", 0, None)]
    assert data["run"].pop("config_changes") == []
    assert data["run"] == {
        "run_id": "run",
        "status": "finished",
        "seed": 7,
        "created": files.report.created,
        "config": {"rounds": 3, "strategy": "fedavg"},
    }
    assert data["ok"] is False
    assert data["failed_rounds"] == [2]
    assert data["metric_names"] == ["loss", "accuracy", "calib_error", "f1"]
    assert data["lower_is_better"] == ["loss", "calib_error"]
    r1, r2, r3 = data["rounds"]
    acc = r1["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.89)
    assert (acc["worst"], acc["worst_client"]) == (0.5, 7)
    assert [acc["p10"], acc["p50"], acc["p90"]] == pytest.approx([0.56, 0.8, 0.96])
    assert r1["metrics"]["loss"]["worst_client"] == 3
    assert (r2["ok"], r2["error"], r2["train_failed"]) == (False, ROUND2_ERROR, 2)
    assert r3["metrics"] == {}
    assert data["failures"] == [
        {"round": 2, "stage": "train", "client_id": 5, "error": "timeout after 30s"},
        {"round": 2, "stage": "train", "client_id": 7, "error": "array 'w' contains NaN or Inf"},
        {"round": 2, "stage": "evaluate", "client_id": 7, "error": "connection [reset] by peer"},
    ]
    evaluations = [c for c in data["clients"] if c["stage"] == "evaluate" and c["ok"]]
    assert [(c["round"], c["client_id"], c["num_examples"], c["loss"]) for c in evaluations] == [
        (1, 3, 30, 2.5), (1, 5, 60, 0.1), (1, 7, 10, 2.0), (2, 3, 30, 1.0), (2, 5, 60, 0.2),
    ]  # fmt: skip
    assert evaluations[0]["metrics"]["accuracy"] == 0.8


def test_clients_csv_round_trips(store: RunStore, tmp_path: Path) -> None:
    files = write_report(store, tmp_path)
    with files.clients_csv.open(newline="") as f:
        header = next(csv.reader(f))
    assert header == [
        "round", "stage", "client_id", "ok", "num_examples", "loss",
        "accuracy", "calib_error", "converged", "device", "f1", "train_loss", "error",
    ]  # fmt: skip
    rows = read_csv(files.clients_csv)
    assert len(rows) == 15
    by_key = {(r["round"], r["stage"], r["client_id"]): r for r in rows}
    c7 = by_key[("1", "evaluate", "7")]
    assert (c7["ok"], c7["num_examples"], float(c7["loss"])) == ("true", "10", 2.0)
    assert (float(c7["accuracy"]), float(c7["f1"]), c7["error"]) == (0.5, 0.6, "")
    c3 = by_key[("1", "evaluate", "3")]
    assert (c3["device"], c3["converged"]) == ("cpu", "true")
    failed = by_key[("2", "train", "7")]
    assert (failed["ok"], failed["loss"], failed["error"]) == (
        "false", "", "array 'w' contains NaN or Inf",
    )  # fmt: skip
    accs = [float(r["accuracy"]) for r in rows if r["round"] == "1" and r["stage"] == "evaluate"]
    weights = [
        int(r["num_examples"]) for r in rows if r["round"] == "1" and r["stage"] == "evaluate"
    ]
    assert np.average(accs, weights=weights) == pytest.approx(0.89)


def test_rounds_csv_round_trips(store: RunStore, tmp_path: Path) -> None:
    files = write_report(store, tmp_path)
    rows = read_csv(files.rounds_csv)
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    r1, r2, r3 = rows
    assert float(r1["accuracy_mean"]) == pytest.approx(0.89)
    assert (float(r1["accuracy_worst"]), r1["accuracy_worst_client"]) == (0.5, "7")
    assert float(r1["accuracy_p10"]) == pytest.approx(0.56)
    assert float(r1["accuracy_p50"]) == pytest.approx(0.8)
    assert float(r1["accuracy_p90"]) == pytest.approx(0.96)
    assert r1["accuracy_clients"] == "3"
    assert float(r1["loss_mean"]) == pytest.approx(1.01)
    assert (float(r1["loss_worst"]), r1["loss_worst_client"]) == (2.5, "3")
    assert (r1["calib_error_worst_client"], r1["f1_worst_client"]) == ("5", "7")
    assert (r1["ok"], r1["error"], r1["train_ok"], r1["eval_failed"]) == ("true", "", "3", "0")
    assert (r2["ok"], r2["error"], r2["train_failed"], r2["eval_failed"]) == (
        "false", ROUND2_ERROR, "2", "1",
    )  # fmt: skip
    assert float(r2["accuracy_mean"]) == pytest.approx(0.8)
    assert (r2["f1_mean"], r3["accuracy_mean"], r3["eval_selected"]) == ("", "", "0")


def test_plots_are_valid_pngs(store: RunStore, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    files = write_report(store, tmp_path)
    for path in (files.metrics_png, files.clients_png):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 10_000
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 600
        assert float(np.std(image)) > 0.01  # not a blank canvas
    names = {p.name for p in tmp_path.iterdir() if not p.name.startswith("run.db")}
    assert names == {
        "clients.csv",
        "clients_per_round.png",
        "metrics_per_round.png",
        "report.json",
        "rounds.csv",
    }  # no temporary files left behind


def test_write_report_overwrites_and_creates_the_directory(store: RunStore, tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    first = write_report(store, out)
    second = write_report(store, out)
    assert first.report_json == second.report_json == out / "report.json"
    assert not list(out.glob(".*.tmp"))


def test_empty_run(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db")
    store.start_run(seed=1, config={})
    files = write_report(store, tmp_path)
    store.close()
    report = files.report
    assert (report.rounds, report.failures, report.clients) == ((), (), ())
    assert report.status == "running" and not report.ok
    assert read_csv(files.rounds_csv) == []
    assert files.metrics_png.read_bytes().startswith(PNG_MAGIC)
    assert files.clients_png.read_bytes().startswith(PNG_MAGIC)
    data = strict_json(files.report_json)
    assert isinstance(data, dict) and data["rounds"] == [] and data["failures"] == []
    text = rendered(report)
    assert "no rounds recorded" in text
    assert "Run run: running - 0 rounds, 0 client failures" in text


def test_clients_plot_falls_back_to_loss(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db")
    store.start_run(seed=0, config={})
    clients = [ClientRecord(1, E, c, True, 5, 0.1 * c) for c in range(1, 5)]
    record(store, [(RoundRecord(1, True, 0, 0, 4, 4), clients)])
    files = write_report(store, tmp_path)
    store.close()
    assert files.report.rounds[0].metric("accuracy") is None
    assert files.clients_png.read_bytes().startswith(PNG_MAGIC)
    row = table_rows(rendered(files.report))["1"]
    assert row[4:9] == ["-"] * 5  # no accuracy
    assert row[9:] == ["0.2500", "0.4000 (#4)"]


def test_importing_the_modules_loads_no_plotting_or_terminal_library() -> None:
    code = (
        "import sys, fedlearn.report.files, fedlearn.report.console; "
        "bad = [m for m in ('matplotlib', 'rich') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --------------------------------------------------------------------------- terminal


def table_rows(text: str) -> dict[str, list[str]]:
    """The cells of each table row (cells are two or more spaces apart), by first cell."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) > 1:
            rows.setdefault(cells[0], cells)
    return rows


def test_print_report_rounds_table(report: Report) -> None:
    text = rendered(report)
    assert "Run run: evaluation per round" in text
    rows = table_rows(text)
    assert rows["1"] == [
        "1", "ok", "3/3", "3/3", "0.8900", "0.5000 (#7)", "0.5600", "0.8000", "0.9600",
        "1.0100", "2.5000 (#3)",
    ]  # fmt: skip
    assert rows["2"][:6] == ["2", "FAILED", "1/3", "2/3", "0.8000", "0.6000 (#3)"]
    assert rows["3"] == ["3", "ok", "3/3", "-", "-", "-", "-", "-", "-", "-", "-"]


def test_print_report_failures(report: Report) -> None:
    text = rendered(report)
    assert "Failed rounds" in text
    assert "below the quorum of 2" in text
    assert "Client failures (3)" in text
    lines = [line for line in text.splitlines() if "timeout after 30s" in line]
    assert len(lines) == 1 and "train" in lines[0] and "5" in lines[0]
    # Error text is shown verbatim, never read as rich markup.
    assert "connection [reset] by peer" in text
    assert text.rstrip().splitlines()[-1] == (
        "Run run: finished - 3 rounds, 1 failed (2), 3 client failures"
    )


def test_print_report_limits_listed_failures(report: Report) -> None:
    text = rendered(report, max_failures=1)
    assert "timeout after 30s" in text
    assert "contains NaN or Inf" not in text
    assert "... and 2 more client failures (see report.json)" in text


def test_print_report_clean_run(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run.db")
    store.start_run(seed=0, config={})
    record(store, [round1()])
    store.set_status("finished")
    report = summarize(store)
    store.close()
    assert report.ok and report.failures == ()
    text = rendered(report)
    assert "Client failures" not in text and "Failed rounds" not in text
    assert text.rstrip().splitlines()[-1] == "Run run: finished - 1 rounds, 0 client failures"


def test_print_report_defaults_to_a_console(
    report: Report, capsys: pytest.CaptureFixture[str]
) -> None:
    print_report(report)  # an 80-column terminal: numbers are never cut
    out = capsys.readouterr().out
    assert all(n in out for n in ("0.8900", "0.5600", "0.9600", "1.0100", "(#7)"))
