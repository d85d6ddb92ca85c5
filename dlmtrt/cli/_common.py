"""What every command shares: the consoles, the progress bar, and the one place user errors become one line."""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dlmtrt.errors import DlmtrtError, OutputExistsError, UsageError
from dlmtrt.runtime.params import SEED_LIMIT

console = Console(stderr=True, log_path=False)
out = Console(width=None if sys.stdout.isatty() else 160)  # tables piped to a file are not cropped to 80


class CommandUsageError(click.ClickException):
    """A usage error found by the command itself: one line, and click's exit status for usage errors (2)."""
    exit_code = 2


def friendly_errors(fn):
    """A user-facing error (`DlmtrtError`) becomes one clean error line, exit 2 for a bad option or output path
    (as click's own usage errors), 1 for the rest (a missing or broken model, say); anything else is a bug and
    keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (UsageError, OutputExistsError) as e:
            raise CommandUsageError(str(e)) from None
        except DlmtrtError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def utf8_error(text: str) -> str | None:
    """Why `text` is not UTF-8, or None. Command-line bytes that are not UTF-8 arrive as lone surrogates
    (Python's surrogateescape), which no tokenizer takes."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"code point U+{ch:04X}"
        return f"is not valid UTF-8 ({what} at character {e.start})"


class Utf8Text(click.ParamType):
    """A string option that must be UTF-8 text (prompts, policy and task specs, names)."""
    name = "text"

    def __init__(self, empty_ok: bool = True):
        self.empty_ok = empty_ok

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        why = utf8_error(value)
        if why:
            self.fail(f"{why}; pass UTF-8 text (iconv -t UTF-8 converts other encodings)", param, ctx)
        if not self.empty_ok and not value.strip():
            self.fail("is empty; give some text", param, ctx)
        return value


TEXT = Utf8Text()
NONEMPTY_TEXT = Utf8Text(empty_ok=False)


def read_prompt_file(path: Path, what: str = "--prompt-file") -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file; a literal \\n inside a line is a newline."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what}: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         "save it as UTF-8 (iconv -t UTF-8)") from None
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path} ({e.strerror or e})") from None
    lines = [ln.replace("\\n", "\n") for ln in raw.splitlines() if ln.strip()]
    if not lines:
        raise UsageError(f"{what}: {path} has no prompt (empty lines are skipped); write one prompt per line")
    return lines


def output_file(what: str | None = None, make_parents: bool = False):
    """Click callback: the option's file can be written (dlmtrt.paths), checked while the options are parsed."""
    def callback(ctx, param, value):
        if value is None:
            return value
        from dlmtrt.paths import check_output_file
        try:
            return check_output_file(value, what or param.opts[0], make_parents=make_parents)
        except (UsageError, OutputExistsError) as e:
            raise CommandUsageError(str(e)) from None
    return callback


def output_dir(ctx, param, value):
    """Click callback: the option names a new (or empty) directory under a writable parent."""
    if value is None:
        return value
    from dlmtrt.paths import check_output_dir
    try:
        return check_output_dir(value, param.opts[0])
    except (UsageError, OutputExistsError) as e:
        raise CommandUsageError(str(e)) from None


def progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


# Option types: every value is checked by click before a command does any work, so a bad value is one line
# naming the option, never a traceback, a loaded model or a progress bar first.
MAX_TOKENS = 1_000_000  # new tokens / steps / block length: far beyond any model's positions
MAX_PROBLEMS = 100_000
POSITIVE_TOKENS = click.IntRange(1, MAX_TOKENS)
SEED = click.IntRange(0, SEED_LIMIT - 1)
NONNEGATIVE = click.FloatRange(min=0)


def positive(max_value: int | None = None) -> click.IntRange:
    return click.IntRange(1, max_value)


def dtype_choice() -> click.Choice:
    from dlmtrt.dtypes import ALIASES, DTYPE_NAMES
    return click.Choice([*DTYPE_NAMES, *ALIASES])


def check_device(ctx, param, value):
    """cpu, cuda, cuda:N or auto, and a GPU that exists: checked before anything loads."""
    if value is None or value == "cpu":
        return value
    from dlmtrt.models.loading import CheckpointError, resolve_device
    try:
        resolve_device(value)
    except CheckpointError as e:
        raise click.BadParameter(str(e)) from None
    return value


def refuse_other_families(family: str, explicit: dict) -> None:
    """A generation option the model's family does not take (`explicit`: generic parameter name -> value) is a
    usage error naming the option and the families that take it."""
    from dlmtrt.runtime.families import FAMILIES, get
    fam = get(family)
    wrong = [k for k in explicit if not fam.takes(k)]
    if wrong:
        takers = sorted({f.name for k in wrong for f in FAMILIES.values() if f.takes(k)})
        opts = [f"--{k.replace('_', '-')}" for k in wrong]
        raise click.UsageError(f"{', '.join(opts)} {'does' if len(opts) == 1 else 'do'} not apply to {family} "
                               f"models ({', '.join(takers)} only)")
