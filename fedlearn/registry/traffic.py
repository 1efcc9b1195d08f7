"""Traffic policies of a served model: A/B split, shadow and canary, as stored in a registry.

A policy applies to requests for a model's name (no version given); a request for an
explicit version always gets that version. One policy per model at a time:

* :class:`Split` -- each request goes to one of several versions, with probability
  proportional to its weight (sticky per route key: the same key always lands on the same
  version while the policy stands).
* :class:`Shadow` -- the serving alias (``production``) answers; a ``sample`` fraction of
  the requests is mirrored to ``candidate`` off the request path, whose answer is compared
  with the primary's and never returned.
* :class:`Canary` -- ``candidate`` answers a growing share of the requests (``steps``),
  moving up a step after ``step_requests`` candidate requests and ``step_seconds``
  seconds (whichever are set), as long as its live metrics keep within :class:`LiveGate`;
  past the last step it is promoted to ``production``; breaking a rule rolls it back (its
  share drops to 0 and the policy ends). ``step`` and ``step_started`` are the canary's
  state, advanced by the serving endpoint.

Policies are plain frozen data with JSON round trips (:func:`policy_from_json`); the
registry stores them (:meth:`fedlearn.registry.model_registry.ModelRegistry.set_traffic`),
the endpoint applies them (:mod:`fedlearn.serving.traffic`). Nothing here imports torch.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedlearn.errors import ConfigError

SPLIT = "split"
SHADOW = "shadow"
CANARY = "canary"
KINDS = (SPLIT, SHADOW, CANARY)
#: Default canary shares of traffic, one per step.
DEFAULT_STEPS = (0.05, 0.25, 0.5, 1.0)
#: Default tolerance of a max-abs comparison of two versions' non-class outputs.
DEFAULT_TOLERANCE = 1e-4


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _version(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a version number >= 1, got {value!r}")
    return value


def _fraction(value: object, what: str, *, zero: bool = False) -> float:
    number = _number(value, what)
    if not (0.0 <= number <= 1.0) or (number == 0.0 and not zero):
        bound = "in [0, 1]" if zero else "in (0, 1]"
        raise ConfigError(f"{what} must be {bound}, got {value!r}")
    return number


@dataclass(frozen=True)
class Split:
    """A/B (or A/B/C...) split: ``weights`` maps a version to its relative weight."""

    weights: Mapping[int, float]
    kind: str = field(default=SPLIT, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or len(self.weights) < 1:
            raise ConfigError("split: give at least one version=weight")
        checked: dict[int, float] = {}
        for version, weight in self.weights.items():
            v = _version(version, "split: version")
            w = _number(weight, f"split: weight of v{v}")
            if w < 0:
                raise ConfigError(f"split: weight of v{v} must be >= 0, got {weight!r}")
            checked[v] = w
        if not sum(checked.values()) > 0:
            raise ConfigError("split: the weights must add up to a positive number")
        object.__setattr__(self, "weights", dict(sorted(checked.items())))

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions named, ascending."""
        return tuple(self.weights)

    def shares(self) -> dict[int, float]:
        """Each version's fraction of the requests (weights normalized to sum 1)."""
        total = sum(self.weights.values())
        return {v: w / total for v, w in self.weights.items()}

    def describe(self) -> str:
        return "split " + ", ".join(f"v{v} {s:.1%}" for v, s in self.shares().items())


@dataclass(frozen=True)
class Shadow:
    """Mirror ``sample`` of the requests to ``candidate``; the primary answers."""

    candidate: int
    sample: float = 1.0
    tolerance: float = DEFAULT_TOLERANCE
    kind: str = field(default=SHADOW, init=False)

    def __post_init__(self) -> None:
        _version(self.candidate, "shadow: candidate")
        object.__setattr__(self, "sample", _fraction(self.sample, "shadow: sample"))
        object.__setattr__(self, "tolerance", _tolerance(self.tolerance))

    @property
    def versions(self) -> tuple[int, ...]:
        return (self.candidate,)

    def describe(self) -> str:
        sample = "" if self.sample == 1.0 else f" ({self.sample:.0%} of requests)"
        return f"shadow to v{self.candidate}{sample}"


@dataclass(frozen=True)
class LiveGate:
    """The rules a canary's live metrics must keep to (checked once ``min_requests``
    candidate requests are in the current step, and at every step's end).

    ``max_error_rate``: failed candidate requests / candidate requests (a failure is an
    answer the candidate could not give -- an exception, or a non-finite output -- where
    the baseline could, on the same input). ``max_p95_ms``: the candidate's p95 inference
    latency. ``p95_tolerance_ms``: how much the candidate's p95 may exceed the baseline's
    (the publish gate's "no worse than production, allowing ``tolerance``", on latency).
    ``max_disagreement``: the shadow disagreement rate of the candidate against the
    baseline on the requests the baseline answers (setting it mirrors those requests to
    the candidate). ``max_drift_psi``: the drift PSI (mean over features) of the inputs
    the candidate answered against its own training reference distribution, over the
    endpoint's drift window; judged once the window holds the drift monitor's minimum of
    rows (a step does not end before that), not judged for a candidate without a
    reference (the decision says so). Old stored gates without it load with ``None``.
    """

    max_error_rate: float = 0.01
    max_p95_ms: float | None = None
    p95_tolerance_ms: float | None = None
    max_disagreement: float | None = None
    min_requests: int = 50
    max_drift_psi: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "max_error_rate",
            _fraction(self.max_error_rate, "canary: max_error_rate", zero=True),
        )
        for name in ("max_p95_ms", "p95_tolerance_ms"):
            value = getattr(self, name)
            if value is not None and _number(value, f"canary: {name}") < 0:
                raise ConfigError(f"canary: {name} must be >= 0, got {value!r}")
        if self.max_disagreement is not None:
            _fraction(self.max_disagreement, "canary: max_disagreement", zero=True)
        if (
            isinstance(self.min_requests, bool)
            or not isinstance(self.min_requests, int)
            or self.min_requests < 1
        ):
            raise ConfigError(f"canary: min_requests must be >= 1, got {self.min_requests!r}")
        if self.max_drift_psi is not None:
            psi = _number(self.max_drift_psi, "canary: max_drift_psi")
            if psi < 0:
                raise ConfigError(f"canary: max_drift_psi must be >= 0, got {self.max_drift_psi!r}")
            object.__setattr__(self, "max_drift_psi", psi)


@dataclass(frozen=True)
class Canary:
    """A candidate rolled out in steps and promoted or rolled back by a :class:`LiveGate`."""

    candidate: int
    baseline: int
    steps: tuple[float, ...] = DEFAULT_STEPS
    step_requests: int | None = 200
    step_seconds: float | None = None
    gate: LiveGate = field(default_factory=LiveGate)
    tolerance: float = DEFAULT_TOLERANCE
    step: int = 0
    step_started: float = 0.0
    kind: str = field(default=CANARY, init=False)

    def __post_init__(self) -> None:
        _version(self.candidate, "canary: candidate")
        _version(self.baseline, "canary: baseline")
        if self.candidate == self.baseline:
            raise ConfigError(
                f"canary: v{self.candidate} is already the baseline (production); "
                "choose another candidate"
            )
        steps = tuple(_fraction(s, "canary: each step") for s in self.steps)
        if not steps:
            raise ConfigError("canary: give at least one step (a share of traffic in (0, 1])")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ConfigError(f"canary: steps must increase, got {list(self.steps)}")
        object.__setattr__(self, "steps", steps)
        if self.step_requests is None and self.step_seconds is None:
            raise ConfigError("canary: give step_requests, step_seconds or both")
        if self.step_requests is not None and (
            isinstance(self.step_requests, bool)
            or not isinstance(self.step_requests, int)
            or self.step_requests < 1
        ):
            raise ConfigError(f"canary: step_requests must be >= 1, got {self.step_requests!r}")
        if self.step_seconds is not None and not _number(self.step_seconds, "step_seconds") > 0:
            raise ConfigError(f"canary: step_seconds must be > 0, got {self.step_seconds!r}")
        if not isinstance(self.gate, LiveGate):
            raise ConfigError("canary: gate must be a LiveGate")
        object.__setattr__(self, "tolerance", _tolerance(self.tolerance))
        if isinstance(self.step, bool) or not isinstance(self.step, int):
            raise ConfigError(f"canary: step must be an integer, got {self.step!r}")
        if not 0 <= self.step < len(steps):
            raise ConfigError(f"canary: step {self.step} is not one of the {len(steps)} steps")
        _number(self.step_started, "canary: step_started")

    @property
    def versions(self) -> tuple[int, ...]:
        return (self.baseline, self.candidate)

    @property
    def share(self) -> float:
        """The candidate's share of traffic at the current step."""
        return self.steps[self.step]

    @property
    def last_step(self) -> bool:
        return self.step == len(self.steps) - 1

    @property
    def mirrors(self) -> bool:
        """Whether the baseline's requests are mirrored to the candidate (disagreement)."""
        return self.gate.max_disagreement is not None

    def advanced(self, now: float) -> Canary:
        """The same canary one step further, started at ``now``."""
        return replace(self, step=self.step + 1, step_started=now)

    def describe(self) -> str:
        steps = "/".join(f"{s:.0%}" for s in self.steps)
        return (
            f"canary v{self.candidate} over v{self.baseline}, step {self.step + 1}/"
            f"{len(self.steps)} ({self.share:.0%} of {steps})"
        )


Policy = Split | Shadow | Canary


def _tolerance(value: object) -> float:
    number = _number(value, "tolerance")
    if number < 0:
        raise ConfigError(f"tolerance must be >= 0, got {value!r}")
    return number


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """A JSON-able dict of ``policy`` (``kind`` first)."""
    if isinstance(policy, Split):
        return {"kind": SPLIT, "weights": {str(v): w for v, w in policy.weights.items()}}
    if isinstance(policy, Shadow):
        return {
            "kind": SHADOW,
            "candidate": policy.candidate,
            "sample": policy.sample,
            "tolerance": policy.tolerance,
        }
    gate = policy.gate
    return {
        "kind": CANARY,
        "candidate": policy.candidate,
        "baseline": policy.baseline,
        "steps": list(policy.steps),
        "step_requests": policy.step_requests,
        "step_seconds": policy.step_seconds,
        "gate": {
            "max_error_rate": gate.max_error_rate,
            "max_p95_ms": gate.max_p95_ms,
            "p95_tolerance_ms": gate.p95_tolerance_ms,
            "max_disagreement": gate.max_disagreement,
            "min_requests": gate.min_requests,
            # left out unset, so an endpoint of an earlier fedlearn still reads the policy
            **({} if gate.max_drift_psi is None else {"max_drift_psi": gate.max_drift_psi}),
        },
        "tolerance": policy.tolerance,
        "step": policy.step,
        "step_started": policy.step_started,
    }


def policy_to_json(policy: Policy) -> str:
    return json.dumps(policy_to_dict(policy), sort_keys=True)


def policy_from_dict(raw: Mapping[str, Any]) -> Policy:
    """The policy a dict of :func:`policy_to_dict` describes; ConfigError otherwise."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a traffic policy must be an object, got {raw!r}")
    kind = raw.get("kind")
    try:
        if kind == SPLIT:
            weights = raw.get("weights")
            if not isinstance(weights, Mapping):
                raise ConfigError("split: 'weights' must map versions to weights")
            parsed: dict[int, float] = {}
            for key, weight in weights.items():
                if not str(key).isdigit():
                    raise ConfigError(f"split: {key!r} is not a version number")
                parsed[int(key)] = weight
            return Split(parsed)
        if kind == SHADOW:
            return Shadow(raw["candidate"], raw.get("sample", 1.0), raw.get("tolerance", 1e-4))
        if kind == CANARY:
            gate = raw.get("gate") or {}
            if not isinstance(gate, Mapping):
                raise ConfigError("canary: 'gate' must be an object")
            return Canary(
                raw["candidate"],
                raw["baseline"],
                tuple(raw.get("steps", DEFAULT_STEPS)),
                raw.get("step_requests"),
                raw.get("step_seconds"),
                LiveGate(**gate),
                raw.get("tolerance", DEFAULT_TOLERANCE),
                raw.get("step", 0),
                raw.get("step_started", 0.0),
            )
    except KeyError as exc:
        raise ConfigError(f"{kind} policy: missing {exc.args[0]!r}") from None
    except TypeError as exc:
        raise ConfigError(f"{kind} policy: {exc}") from None
    raise ConfigError(f"unknown traffic policy kind {kind!r} (one of {', '.join(KINDS)})")


def policy_from_json(text: str) -> Policy:
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"traffic policy is not valid JSON: {exc}") from None
    return policy_from_dict(raw)


def parse_weights(text: str) -> Split:
    """``"1=90,2=10"`` (version=weight, comma-separated) as a :class:`Split`."""
    weights: dict[int, float] = {}
    for part in (p.strip() for p in text.split(",")):
        version, sep, weight = part.partition("=")
        if not sep or not version.strip().isdigit():
            raise ConfigError(f"split: expected VERSION=WEIGHT, got {part!r} (e.g. 1=90,2=10)")
        v = int(version)
        if v in weights:
            raise ConfigError(f"split: v{v} appears twice")
        try:
            weights[v] = float(weight)
        except ValueError:
            raise ConfigError(f"split: weight of v{v} is not a number: {weight!r}") from None
    return Split(weights)


def parse_steps(text: str) -> tuple[float, ...]:
    """``"5,25,50,100"`` (percent) as fractions."""
    steps = []
    for part in (p.strip().rstrip("%") for p in text.split(",")):
        try:
            steps.append(float(part) / 100.0)
        except ValueError:
            raise ConfigError(f"canary: step {part!r} is not a percentage") from None
    return tuple(steps)
