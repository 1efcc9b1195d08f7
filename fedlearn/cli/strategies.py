"""``fedlearn strategies``: the built-in strategies and their settings."""

from __future__ import annotations

import dataclasses

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console()


def strategies() -> None:
    """List the built-in strategies and their settings (name=default)."""
    from fedlearn.report.console import first_fitting
    from fedlearn.strategy import STRATEGIES

    settings = {name: _settings(cls) for name, cls in STRATEGIES.items()}
    shared = [s for s in next(iter(settings.values()), []) if _everyone_has(s, settings)]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    table.add_column("strategy", no_wrap=True, style="bold")
    table.add_column("kind", no_wrap=True)
    table.add_column("settings")
    for name, cls in STRATEGIES.items():
        own = [s for s in settings[name] if s not in shared]
        table.add_row(name, "linear" if cls.linear else "holistic", Text(", ".join(own) or "-"))
    console.print(first_fitting(console, [table]))
    if shared:
        console.print(Text("Every strategy also takes " + ", ".join(shared) + "."))


def _settings(cls: type) -> list[str]:
    """A strategy's settings as ``name=default``, in declaration order."""
    return [
        f"{f.name}={f.default!r}"
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING
    ]


def _everyone_has(setting: str, settings: dict[str, list[str]]) -> bool:
    return all(setting in own for own in settings.values())
