"""Drift monitoring on the training side: a simulated site whose features shift from round
5 is flagged at round 5 and not before (report.json, the CSV tables, the console); under
secure aggregation the coordinator sees only the sum of the clients' summaries and the
report flags the population; a published version keeps the reference distribution."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedlearn.config.simulation import load_config
from fedlearn.drift.reference import load_reference
from fedlearn.drift.rule import POPULATION
from fedlearn.drift.stats import DataSummary, SummarySpec, summarize
from fedlearn.engine.client_app import ClientContext, EvaluateResult, TrainResult
from fedlearn.engine.messages import Reply, Task
from fedlearn.engine.records import Arrays, Config
from fedlearn.engine.store import RunStore
from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.report.console import print_report
from fedlearn.report.summary import summarize as summarize_run
from fedlearn.run.job import run_job
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation import run_simulation
from fedlearn.simulation.inprocess import InProcessTransport
from fedlearn.strategy import FedAvg, FedBuff

ROOT = Path(__file__).resolve().parents[1]


def _wine(tmp_path: Path, **extra: object):  # type: ignore[no-untyped-def]
    settings: dict[str, object] = {
        "run.rounds": 6,
        "run.clients": 3,
        "run.seed": 7,
        "run.out_dir": str(tmp_path / "run"),
        "data.dataset": "wine",
        "data.partitioner": "iid",
        "client.app": "clients.tabular:make_app",
        # the hook: client 1's features move by 1.5 (standardized units) from round 5 on
        "client.params": {
            "epochs": 1,
            "lr": 0.05,
            "hidden": 8,
            "shift_client": 1,
            "shift_round": 5,
            "shift_offset": 1.5,
        },
        "backend.kind": "inprocess",
        "publish.model": "wine",
        "drift.enabled": True,
    }
    return load_config(None, settings | extra)


def test_a_site_whose_features_shift_from_round_5_is_flagged_at_round_5_and_not_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    run_job(_wine(tmp_path))
    out = tmp_path / "run"
    report = json.loads((out / "report.json").read_text())
    assert report["drift_flagged"] == [{"round": 5, "site": "#1"}]
    scores = {(s["round"], s["site"]): s for s in report["drift"]["scores"]}
    assert len(scores) == 5 * 3  # rounds 2..6 against the round before, 3 sites each
    assert scores[(5, 1)]["psi"] > 0.2 and scores[(5, 1)]["mean_shift"] > 0.5
    # the other sites' data and site 1's before and after the move did not change at all
    assert all(s["psi"] == 0 for key, s in scores.items() if key != (5, 1))

    with open(out / "rounds.csv") as f:
        rounds = list(csv.DictReader(f))
    assert [r["drift_flagged"] for r in rounds] == ["", "", "", "", "#1", ""]
    with open(out / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    flagged = [(r["round"], r["client_id"]) for r in clients if r["drift_flagged"] == "true"]
    assert flagged == [("5", "1")]

    store = RunStore(out / "run.db", "mnist-fedavg", read_only=True)
    try:
        run = summarize_run(store)
        stats = store.data_stats()
    finally:
        store.close()
    console = Console(record=True, width=200)
    print_report(run, console)
    text = console.export_text()
    assert "drift: round 5, #1: PSI" in text and "drift flagged 1 time" in text
    assert all(set(sites) == {0, 1, 2} for sites in stats.values())

    # the published version keeps the last round's summed summary as its reference
    with ModelRegistry(tmp_path / "registry") as registry:
        version = registry.versions("wine")[-1]
    reference = load_reference(version.path)
    assert reference is not None and version.round == 6
    total = stats[6][0] + stats[6][1] + stats[6][2]
    assert reference.summary.count == total.count == 142  # wine's training rows
    assert reference.summary.hist.tolist() == total.hist.tolist()
    assert reference.spec == SummarySpec(12, -3.0, 3.0, features=13, classes=3)


def test_under_secure_aggregation_the_population_is_flagged_and_the_report_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    run_job(_wine(tmp_path, **{"secagg.enabled": True, "publish.enabled": False}))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["drift_flagged"] == [{"round": 5, "site": "population"}]
    assert report["drift"]["secure"] is True
    assert "no site can be flagged" in report["drift"]["note"]
    assert {s["site"] for s in report["drift"]["scores"]} == {POPULATION}


# ---------------------------------------------------------------- what the coordinator sees

SPEC = SummarySpec(bins=6, low=-3.0, high=3.0, features=2, classes=2)


class StatsApp:
    """A numpy ClientApp over fixed per-client data that can summarize it."""

    def __init__(self) -> None:
        rng = np.random.default_rng(3)
        sizes = (20, 35, 50)
        self.data = [(rng.normal(0, 1, (n, 2)), rng.integers(0, 2, n)) for n in sizes]

    def initial_arrays(self, seed: int) -> Arrays:
        return {"w": np.zeros(2, np.float32)}

    def train(self, arrays: Arrays, config: Config, ctx: ClientContext) -> TrainResult:
        x, _ = self.data[ctx.client_id]
        w = (arrays["w"] + 0.01 * x.mean(axis=0)).astype(np.float32)
        return TrainResult({"w": w}, len(x))

    def evaluate(self, arrays: Arrays, config: Config, ctx: ClientContext) -> EvaluateResult:
        return EvaluateResult(len(self.data[ctx.client_id][0]), 0.5)

    def data_summary(self, spec: SummarySpec, ctx: ClientContext) -> DataSummary:
        x, y = self.data[ctx.client_id]
        return summarize(x, y, spec)


class Recording(InProcessTransport):
    """Keeps every reply that reaches the coordinator."""

    def __init__(self) -> None:
        super().__init__(StatsApp)
        self.replies: list[Reply] = []

    def execute(self, broadcast: Arrays, tasks: Sequence[Task]) -> Iterator[Reply]:
        for reply in super().execute(broadcast, tasks):
            self.replies.append(reply)
            yield reply


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_the_coordinator_sees_each_summary_or_under_secagg_only_their_sum(secure: bool) -> None:
    transport = Recording()
    result = run_simulation(
        StatsApp,
        FedAvg(),
        num_clients=3,
        rounds=2,
        backend=transport,
        secure=SecureAggregation(clip=1.0) if secure else None,
        data_stats=SPEC,
    )
    app = StatsApp()
    own = [summarize(x, y, SPEC) for x, y in app.data]
    total = own[0] + own[1] + own[2]
    for record in result.rounds:
        assert record.ok
        if not secure:
            assert sorted(record.data_stats) == [0, 1, 2]
            for cid, summary in record.data_stats.items():
                assert summary.hist.tolist() == own[cid].hist.tolist()
            continue
        assert list(record.data_stats) == [POPULATION]
        population = record.data_stats[POPULATION]
        assert population.count == total.count == 105
        # the secure sum's quantization error: survivors / 2^(s+1) per coordinate, over clip
        assert np.allclose(population.hist, total.hist, atol=1e-2)
        assert np.allclose(population.labels, total.labels, atol=1e-2)
        assert np.allclose(population.sums, total.sums, atol=1e-1)
    carried = [r for r in transport.replies if r.arrays and any("drift/" in k for k in r.arrays)]
    if secure:
        # no reply carries a client's summary in the clear: only masked protocol messages
        assert carried == [] and all(r.arrays is None for r in transport.replies)
    else:
        assert len(carried) == 6  # 3 clients x 2 rounds


def test_an_asynchronous_strategy_refuses_drift_monitoring() -> None:
    with pytest.raises(ConfigError, match="asynchronous"):
        run_simulation(
            StatsApp,
            FedBuff(buffer_size=2, concurrency=2),
            num_clients=3,
            rounds=1,
            data_stats=SPEC,
        )
