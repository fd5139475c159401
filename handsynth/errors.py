"""User-facing errors: one paragraph saying what went wrong, where, and how to fix it."""

from __future__ import annotations

from pathlib import Path


class HandsynthError(Exception):
    """An error caused by the user's input or environment, shown without a traceback.

    ``what`` says what is wrong, ``where`` names the file (and field, line) involved,
    ``fix`` tells the user what to do about it.
    """

    exit_code = 2

    def __init__(self, what: str, *, where: str | Path | None = None, fix: str | None = None):
        self.what = what.rstrip(".")
        self.where = str(where) if where is not None else None
        self.fix = fix.rstrip(".") if fix else None
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [f"{self.what}" + (f" (in {self.where})" if self.where else "") + "."]
        if self.fix:
            parts.append(f"Fix: {self.fix}.")
        return " ".join(parts)


class InputError(HandsynthError):
    """Malformed or inconsistent input data (labels, recipes, images)."""


class MissingResourceError(HandsynthError):
    """A model file, MANO file or other resource that must be supplied by the user is absent."""

    exit_code = 3


class OutputError(HandsynthError):
    """The output location cannot be written."""

    exit_code = 4


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or ``kill``'s stop request), raised in the main thread so that a run unwinds
    exactly as on Ctrl-C: finished items kept, the manifest saying "interrupted", exit status 143."""
