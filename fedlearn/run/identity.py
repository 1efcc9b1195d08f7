"""Which config fields make a run what it is, and which only say how it runs.

*Identity* fields decide the model a run produces: its name and seed, the data and how it
is split, the client app and its parameters, the initial model, the strategy, secure
aggregation, differential privacy (the mechanism, its noise and accounting: a run's ε is
only meaningful for one mechanism). A run may never continue under other identity fields.
*Operational* fields say how the run is carried out (ports, addresses, timeouts, workers,
publishing, paths, how many rounds, ``privacy.budget``, which like ``run.rounds`` may be
raised to continue a run that stopped at it); they may change when a run resumes, and each
change is recorded.

Everything not named operational here is identity, so a new field is safe by default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

#: Dotted prefixes of the operational fields of each config class, by class name.
OPERATIONAL: dict[str, tuple[str, ...]] = {
    "SimulationConfig": (
        "run.rounds",
        "run.evaluate_every",
        "run.out_dir",
        "backend",
        "publish",
        "privacy.budget",
        "tracking",
        "drift",
    ),
    "CoordinatorConfig": (
        "server",
        "run.rounds",
        "run.min_clients",
        "run.join_timeout_s",
        "run.stage_timeout_s",
        "run.evaluate_every",
        "publish",
        "privacy.budget",
        "tracking",
        "drift",
    ),
}


@dataclass(frozen=True)
class FieldChange:
    """One field whose value differs between two configs (``None``: absent or null)."""

    field: str
    old: Any
    new: Any

    def describe(self) -> str:
        """``field: old -> new`` with JSON values."""
        return f"{self.field}: {_show(self.old)} -> {_show(self.new)}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def is_operational(config_class: str, field: str) -> bool:
    """Whether the dotted ``field`` of a ``config_class`` config is operational."""
    return any(field == p or field.startswith(p + ".") for p in OPERATIONAL.get(config_class, ()))


def as_stored(config: BaseModel) -> dict[str, Any]:
    """The config as JSON-compatible values, as the run store keeps it."""
    return json.loads(config.model_dump_json())  # type: ignore[no-any-return]


def stored_as(config_class: type[BaseModel], stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config read through ``config_class``, so fields added since it was stored
    take their defaults instead of looking changed (as stored if it no longer validates)."""
    try:
        return as_stored(config_class.model_validate(dict(stored)))
    except ValidationError:
        return dict(stored)


def differences(
    config_class: str, old: Mapping[str, Any], new: Mapping[str, Any]
) -> tuple[list[FieldChange], list[FieldChange]]:
    """The (identity, operational) fields whose values differ, each sorted by name."""
    a, b = flatten(old), flatten(new)
    identity: list[FieldChange] = []
    operational: list[FieldChange] = []
    for field in sorted(a.keys() | b.keys()):
        if a.get(field) == b.get(field):
            continue
        change = FieldChange(field, a.get(field), b.get(field))
        (operational if is_operational(config_class, field) else identity).append(change)
    return identity, operational


def _show(value: Any) -> str:
    return json.dumps(value)
