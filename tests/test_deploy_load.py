"""The small version of RELIABILITY.md (c) (``benchmarks/reliability/load.py``): 50
enrolled sites connected at once to one coordinator process (TLS, real admission, a
checkpoint every round), as threads of two processes, for 2 rounds: no update lost."""

from __future__ import annotations

from pathlib import Path

from benchmarks.reliability.load import run_load


def test_fifty_concurrent_sites_lose_no_update(tmp_path: Path) -> None:
    result = run_load(tmp_path, sites=50, procs=2, rounds=2)
    assert result.site_errors == []
    assert result.train_ok == [50, 50] and result.eval_ok == [50, 50]
    assert result.lost_updates == 0 and result.ok
    assert result.round_ms > 0 and 0 < result.coordinator_peak_rss_mib < 1024
