"""A Flower app project as a fedlearn simulation: the settings it implies, and its ClientApp.

``fedlearn simulate --flower-app DIR --run-config 'k=v ...'`` calls :func:`flower_settings`:
it reads the project, runs its ServerApp up to ``strategy.start`` and turns what it finds
into config overrides (``run.name`` from the project name, ``run.clients`` from the
default federation's ``options.num-supernodes``, ``run.rounds`` from ``num_rounds``,
``strategy.*`` from the mapped strategy, ``flower.*``), under any the user gave. The run
then goes through the usual lifecycle; :func:`flower_client_app` builds the ClientApp
(the same capture again, for the initial model and the fixed configs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlearn.apps.flower_message import MessageClientApp
from fedlearn.apps.flower_project import (
    fuse_run_config,
    make_client_app,
    parse_run_config,
    plan_server,
    read_project,
)
from fedlearn.config.simulation import SimulationConfig
from fedlearn.errors import ConfigError

__all__ = ["FlowerSettings", "flower_client_app", "flower_settings"]


@dataclass(frozen=True)
class FlowerSettings:
    """Config overrides for a Flower project, and what did not carry over."""

    overrides: dict[str, Any]
    notes: list[str]


def flower_settings(
    directory: str | Path,
    run_config: str | list[str] | None,
    given: Mapping[str, Any],
    clients: int | None = None,
) -> FlowerSettings:
    """The overrides that run ``directory``'s Flower app; ``given`` (the user's own
    overrides) win, and ``clients`` (from the user's config file) counts when the
    project names no ``num-supernodes`` and ``given`` does not set ``run.clients``."""
    project = read_project(directory)
    overrides = parse_run_config(run_config)
    fused = fuse_run_config(project.config, overrides)
    num = given.get("run.clients", project.num_supernodes or clients)
    if num is None:
        raise ConfigError(
            f"{directory}: the project's default federation sets no options.num-supernodes; "
            "say how many clients to simulate with --clients N"
        )
    plan = plan_server(project, fused, int(num), int(given.get("run.seed", 0)))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", project.name).strip("-") or "flower-app"
    settings: dict[str, Any] = {
        "run.name": name,
        "run.clients": int(num),
        "run.rounds": plan.rounds,
        "strategy.name": plan.strategy_name,
        "strategy.params": dict(plan.strategy_params),
        "flower.app": str(project.directory),
        "flower.run_config": overrides,
    }
    settings.update(given)
    return FlowerSettings(settings, list(plan.notes))


def flower_client_app(config: SimulationConfig) -> MessageClientApp:
    """The ClientApp of ``config.flower.app``, for ``config.run.clients`` partitions."""
    section = config.flower
    if section.app is None:
        raise ConfigError("flower.app is not set")
    project = read_project(section.app)
    run_config = fuse_run_config(project.config, section.run_config)
    plan = plan_server(project, run_config, config.run.clients, config.run.seed)
    return make_client_app(project, run_config, plan, num_partitions=config.run.clients)
