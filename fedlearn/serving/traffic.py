"""Traffic policies applied by the serving endpoint: A/B split, shadow and canary.

A :class:`TrafficRouter` sits between a request for a model's *name* and the model that
answers it (requests for an explicit version are never routed). It reads the registry's
traffic policies (:mod:`fedlearn.registry.traffic`) in its own thread, as the repository
reads the ``production`` alias, and swaps a model's routing state with one assignment, so
a policy set, changed or cleared while requests run fails none of them.

* **Split**: each request picks a version by weight; with a route key (REST header
  ``x-fedlearn-route-key``, gRPC metadata of the same name) the pick is a hash of the
  model name and key (blake2b, so the same key gets the same version in every process),
  otherwise a draw of the router's RNG.
* **Shadow**: the serving alias answers; the request's inputs and the answer go to a
  :class:`~fedlearn.serving.shadow.ShadowWorker`, which compares the candidate's answers
  with them off the request path, in stacked batches every 20 ms, within a CPU budget
  (``shadow_budget``, 5 % of the rest of the endpoint's CPU time): a row disagrees when
  the argmax differs (a float output of shape ``[batch, classes]``) or, for any other
  output, when the largest absolute difference exceeds the policy's tolerance. A full
  queue drops the mirror and counts it: the caller never waits for the shadow.
* **Canary**: the candidate answers its step's share of the requests (by route key or RNG
  as for a split). After each poll the router checks the candidate's live metrics in the
  current step (and, with ``max_drift_psi``, the drift PSI of the inputs the candidate
  answered against its training reference, from the endpoint's
  :class:`~fedlearn.serving.drift.DriftMonitor`: judged once its window holds the
  monitor's ``min_rows``; a step does not end before then; a candidate without a
  reference is not judged on drift, and the decision says so) against the policy's
  :class:`~fedlearn.registry.traffic.LiveGate` and
  steps up, promotes (``production`` moves through the registry, recorded) or rolls back
  (the policy ends, recorded); the registry applies each decision only if the policy is
  still the one judged, so endpoints sharing a registry, or an operator changing the
  policy meanwhile, cannot race. Once promoted, the candidate answers as the new
  ``production`` from the repository's next poll; until then the previous production
  does (nothing fails either way).

A routed version that fails a request (an exception, or a non-finite output where the
serving alias's answer is finite) does not fail the caller: the serving alias answers it
instead, and the failure counts against the routed version (``..._fallbacks``, and a
canary's error rate). A request that the serving alias cannot answer either (the caller's
input does not fit) gets the serving alias's error, as without a policy.

Prometheus metrics (on the endpoint's collector registry, so at ``/metrics``):
``fedlearn_serving_traffic_requests_total{model,version,policy}``,
``fedlearn_serving_traffic_fallbacks_total{model,version}``,
``fedlearn_serving_traffic_decisions_total{model,action}``,
``fedlearn_serving_canary_share{model,candidate}``,
``fedlearn_serving_shadow_requests_total``, ``..._shadow_rows_total``,
``..._shadow_disagreements_total``, ``..._shadow_errors_total`` and the gauge
``..._shadow_disagreement_ratio`` (each ``{model,primary,candidate}``),
``fedlearn_serving_shadow_dropped_total{model}`` and the histogram
``fedlearn_serving_shadow_seconds{model,primary,candidate,side}`` (inference latency of
the primary and of the candidate on the mirrored requests).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry

from fedlearn.errors import ConfigError, FedlearnError
from fedlearn.registry.model_registry import PRODUCTION, ModelRegistry
from fedlearn.registry.traffic import Canary, Policy, Shadow, Split, policy_to_dict
from fedlearn.registry.traffic_store import (
    CANARY_PROMOTE,
    CANARY_ROLLBACK,
    CANARY_STEP,
    ROUTE_CLEAR,
    StoredPolicy,
)
from fedlearn.serving.models import ServedModel
from fedlearn.serving.repository import ModelRepository
from fedlearn.serving.shadow import (
    DEFAULT_SHADOW_BUDGET,
    DEFAULT_SHADOW_QUEUE,
    LATENCY_WINDOW,
    Outputs,
    PairStats,
    ShadowWorker,
    TrafficMetrics,
    finite,
    percentile,
)

if TYPE_CHECKING:
    from fedlearn.serving.drift import DriftMonitor

log = logging.getLogger(__name__)

#: The request header (REST) and metadata key (gRPC) whose value makes a split sticky.
ROUTE_HEADER = "x-fedlearn-route-key"


def route_point(name: str, key: str) -> float:
    """Where ``key`` falls in [0, 1) for model ``name``: the same in every process."""
    digest = hashlib.blake2b(f"{name}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


@dataclass
class CanaryWindow:
    """A canary's live metrics in its current step (shadow counts: over the canary)."""

    requests: int = 0
    failures: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    baseline_requests: int = 0
    baseline_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    shadow: PairStats = field(default_factory=PairStats)
    baseline_p95_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return 0.0 if self.requests == 0 else self.failures / self.requests

    def p95(self) -> float | None:
        return percentile(self.latencies_ms, 95)

    def base_p95(self) -> float | None:
        return percentile(self.baseline_ms, 95) or self.baseline_p95_ms

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "error_rate": self.error_rate,
            "p95_ms": self.p95(),
            "baseline_requests": self.baseline_requests,
            "baseline_p95_ms": self.base_p95(),
            "disagreement_rate": self.shadow.rate,
            "shadow_rows": self.shadow.rows,
        }


@dataclass(frozen=True)
class DriftReading:
    """A canary candidate's drift as its live gate sees it: the mean PSI of the inputs it
    answered over ``rows`` rows of the drift window, or ``note``: why drift is not judged."""

    psi: float | None
    rows: int
    min_rows: int
    note: str | None = None

    @property
    def waiting(self) -> bool:
        """Whether the window holds too few rows to judge yet (a step cannot end)."""
        return self.note is None and self.rows < self.min_rows

    @property
    def judged(self) -> bool:
        return self.note is None and not self.waiting

    def text(self) -> str:
        if self.note is not None:
            return f"drift not judged: {self.note}"
        if self.waiting or self.psi is None:
            return f"drift waiting for rows ({self.rows}/{self.min_rows})"
        return f"drift PSI {self.psi:.3f} over {self.rows} rows"

    def as_dict(self) -> dict[str, Any]:
        return {
            "judged": self.judged,
            "psi": self.psi,
            "rows": self.rows,
            "min_rows": self.min_rows,
            "note": self.note,
        }


class _State:
    """One model's routing state for one policy revision."""

    def __init__(self, stored: StoredPolicy) -> None:
        self.stored = stored
        self.policy: Policy = stored.policy
        self.lock = threading.Lock()
        self.window = CanaryWindow()
        self.cumulative: list[tuple[float, int]] = []
        if isinstance(self.policy, Split):
            total = 0.0
            for version, share in self.policy.shares().items():
                if share > 0:
                    total += share
                    self.cumulative.append((total, version))

    def pick(self, point: float) -> int:
        """The version a request at ``point`` in [0, 1) goes to."""
        policy = self.policy
        if isinstance(policy, Canary):
            return policy.candidate if point < policy.share else policy.baseline
        for bound, version in self.cumulative:
            if point < bound:
                return version
        return self.cumulative[-1][1]  # rounding: the sum may fall just short of 1


class TrafficRouter:
    """Applies the registry's traffic policies to requests (module docstring).

    ``rng`` draws the un-keyed picks (default: a ``random.Random`` seeded from the OS;
    picking a version needs no cryptographic strength, only independence). ``decide``:
    whether this endpoint takes canary decisions (one endpoint of several sharing a
    registry may leave them to another). ``shadow_nice``: how much lower the shadow
    worker's CPU priority is (Linux: per thread). It is 0 by default: a thread that can be
    preempted for long while it holds the GIL would stall the request path instead.
    ``shadow_budget``: the CPU time the shadow worker may use, as a share of the CPU time
    the rest of the endpoint process uses (plus 1 % of a core, so that a quiet endpoint
    compares everything); mirrors beyond what it buys wait in the queue, and are dropped
    when it is full (counted), so a shadow costs a CPU-bound endpoint about that share of
    its throughput and no more, under any load. ``drift``: the endpoint's drift monitor,
    whose statistics of a canary candidate a gate's ``max_drift_psi`` judges (None: drift
    is not judged, and the decisions say so).
    """

    def __init__(
        self,
        root: str | Path,
        repository: ModelRepository,
        collectors: CollectorRegistry,
        *,
        poll_interval_s: float = 0.5,
        shadow_queue: int = DEFAULT_SHADOW_QUEUE,
        rng: random.Random | None = None,
        decide: bool = True,
        shadow_nice: int = 0,
        shadow_linger_s: float = 0.02,
        shadow_batch_rows: int = 256,
        shadow_budget: float = DEFAULT_SHADOW_BUDGET,
        drift: DriftMonitor | None = None,
    ) -> None:
        if not poll_interval_s > 0:
            raise ConfigError(f"traffic poll interval must be > 0, got {poll_interval_s}")
        if not 0 < shadow_budget <= 10:
            raise ConfigError(f"shadow CPU budget must be in (0, 10], got {shadow_budget}")
        if shadow_queue < 1:
            raise ConfigError(f"shadow queue must hold >= 1 request, got {shadow_queue}")
        self.repository = repository
        self.metrics = TrafficMetrics(collectors)
        self.poll_interval_s = poll_interval_s
        self.decide = decide
        self.drift = drift
        self._registry = ModelRegistry(root)
        self._rng = rng or random.Random()
        self._states: dict[str, _State] = {}
        self._refresh_lock = threading.Lock()
        self.shadow = ShadowWorker(
            repository,
            self.metrics,
            capacity=shadow_queue,
            nice=shadow_nice,
            linger_s=shadow_linger_s,
            batch_rows=shadow_batch_rows,
            budget=shadow_budget,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Read the policies now, then watch them and run the shadow worker in threads."""
        self.refresh()
        self.shadow.start()
        self._thread = threading.Thread(target=self._watch, name="fedlearn-traffic", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop both threads (mirrors still queued are dropped) and close the registry."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.shadow.close()
        self._registry.close()

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued mirror has been compared (tests, benchmarks)."""
        self.shadow.drain(timeout_s)

    def __enter__(self) -> TrafficRouter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the request path ---------------------------------------------------------------

    def infer(
        self,
        default: ServedModel,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        route_key: str | None = None,
    ) -> tuple[ServedModel, Outputs]:
        """Answer a request for ``default.name`` (``default``: the serving alias's model)
        under the model's policy; returns the model that answered and its outputs."""
        state = self._states.get(default.name)
        if state is None:
            return default, default.infer(inputs, outputs)
        policy = state.policy
        if isinstance(policy, Shadow):
            start = time.perf_counter()
            answer = default.infer(inputs, outputs)
            elapsed = time.perf_counter() - start
            self.metrics.routed.labels(default.name, str(default.version), policy.kind).inc()
            if policy.sample >= 1.0 or self._rng.random() < policy.sample:
                self.shadow.submit(
                    default, policy.candidate, policy.tolerance, inputs, outputs, answer
                )
                self.metrics.shadow_latency.labels(
                    default.name, str(default.version), str(policy.candidate), "primary"
                ).observe(elapsed)
            return default, answer
        point = self._rng.random() if route_key is None else route_point(default.name, route_key)
        version = state.pick(point)
        canary = policy if isinstance(policy, Canary) else None
        if version == default.version:
            start = time.perf_counter()
            answer = default.infer(inputs, outputs)
            if canary is not None:
                elapsed_ms = (time.perf_counter() - start) * 1e3
                with state.lock:
                    state.window.baseline_requests += 1
                    state.window.baseline_ms.append(elapsed_ms)
                if canary.mirrors:
                    self.shadow.submit(
                        default,
                        canary.candidate,
                        canary.tolerance,
                        inputs,
                        outputs,
                        answer,
                        state.window.shadow,
                    )
            self.metrics.routed.labels(default.name, str(default.version), policy.kind).inc()
            return default, answer
        model, routed, elapsed_ms = self._try(default.name, version, inputs, outputs)
        if model is not None and routed is not None and finite(routed):
            if canary is not None:
                with state.lock:
                    state.window.requests += 1
                    state.window.latencies_ms.append(elapsed_ms)
            self.metrics.routed.labels(default.name, str(version), policy.kind).inc()
            return model, routed
        # the routed version failed: the serving alias answers; its error is the caller's
        fallback = default.infer(inputs, outputs)
        if model is not None and routed is not None and not finite(fallback):
            # both non-finite: the input's doing, not the routed version's
            self.metrics.routed.labels(default.name, str(version), policy.kind).inc()
            return model, routed
        self.metrics.fallbacks.labels(default.name, str(version)).inc()
        self.metrics.routed.labels(default.name, str(default.version), policy.kind).inc()
        if canary is not None:
            with state.lock:
                state.window.requests += 1
                state.window.failures += 1
                state.window.latencies_ms.append(elapsed_ms)
        return default, fallback

    def _try(
        self,
        name: str,
        version: int,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
    ) -> tuple[ServedModel | None, Outputs | None, float]:
        """``version``'s answer, or ``(model or None, None, ms)`` if it failed."""
        try:
            model = self.repository.get(name, version)
        except FedlearnError as exc:  # not found, or could not be loaded: logged there
            log.debug("%s v%d cannot answer routed requests: %s", name, version, exc)
            return None, None, 0.0
        start = time.perf_counter()
        try:
            answer = model.infer(inputs, outputs)
        except Exception as exc:  # any failure of the routed version falls back
            log.debug("%s v%d failed a routed request: %s", name, version, exc)
            return model, None, (time.perf_counter() - start) * 1e3
        return model, answer, (time.perf_counter() - start) * 1e3

    # -- policies -----------------------------------------------------------------------

    def policy(self, name: str) -> Policy | None:
        """The policy being applied to ``name`` (None: none)."""
        state = self._states.get(name)
        return None if state is None else state.policy

    def refresh(self) -> None:
        """Pick up changed policies, then judge every canary (called by the watcher)."""
        with self._refresh_lock:
            self._refresh()

    def _refresh(self) -> None:
        stored = self._registry.traffic_all()
        states = dict(self._states)
        for name in list(states):
            if name not in stored:
                del states[name]
                log.info("%s: traffic policy cleared", name)
        for name, policy in stored.items():
            old = states.get(name)
            if old is not None and old.stored.revision == policy.revision:
                continue
            state = _State(policy)
            self._carry_over(old, state)
            self._preload(name, policy.policy)
            states[name] = state
            log.info("%s: traffic policy r%d: %s", name, policy.revision, policy.policy.describe())
        self._states = states  # one assignment: a request sees the old or the new state
        self._publish_shares()
        if self.decide:
            for name, state in list(states.items()):
                if isinstance(state.policy, Canary):
                    self._judge(name, state)

    def _carry_over(self, old: _State | None, new: _State) -> None:
        """A canary stepping up keeps its shadow counts and baseline latency."""
        if old is None or not isinstance(old.policy, Canary):
            return
        if not isinstance(new.policy, Canary):
            return
        if (old.policy.candidate, old.policy.baseline) != (
            new.policy.candidate,
            new.policy.baseline,
        ):
            return
        new.window.shadow = old.window.shadow
        new.window.baseline_p95_ms = old.window.base_p95()

    def _preload(self, name: str, policy: Policy) -> None:
        for version in policy.versions:
            try:
                self.repository.get(name, version)
            except FedlearnError as exc:
                log.warning("%s v%d named by the traffic policy: %s", name, version, exc)

    def _publish_shares(self) -> None:
        for name, state in self._states.items():
            if isinstance(state.policy, Canary):
                self.metrics.canary_share.labels(name, str(state.policy.candidate)).set(
                    state.policy.share
                )

    def _judge(self, name: str, state: _State) -> None:
        policy = state.policy
        assert isinstance(policy, Canary)
        revision = state.stored.revision
        production = self._registry.aliases(name).get(PRODUCTION)
        if production != policy.baseline:
            reason = (
                f"canary v{policy.candidate} ended: production moved to "
                f"{'nothing' if production is None else f'v{production}'}, away from its "
                f"baseline v{policy.baseline}"
            )
            self._end(name, state, ROUTE_CLEAR, reason, None)
            return
        gate = policy.gate
        with state.lock:
            window = state.window
            n = window.requests
            error_rate = window.error_rate
            p95 = window.p95()
            base_p95 = window.base_p95()
            summary = window.summary()
        disagreement = window.shadow.rate
        drift = None if gate.max_drift_psi is None else self._drift(name, policy.candidate)
        measured = (
            f"{n} requests, error rate {error_rate:.2%}"
            + ("" if p95 is None else f", p95 {p95:.2f} ms")
            + ("" if base_p95 is None else f" (baseline {base_p95:.2f} ms)")
            + ("" if disagreement is None else f", disagreement {disagreement:.2%}")
            + ("" if drift is None else f", {drift.text()}")
        )
        where = f"step {policy.step + 1}/{len(policy.steps)} ({policy.share:.0%})"
        broken: str | None = None
        if n >= gate.min_requests:
            if error_rate > gate.max_error_rate:
                broken = f"error rate {error_rate:.2%} > {gate.max_error_rate:.2%}"
            elif gate.max_p95_ms is not None and p95 is not None and p95 > gate.max_p95_ms:
                broken = f"p95 {p95:.2f} ms > {gate.max_p95_ms:g} ms"
            elif (
                gate.p95_tolerance_ms is not None
                and p95 is not None
                and base_p95 is not None
                and p95 > base_p95 + gate.p95_tolerance_ms
            ):
                broken = (
                    f"p95 {p95:.2f} ms > baseline {base_p95:.2f} ms + {gate.p95_tolerance_ms:g} ms"
                )
            elif (
                gate.max_disagreement is not None
                and disagreement is not None
                and window.shadow.rows >= gate.min_requests
                and disagreement > gate.max_disagreement
            ):
                broken = f"disagreement {disagreement:.2%} > {gate.max_disagreement:.2%}"
        if (
            broken is None
            and drift is not None
            and drift.judged
            and drift.psi is not None
            and gate.max_drift_psi is not None
            and drift.psi > gate.max_drift_psi
        ):
            broken = (
                f"drift PSI {drift.psi:.3f} > {gate.max_drift_psi:g} (v{policy.candidate}'s "
                f"inputs against its training reference)"
            )
        if broken is not None:
            reason = (
                f"canary v{policy.candidate} rolled back at {where}: {broken} "
                f"({measured}); production stays v{policy.baseline}"
            )
            self._end(name, state, CANARY_ROLLBACK, reason, None)
            return
        done = (
            n >= gate.min_requests
            and (drift is None or not drift.waiting)
            and (policy.step_requests is None or n >= policy.step_requests)
            and (
                policy.step_seconds is None
                or time.time() - policy.step_started >= policy.step_seconds
            )
        )
        if not done:
            return
        if policy.last_step:
            reason = (
                f"canary v{policy.candidate} promoted after {where}: {measured}, within the "
                f"live gate"
            )
            self._end(name, state, CANARY_PROMOTE, reason, policy.candidate)
            return
        nxt = policy.advanced(time.time())
        reason = f"canary v{policy.candidate} steps up to {nxt.share:.0%} after {where}: {measured}"
        stored = self._registry.advance_traffic(name, revision, nxt, CANARY_STEP, reason)
        if stored is not None:
            log.info("%s: %s", name, reason)
            self.metrics.decisions.labels(name, CANARY_STEP).inc()
            log.debug("%s: step window %s", name, summary)
            self.refresh_one(name, stored, state)

    def _drift(self, name: str, candidate: int) -> DriftReading:
        """The candidate's drift, from the endpoint's monitor (its own rolling window)."""
        if self.drift is None:
            return DriftReading(None, 0, 0, "the endpoint keeps no drift statistics")
        try:
            model = self.repository.get(name, candidate)
        except FedlearnError as exc:
            return DriftReading(None, 0, 0, f"v{candidate} cannot be loaded ({exc})")
        scores = self.drift.version_scores(model)
        if isinstance(scores, str):
            return DriftReading(None, 0, 0, f"v{candidate}: {scores}")
        return DriftReading(scores.psi, scores.rows, self.drift.min_rows)

    def refresh_one(self, name: str, stored: StoredPolicy, old: _State) -> None:
        """Apply a policy this router itself just stored."""
        state = _State(stored)
        self._carry_over(old, state)
        states = dict(self._states)
        states[name] = state
        self._states = states
        self._publish_shares()

    def _end(self, name: str, state: _State, action: str, reason: str, promote: int | None) -> None:
        if not self._registry.end_traffic(
            name, state.stored.revision, action, reason, promote=promote
        ):  # changed meanwhile: the next refresh sees what it is now
            return
        log.info("%s: %s", name, reason)
        self.metrics.decisions.labels(name, action).inc()
        assert isinstance(state.policy, Canary)
        self.metrics.canary_share.labels(name, str(state.policy.candidate)).set(
            1.0 if promote is not None else 0.0
        )
        states = dict(self._states)
        states.pop(name, None)
        self._states = states

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # the watcher must outlive a bad registry state
                log.exception("traffic policy refresh failed")

    # -- metadata -----------------------------------------------------------------------

    def metadata(self, name: str) -> dict[str, Any] | None:
        """The policy of ``name`` and what it measured, for ``/v2/models/{name}``."""
        state = self._states.get(name)
        pairs = self.shadow.pairs(name)
        if state is None and not pairs:
            return None
        out: dict[str, Any] = {"policy": None}
        if state is not None:
            out["policy"] = policy_to_dict(state.policy)
            out["revision"] = state.stored.revision
            if isinstance(state.policy, Canary):
                with state.lock:
                    out["canary"] = {"share": state.policy.share, **state.window.summary()}
                if state.policy.gate.max_drift_psi is not None:
                    reading = self._drift(name, state.policy.candidate)
                    out["canary"]["drift"] = reading.as_dict()
        if pairs:
            out["shadow"] = pairs
        return out
