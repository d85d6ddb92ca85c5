"""What every command shares: the consoles, the progress bar, and the one place user errors become one line."""
from __future__ import annotations

import functools
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dlmtrt.errors import DlmtrtError

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)  # tables piped to a file are not cropped to 80


def friendly_errors(fn):
    """A user-facing error (`DlmtrtError`, or an output directory in the way) becomes one clean error line;
    anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (DlmtrtError, FileExistsError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)
