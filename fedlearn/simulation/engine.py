"""``run_simulation``: many clients on one machine, with any transport."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fedlearn.drift.stats import SummarySpec
from fedlearn.engine.client_app import ClientApp, ProvidesInitialArrays
from fedlearn.engine.clock import Latency
from fedlearn.engine.coordinator import Coordinator, Observer, RoundSink, Transport
from fedlearn.engine.records import Arrays
from fedlearn.engine.results import RunResult
from fedlearn.errors import ConfigError
from fedlearn.secagg.stages import SecureAggregation
from fedlearn.simulation.inprocess import InProcessTransport
from fedlearn.simulation.pool import PoolTransport, StartMethod
from fedlearn.strategy.base import Strategy

BackendName = Literal["inprocess", "pool", "ray"]


def make_transport(
    backend: BackendName,
    app_factory: Callable[[], ClientApp],
    workers: int | None = None,
    run_id: str = "",
    *,
    address: str | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    state_dir: str | Path | None = None,
    start_method: StartMethod = "auto",
) -> Transport:
    """A simulation transport by name. ``workers`` counts pool processes or Ray actors;
    ``address``, ``num_cpus`` and ``num_gpus`` are for Ray (see :class:`RayTransport`).
    ``state_dir`` keeps the clients' own states (``ctx.state``) on disk (default: in
    memory in-process, a temporary directory for the pool and Ray). ``start_method`` is how
    the pool starts its workers (:class:`PoolTransport`)."""
    if backend == "inprocess":
        return InProcessTransport(app_factory, run_id, state_dir)
    if backend == "pool":
        return PoolTransport(
            app_factory, workers, run_id, state_dir=state_dir, start_method=start_method
        )
    if backend == "ray":
        from fedlearn.simulation.ray_transport import RayTransport

        return RayTransport(
            app_factory,
            workers,
            run_id,
            address=address,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            state_dir=state_dir,
        )
    raise ConfigError(f"unknown backend {backend!r}; expected 'inprocess', 'pool' or 'ray'")


def run_simulation(
    app_factory: Callable[[], ClientApp],
    strategy: Strategy,
    *,
    num_clients: int,
    rounds: int,
    initial_arrays: Arrays | None = None,
    initial_state: Arrays | None = None,
    start_round: int = 1,
    seed: int = 0,
    backend: BackendName | Transport = "inprocess",
    workers: int | None = None,
    evaluate_every: int = 1,
    sink: RoundSink | None = None,
    observer: Observer | None = None,
    run_id: str = "",
    secure: SecureAggregation | None = None,
    stop_before: Callable[[int], str | None] | None = None,
    state_dir: str | Path | None = None,
    latency: Latency | None = None,
    data_stats: SummarySpec | None = None,
) -> RunResult:
    """Simulate ``rounds`` rounds of federated training over ``num_clients`` clients.

    ``app_factory`` builds a ClientApp; each worker builds one and keeps it (its model
    and cached data) for every task it runs. Client ids are ``0..num_clients-1``.
    With the same ``seed`` the result is bit-identical, whichever backend runs it.
    ``initial_state`` and ``start_round`` continue a run from a checkpoint. With
    ``secure``, training rounds use secure aggregation (SecAgg+). ``stop_before`` is asked
    before each round and may end the run there (see :class:`Coordinator`). ``state_dir``
    keeps the clients' own states (``ctx.state``, e.g. SCAFFOLD's control variates) on
    disk, for a run that continues later (with ``start_round``) in another process.
    ``latency`` draws each client's simulated time per task: the virtual clock that orders
    an asynchronous strategy's replies (FedBuff; constant if None) and the virtual time
    recorded with each round.
    ``data_stats`` turns on drift monitoring: each round records its clients' data
    summaries over these bins (:attr:`fedlearn.engine.results.RoundRecord.data_stats`).
    """
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if initial_arrays is None:
        app = app_factory()
        if not isinstance(app, ProvidesInitialArrays):
            raise ConfigError(
                "pass initial_arrays or give the ClientApp an initial_arrays(seed) method"
            )
        initial_arrays = app.initial_arrays(seed)
    transport = (
        make_transport(backend, app_factory, workers, run_id, state_dir=state_dir)
        if isinstance(backend, str)
        else backend
    )
    try:
        coordinator = Coordinator(
            strategy,
            transport,
            list(range(num_clients)),
            rounds,
            seed=seed,
            evaluate_every=evaluate_every,
            sink=sink,
            observer=observer,
            secure=secure,
            stop_before=stop_before,
            latency=latency,
            data_stats=data_stats,
        )
        return coordinator.run(initial_arrays, initial_state, start_round)
    finally:
        transport.close()
