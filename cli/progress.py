"""A rich progress display for the library's Progress protocol, drawn on stderr."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    TaskID,
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None or not task.fields.get("examples"):
            return Text("")
        return Text(f"{speed:,.1f} ex/s", style="progress.data.speed")


class RichProgress:
    """An overall bar over units (models, chunks) and a bar over the current unit's examples."""

    def __init__(self):
        self._bars = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self._units = self._current = TaskID(-1)  # none yet: plan and unit_started add them

    def __enter__(self) -> "RichProgress":
        self._bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self._bars.stop()

    def plan(self, total_units: int, skipped: int, description: str) -> None:
        if skipped:
            console.print(f"{description}: {skipped} of {total_units} already done, skipping them")
        self._units = self._bars.add_task(description, total=total_units, completed=skipped)

    def unit_started(self, name: str, total_steps: int) -> None:
        self._current = self._bars.add_task(f"  {name}", total=total_steps, examples=total_steps > 1)

    def advance(self, steps: int) -> None:
        self._bars.advance(self._current, steps)

    def unit_finished(self, name: str, summary: str, units: int = 1) -> None:
        self._bars.remove_task(self._current)
        self._bars.advance(self._units, units)
        self._bars.console.print(f"{name}: done ({summary})")
