"""Progress for every wait longer than a moment: a rich bar (or a spinner, when the amount of
work is unknown) on a terminal, plain periodic lines when the output is piped or NO_COLOR is
set, so a log still shows that something is moving and how far it got.

Commands open a task (`with progress.task("pre-training", total=300, console=console):`);
the loops doing the work call `progress.advance()` and, when only they know the amount,
`progress.set_total(n)`. Outside a task both are no-ops, so library functions called from
tests or scripts print nothing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar

from lora_cli.ui.terminal import plain

PLAIN_EVERY_S = 10.0      # a plain line at least this often while work moves
PLAIN_EVERY_SHARE = 0.25  # and at every quarter of the work

_current: ContextVar = ContextVar("lora_progress", default=None)


def advance(n: int = 1) -> None:
    t = _current.get()
    if t is not None:
        t.advance(n)


def set_total(total: int) -> None:
    t = _current.get()
    if t is not None:
        t.set_total(total)


class _Plain:
    """Lines like 'pre-training: 75/300 steps (25%), 12 s' at each quarter or every 10 s."""

    def __init__(self, description: str, total: int | None, unit: str, console):
        self.description, self.total, self.unit, self.console = description, total, unit, console
        self.done, self.start = 0, time.monotonic()
        self.last_time, self.last_share = self.start, 0.0

    def set_total(self, total: int) -> None:
        self.total = total

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        share = self.done / self.total if self.total else 0.0
        if now - self.last_time >= PLAIN_EVERY_S or share - self.last_share >= PLAIN_EVERY_SHARE:
            self.last_time, self.last_share = now, share
            self._line(now)

    def _line(self, now: float, final: bool = False) -> None:
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        word = "done" if final else "so far"
        self.console.print(f"{self.description}: {self.done}{of} {self.unit}{pct}, {now - self.start:.0f} s {word}",
                           highlight=False, markup=False)

    def finish(self) -> None:
        self._line(time.monotonic(), final=True)


class _Live:
    """A rich bar: description, bar, done/total, elapsed and remaining time (fits 80 columns)."""

    def __init__(self, description: str, total: int | None, unit: str, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, transient=False)
        self.task_id = self.progress.add_task(description, total=total)
        self.progress.start()

    def set_total(self, total: int) -> None:
        self.progress.update(self.task_id, total=total)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task_id, n)

    def finish(self) -> None:
        self.progress.stop()


@contextmanager
def task(description: str, console, total: int | None = None, unit: str = "steps"):
    """Show progress of one piece of work on `console` (the command's own output)."""
    shown = (_Plain if plain() else _Live)(description, total, unit, console)
    token = _current.set(shown)
    try:
        yield shown
    except BaseException:
        if isinstance(shown, _Live):
            shown.finish()  # stop redrawing; the plain form adds no line: the error says what happened
        raise
    finally:
        _current.reset(token)
    shown.finish()


@contextmanager
def spinner(description: str, console):
    """A spinner with the elapsed time while something of unknown length runs (a model loads,
    a merge writes). Plain output says nothing until the command's own next line."""
    if plain():
        yield
        return
    with console.status(f"{description} ...", spinner="dots"):
        yield
