"""A live list of a command's steps on stderr (loading, tracing, building, saving, each verify check).

Shown only when stderr is a terminal and the command is not printing ``--json``: scripts and pipes get
exactly the output they got before. The display is transient: once the command is done it is erased,
and the command's own table or line is what stays on the screen.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

Step = Callable[[str], None]


def _quiet(label: str) -> None:
    pass


def _inert(text: str) -> str:
    """Labels name files and specs: show them as text, never as markup or terminal control characters."""
    return escape("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))


class _Steps:
    """Each call starts a new step and marks the one before it done, with its time."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.current: TaskID | None = None

    def __call__(self, label: str) -> None:
        self.finish()
        self.current = self.progress.add_task(_inert(label), total=None)

    def finish(self) -> None:
        if self.current is not None:
            self.progress.update(self.current, total=1, completed=1)
            self.progress.stop_task(self.current)  # freezes its elapsed time
            self.current = None


def enabled(console: Console, quiet: bool) -> bool:
    return not quiet and console.is_terminal


@contextlib.contextmanager
def steps(console: Console, quiet: bool = False) -> Iterator[Step]:
    """``with steps(err, quiet=as_json) as step: step("loading ..."); ...``: a spinner per running step and
    the time each took; a no-op when ``quiet`` or when ``console`` is not a terminal."""
    if not enabled(console, quiet):
        yield _quiet
        return
    columns = (SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
               TimeElapsedColumn())
    # stdout is not redirected: output meant for a pipe must never land on the terminal's stderr.
    with Progress(*columns, console=console, transient=True, redirect_stdout=False) as progress:
        s = _Steps(progress)
        try:
            yield s
        finally:
            s.finish()
