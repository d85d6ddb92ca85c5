"""The one base class of errors a user can fix: the CLI prints them as one line; anything else is a bug
and keeps its traceback."""
from __future__ import annotations


class DlmtrtError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""


class UsageError(DlmtrtError, ValueError):
    """A bad parameter, option or policy spec (also a ValueError, as Python code expects of bad values).
    `field` names the offending parameter as the Python API spells it (steps, max_new_tokens, ...), so that the
    CLI and the server can name their own option or request field without parsing the message."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class OutputExistsError(DlmtrtError, FileExistsError):
    """An output path is in the way (also a FileExistsError)."""
