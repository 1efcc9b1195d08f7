"""What ``fedlearn simulate`` and ``fedlearn server`` print while rounds run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from fedlearn.engine.messages import Stage
    from fedlearn.engine.results import ClientRecord, RoundRecord


def progress_bars(**kwargs: Any) -> Progress:
    """The bars of a round's stages: description, bar, done/total, elapsed."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        **kwargs,
    )


class ProgressObserver:
    """One progress bar per round stage, and a line per finished round."""

    def __init__(self, progress: Progress, rounds: int) -> None:
        self.progress = progress
        self.rounds = rounds
        self.task: Any = None

    def stage_started(self, round: int, stage: Stage, num_tasks: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(
            f"round {round}/{self.rounds} {stage.value}", total=num_tasks
        )

    def reply_received(self, record: ClientRecord) -> None:
        self.progress.advance(self.task)

    def round_finished(self, record: RoundRecord) -> None:
        self.describe(record, self.progress.console)

    @staticmethod
    def describe(record: RoundRecord, out: Console) -> None:
        """Print one line summarizing a finished round."""
        acc = record.eval_metrics.get("accuracy")
        loss = record.eval_metrics.get("loss")
        status = "[green]ok[/]" if record.ok else f"[red]failed[/]: {record.error}"
        parts = [
            f"round {record.round}: {status}",
            f"train {record.train_ok}/{record.train_selected}",
        ]
        if record.eval_selected:
            parts.append(f"eval {record.eval_ok}/{record.eval_selected}")
        if isinstance(acc, float):
            parts.append(f"accuracy {acc:.4f}")
        if isinstance(loss, float):
            parts.append(f"loss {loss:.4f}")
        if record.virtual_time is not None:
            parts.append(f"virtual time {record.virtual_time:.2f}")
        parts.append(f"{record.duration_s:.2f}s")
        out.print("  ".join(parts))
