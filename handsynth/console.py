"""Terminal output shared by all commands: a rich console, progress bars with rate and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


class RateColumn(TextColumn):
    """Items per second, shown as e.g. '12.3 frames/s'."""

    def __init__(self, unit: str = "it"):
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


# Redraws of a progress bar per second. Each redraw is a few milliseconds of Python in a thread of its own, which
# competes for the interpreter with the work it reports: at rich's default of 10, 3% of render's throughput.
REFRESH_PER_SECOND = 2


def progress(unit: str = "it") -> Progress:
    """A progress bar with count, rate and ETA, written to stderr, redrawn :data:`REFRESH_PER_SECOND` times a second."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        refresh_per_second=REFRESH_PER_SECOND,
    )


def print_defaults(defaults: dict[str, object]) -> None:
    """Print every default a command used, so connected stages are never a guess."""
    for name, value in defaults.items():
        console.print(f"[dim]using default {name} = {value}[/dim]")
