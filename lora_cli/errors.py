"""Errors a user can fix. The CLI prints them without a traceback and exits 2."""

from __future__ import annotations


class LoraError(Exception):
    """A problem with the user's input: recipe, data, paths, flags.

    `message` says what is wrong and where; `hint` says how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  fix: {self.hint}"


class RecipeError(LoraError):
    """Every problem found in a recipe, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


class DataError(LoraError):
    """A problem in a data file, naming the file and the row."""
