"""User-facing errors: one class whose message is the whole story (problem + fix).

Library code raises :class:`UserError` (or a subclass) wherever a user's input is wrong: a bad option, a
file that does not exist, an artifact for another model. The command line prints the message on one line
to stderr and exits with status 2, without a traceback; anything else is a bug and keeps its traceback.
The subclasses also inherit the built-in exception a Python caller would expect (``ValueError``,
``FileNotFoundError``, ``KeyError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message names it and says how to fix it."""

    exit_code = 2


class InvalidInputError(UserError, ValueError):
    """A value is malformed, out of range, non-finite or inconsistent with another one."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or is incomplete."""


class IncompatibleArtifactError(InvalidInputError):
    """An artifact was made for a model of another shape, or its files do not match its config."""


class BusyError(UserError):
    """Another process is writing to the same folder right now."""


class JudgeError(UserError):
    """A judge endpoint kept failing after its retries (the verdicts obtained so far are kept)."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`InvalidInputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InvalidInputError(message)
