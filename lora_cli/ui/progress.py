"""Progress for every wait longer than a moment: a rich bar (or a spinner, when the amount of
work is unknown) on a terminal, plain periodic lines when the output is piped or NO_COLOR is
set, so a log still shows that something is moving and how far it got.

Commands open a task (`with progress.task("pre-training", total=300, console=console):`);
the loops doing the work call `progress.advance()` and, when only they know the amount,
`progress.set_total(n)` (or `add_total(n)`, their share of it). Work made of a few slow stages
names each (`with progress.step("loading the base"):`, one step when it ends), and `note()`
says what is being worked on. Outside a task all of these are no-ops, so library functions
called from tests or scripts print nothing."""

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


def add_total(n: int) -> None:
    """n more units of work became known (a stage that follows others adds its own)."""
    t = _current.get()
    if t is not None:
        t.set_total((t.total or 0) + n)


def note(what: str) -> None:
    """Say what the task is doing now (a stage, a candidate): beside the bar on a terminal, a
    plain line of its own otherwise, so a log shows which stage a slow wait is in."""
    t = _current.get()
    if t is not None:
        t.note(what)


@contextmanager
def step(what: str):
    """One named stage of a task counted in steps: noted when it starts, one step when it ends."""
    note(what)
    yield
    t = _current.get()
    if t is not None:
        t.advance(1, line=False)  # the next stage's note, or the final line, says it


class _Plain:
    """Lines like 'pre-training: 75/300 steps (25%), 12 s' at each quarter or every 10 s."""

    def __init__(self, description: str, total: int | None, unit: str, console):
        self.description, self.total, self.unit, self.console = description, total, unit, console
        self.done, self.start = 0, time.monotonic()
        self.last_time, self.last_share = self.start, 0.0

    def set_total(self, total: int) -> None:
        self.total = total

    def note(self, what: str) -> None:
        """'merging into out: loading the adapter (1/4 steps, 0 s so far)'."""
        now = time.monotonic()
        of = f"/{self.total}" if self.total else ""
        self.console.print(f"{self.description}: {what} ({self.done}{of} {self.unit}, {now - self.start:.0f} s so far)",
                           highlight=False, markup=False)
        self.last_time = now

    def advance(self, n: int, line: bool = True) -> None:
        self.done += n
        now = time.monotonic()
        share = self.done / self.total if self.total else 0.0
        if self.total and self.done >= self.total:
            return  # the final line (finish) says it
        if line and (now - self.last_time >= PLAIN_EVERY_S or share - self.last_share >= PLAIN_EVERY_SHARE):
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


def live_columns(unit: str) -> tuple:
    """Spinner, description, bar, done/total, elapsed and remaining time. All but the
    description keep their width; a long description (an output path, a stage) folds onto
    further lines, so at 80 columns the bar and the count stay."""
    from rich.progress import (BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.table import Column

    def fixed():
        return Column(no_wrap=True)

    return (SpinnerColumn(table_column=fixed()),
            TextColumn("{task.description}", table_column=Column(overflow="fold", ratio=1, min_width=16)),
            BarColumn(bar_width=20, table_column=fixed()), MofNCompleteColumn(table_column=fixed()),
            TextColumn(unit, table_column=fixed()), TimeElapsedColumn(table_column=fixed()),
            TimeRemainingColumn(table_column=fixed()))


class _Live:
    """A rich bar (live_columns), the current stage after the description."""

    def __init__(self, description: str, total: int | None, unit: str, console):
        from rich.progress import Progress

        self.description = description
        self.progress = Progress(*live_columns(unit), console=console, transient=False)
        self.task_id = self.progress.add_task(description, total=total)
        self.progress.start()

    @property
    def total(self) -> float | None:
        return self.progress.tasks[0].total

    def set_total(self, total: int) -> None:
        self.progress.update(self.task_id, total=total)

    def note(self, what: str) -> None:
        self.progress.update(self.task_id, description=f"{self.description}: {what}")

    def advance(self, n: int, line: bool = True) -> None:
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
