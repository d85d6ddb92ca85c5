"""Checks that an output path can be written, made before any work: a result that cannot be saved is found
in the first second, not after the run (and nothing is left behind by the check)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dlmtrt.errors import OutputExistsError, UsageError


def _probe(directory: Path, what: str) -> None:
    """Create and remove a file in `directory`: the only test that holds for root, read-only mounts and /proc."""
    try:
        fd, name = tempfile.mkstemp(prefix=".dlmtrt-write-check-", dir=directory)
    except OSError as e:
        raise UsageError(f"{what}: cannot write in {directory} ({e.strerror or e}); choose a writable location") \
            from None
    os.close(fd)
    os.unlink(name)


def _existing_ancestor(path: Path, what: str) -> Path:
    """The nearest ancestor of `path` that exists; it must be a directory."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what}: {parent} is a file, not a directory; choose another path")
            return parent
    return Path("/")


def check_output_file(path: str | Path, what: str = "--out", *, overwrite: bool = True,
                      make_parents: bool = False) -> Path:
    """`path` is a file this process can write: not a directory, in a directory that exists (or, with
    `make_parents`, can be made) and accepts new files. An existing file is replaced unless `overwrite` is
    False. Returns the absolute path."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise UsageError(f"{what}: {p} is a directory; give a file path")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{what}: {p} exists; choose another file or pass --overwrite")
    parent = p.parent
    if not parent.exists():
        if not make_parents:
            raise UsageError(f"{what}: directory {parent} does not exist; create it or choose another path")
        parent = _existing_ancestor(p, what)
    elif not parent.is_dir():
        raise UsageError(f"{what}: {parent} is a file, not a directory; choose another path")
    _probe(parent, what)
    if p.exists() and not os.access(p, os.W_OK):
        raise UsageError(f"{what}: {p} is not writable; choose another path")
    return p


def check_output_dir(path: str | Path, what: str = "--out", *, overwrite: bool = False,
                     offer_overwrite: bool = False) -> Path:
    """`path` is a directory to be made (or an empty one, or any with `overwrite`) under a writable parent;
    `offer_overwrite`: the command has an --overwrite flag to suggest."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what}: {p} exists and is not a directory; choose another path")
    if p.is_dir() and any(p.iterdir()) and not overwrite:
        raise OutputExistsError(f"{what}: directory {p} is not empty; choose a new path"
                                + (" or pass --overwrite" if offer_overwrite else ""))
    _probe(p if p.is_dir() else _existing_ancestor(p, what), what)
    return p


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`: a reader (or an interrupted
    run) never sees half a file."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
