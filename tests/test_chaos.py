"""Chaos, small: sites and the coordinator SIGKILLed mid-round, and nothing committed is lost.

The CI version of RELIABILITY.md (b) (``benchmarks/reliability/chaos.py``): 5 site
processes and a coordinator over TLS on loopback, 4 rounds, 2 sites SIGKILLed at random
points of every round and restarted, the coordinator SIGKILLed once and restarted with
the same command. The run finishes; every row committed before the coordinator's kill is
still there unchanged and the restart resumed after it; the final model equals, bit for
bit, the replay fed the recorded survivors.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.reliability.chaos import ChaosSettings, run_chaos, summary


def test_sites_and_coordinator_killed_mid_round_lose_nothing(tmp_path: Path) -> None:
    settings = ChaosSettings(sites=5, rounds=4, coordinator_kills=1, delay_s=0.3, pad_kib=32)
    outcome = run_chaos(settings, tmp_path)
    report = summary(outcome)

    assert outcome.finished, report
    assert outcome.kept, report
    assert outcome.replay is not None and outcome.replay.differences == [], report
    assert report.endswith("verdict: PASS")

    # the strikes happened: 2 SIGKILLs a round, the coordinator once, each restarted
    assert [k.round for k in outcome.site_kills] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert all(k.at > 0 and k.landed for k in outcome.site_kills), report
    [kill] = outcome.coordinator_kills
    assert not kill.missed and kill.resumed_after == kill.committed < settings.rounds
    assert len(kill.rows["rounds"]) == kill.committed  # what the store held when it died
    # and cost tasks, which the replay fails as the run did
    assert any(not c.ok for c in outcome.clients), report
    assert {c.error for c in outcome.replay.clients if not c.ok} == {
        c.error for c in outcome.clients if not c.ok
    }
