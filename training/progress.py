"""Progress bars on stderr (stdout is kept for the commands' JSON results); silent when quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Task:
    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress, self._id = progress, task_id

    def set_total(self, total: int) -> None:
        if self._progress is not None:
            self._progress.update(self._id, total=total)

    def advance(self, steps: int = 1, note: str | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._id, advance=steps, **({"note": note} if note else {}))


class Reporter:
    """Owns the console output of a command: bars and one-line messages on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(file=sys.stderr, quiet=quiet)

    @contextmanager
    def task(
        self, description: str, total: int | None = None, *, transient: bool = False
    ) -> Iterator[Task]:
        """A bar; `transient` ones vanish when done (and are never left behind by an error)."""
        if self.quiet:
            yield Task(None, None)
            return
        columns = (
            TextColumn("{task.description:<22}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
        )
        with Progress(*columns, console=self.console, transient=transient) as progress:
            yield Task(progress, progress.add_task(description, total=total, note=""))

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)
