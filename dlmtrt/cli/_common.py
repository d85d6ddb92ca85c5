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
    """A user-facing error (`DlmtrtError`) becomes one clean error line; anything else is a bug and keeps its
    traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except DlmtrtError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


# Option types: every value is checked by click before a command does any work, so a bad value is one line
# naming the option, never a traceback, a loaded model or a progress bar first.
MAX_TOKENS = 1_000_000  # new tokens / steps / block length: far beyond any model's positions
MAX_PROBLEMS = 100_000
POSITIVE_TOKENS = click.IntRange(1, MAX_TOKENS)
SEED = click.IntRange(0, 2 ** 64 - 1)  # what torch.manual_seed takes
NONNEGATIVE = click.FloatRange(min=0)


def positive(max_value: int | None = None) -> click.IntRange:
    return click.IntRange(1, max_value)


def dtype_choice() -> click.Choice:
    from dlmtrt.dtypes import ALIASES, DTYPE_NAMES
    return click.Choice([*DTYPE_NAMES, *ALIASES])


def check_device(ctx, param, value):
    """cpu, cuda, cuda:N or auto, and a GPU that exists: checked before anything loads."""
    if value is None:
        return value
    from dlmtrt.models.loading import CheckpointError, resolve_device
    try:
        resolve_device(value)
    except CheckpointError as e:
        raise click.BadParameter(str(e)) from None
    return value
