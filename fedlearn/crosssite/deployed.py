"""Cross-site evaluation of registry versions on deployed sites, through the coordinator.

:func:`evaluate_deployed` serves the coordinator's gRPC endpoint exactly as
``fedlearn server`` does (:func:`fedlearn.deploy.server.serve_sites`: TLS, the allowlist,
admission, the sites' client ids from the state directory), waits for the enrolled
sites, and runs an evaluate-only run: each version goes through the coordinator's
evaluation stage alone (:meth:`Coordinator.evaluate_only`), so every connected site
evaluates it on its own data and answers with its metrics only; nothing trains, no
weights come back. The sites are the usual ``fedlearn client`` daemons, which reconnect
after a training run ends; they run nothing new. Site names in the matrix are their
allowlist names. A site's own local model is not offered here: it would need the site
to train, which an evaluate-only run never asks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from fedlearn.config.deployment import CoordinatorConfig
from fedlearn.crosssite.evaluate import (
    CrossSiteResult,
    Evaluation,
    baseline_label,
    check_fits,
    every_client,
    new_evaluation_id,
    resolve_entries,
    run_evaluation,
)
from fedlearn.crosssite.matrix import Entry
from fedlearn.engine.coordinator import Coordinator, Observer
from fedlearn.engine.records import Arrays
from fedlearn.errors import RoundFailed, RunInterrupted
from fedlearn.run.builders import make_strategy
from fedlearn.run.identity import as_stored


def evaluate_deployed(
    config: CoordinatorConfig,
    *,
    registry: Path,
    out: Path,
    refs: Sequence[str] = (),
    model: str | None = None,
    sites: int | None = None,
    baseline: str | None = None,
    evaluation: str | None = None,
    attach: bool = True,
    plot_metric: str | None = None,
    stop: threading.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
    observer: Observer | None = None,
    progress: Callable[[str], None] | None = None,
) -> CrossSiteResult:
    """Evaluate registry versions on the coordinator's enrolled sites (see the module
    doc). Waits up to ``run.join_timeout_s`` for ``sites`` sites (default: every enrolled
    one), then goes on with those connected if they are at least ``run.min_clients``
    (RoundFailed otherwise). ``stop`` ends it before the next version (RunInterrupted).
    The rest is as :func:`fedlearn.crosssite.evaluate.evaluate_sites`."""
    from fedlearn.deploy.server import (
        certificate_sha256,
        initial_arrays,
        serve_sites,
        server_credentials,
    )
    from fedlearn.security.auth import Authenticator
    from fedlearn.security.keys import load_allowlist

    say = progress or (lambda text: None)
    name = model or config.publish.model or config.run.name
    entries, weights = resolve_entries(registry, refs, name)
    base = baseline_label(entries, baseline, name)
    initial = initial_arrays(config)
    for entry in entries:
        check_fits(entry.label, weights[entry.label], initial)
    allowlist = load_allowlist(config.server.allowlist)
    authenticator = Authenticator(
        allowlist, config.server.server_id, server_cert_sha256=certificate_sha256(config.server)
    )
    server_credentials(config.server)
    wanted = sites or max(len(allowlist), 1)
    evaluation = evaluation or new_evaluation_id()
    with serve_sites(config, authenticator, on_ready) as service:
        say(f"waiting for {wanted} sites (up to {config.run.join_timeout_s:g} s)")
        if not service.registry.wait_for(wanted, config.run.join_timeout_s):
            connected = len(service.registry.available())
            if connected < config.run.min_clients:
                raise RoundFailed(
                    f"cross-site evaluation: {connected} of {wanted} sites connected within "
                    f"{config.run.join_timeout_s:g} s, below run.min_clients "
                    f"({config.run.min_clients})"
                )
            say(f"{connected} of {wanted} sites connected; evaluating on those")
        ids = {service.enrollment.client_id(e.name): e.name for e in allowlist}
        present = service.registry.available()
        names = {cid: ids.get(cid) or str(cid) for cid in present}
        coordinator = Coordinator(
            every_client(make_strategy(config.strategy)),
            service.transport,
            present,
            rounds=len(entries),
            seed=config.run.seed,
            observer=observer,
            available=service.registry.available,
            hold_bytes=config.server.hold_replies_mb << 20,
        )

        def models(entry: Entry) -> Arrays:
            if stop is not None and stop.is_set():
                raise RunInterrupted(0, "the same fedlearn evaluate-sites command")
            return weights[entry.label]

        settings = {"registry": str(registry), "coordinator": as_stored(config)}
        result = run_evaluation(
            coordinator,
            models,
            Evaluation(evaluation, entries, names, base, config.run.seed, settings),
            registry=registry,
            out=out,
            attach=attach,
            plot_metric=plot_metric,
            say=say,
        )
        service.registry.close_all("cross-site evaluation finished")
        return result


__all__ = ["evaluate_deployed"]
