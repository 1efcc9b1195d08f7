"""Drift monitoring over gRPC: real site daemons on loopback (TLS) report their data
summaries every round, in the clear or only inside the secure sum; the coordinator's
store keeps them and its published version gets the reference distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deployment import Deployment, in_process_coordinator, simulated_data
from fedlearn.config.simulation import DriftSection
from fedlearn.drift.reference import load_reference
from fedlearn.drift.rule import POPULATION
from fedlearn.drift.stats import SummarySpec, summarize
from fedlearn.errors import ConfigError
from fedlearn.registry.model_registry import ModelRegistry
from fedlearn.run.builders import make_drift
from fedlearn.secagg.stages import SecureAggregation

PUBLISH = {
    "publish.enabled": True,
    "publish.model": "bc",
    "publish.factory": "clients.tabular:build_model",
    "publish.factory_params": {"in_features": 30, "num_classes": 2, "hidden": 32},
    "publish.inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}],
    "publish.outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}],
}


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_sites_report_their_data_summaries_over_grpc(tmp_path: Path, secure: bool) -> None:
    d = Deployment(tmp_path, rounds=2, strategy_params={"min_train_clients": 3})
    overrides: dict[str, object] = {
        **PUBLISH,
        "drift.enabled": True,
        "drift.features": 30,
        "drift.classes": 2,
    }
    if secure:
        overrides["secagg.enabled"] = True
    with in_process_coordinator(d, overrides) as c:
        for i in range(d.num_sites):
            c.start_site(i)
        c.wait(120)
        store = c.store()
        try:
            stats = store.data_stats()
        finally:
            store.close()
    spec = SummarySpec(12, -3.0, 3.0, 30, 2)
    data = simulated_data(d.num_sites, d.seed)
    own = [summarize(data.client(i).x_train, data.client(i).y_train, spec) for i in range(3)]
    total = own[0] + own[1] + own[2]
    assert sorted(stats) == [1, 2]
    for sites in stats.values():
        if secure:
            assert list(sites) == [POPULATION]
            assert sites[POPULATION].count == total.count
            assert np.allclose(sites[POPULATION].hist, total.hist, atol=0.05)
        else:
            assert sorted(sites) == [0, 1, 2]  # client ids of site-0..2
            assert sum(s.count for s in sites.values()) == total.count
    with ModelRegistry(d.state_dir / "registry") as registry:
        (version,) = registry.versions("bc")
    reference = load_reference(version.path)
    assert reference is not None and reference.spec == spec
    assert np.allclose(reference.summary.hist, total.hist, atol=0.05)


def test_make_drift_refuses_what_cannot_work() -> None:
    on = DriftSection(enabled=True)
    assert make_drift(DriftSection(), None) is None
    assert make_drift(on, None, features=4, classes=2) == SummarySpec(12, -3.0, 3.0, 4, 2)
    with pytest.raises(ConfigError, match=r"drift\.features"):
        make_drift(on, SecureAggregation())
    assert make_drift(on, SecureAggregation(), features=4, classes=2) is not None
