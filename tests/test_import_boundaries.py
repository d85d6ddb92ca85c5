"""The package is laid out as the pipeline: a stage imports only itself and the stages to its left
(docs/ARCHITECTURE.md), in the manner of Polygraphy's import-boundary tests. Every import counts, those
inside functions too: an import hidden in a function is still a dependency."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dlmtrt

PKG = Path(dlmtrt.__file__).resolve().parent
# left to right; the top-level modules (errors, dtypes) are below every stage
# plugins sits right after models: the kernel and its torch op / TensorRT plugin need nothing but the model
# code, and runtime backends and engine builds use them
STAGES = ["models", "plugins", "runtime", "export", "engine", "calibration", "serve", "evals", "cli"]
RANK = {s: k for k, s in enumerate(STAGES)}
FOUNDATION = {"errors", "dtypes", "paths", ""}  # `import dlmtrt` itself: __version__


def stage_of(module: str) -> str | None:
    """'dlmtrt.runtime.policies' -> 'runtime'; None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != "dlmtrt":
        return None
    if len(parts) == 1 or not ((PKG / parts[1]).is_dir() or (PKG / f"{parts[1]}.py").exists()):
        return ""  # the package itself, or one of its attributes (__version__)
    return parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file, relative imports resolved."""
    package = list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # from . import x: x may be a module
    return out


SOURCES = sorted(p for p in PKG.rglob("*.py") if "checkpoints" not in p.parts)


def test_every_stage_directory_is_known():
    dirs = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert dirs <= set(STAGES), f"a stage not in the layering: {dirs - set(STAGES)}"
    assert {"models", "runtime", "export", "evals", "cli"} <= dirs


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_stage_imports_a_later_one(path):
    own = stage_of("dlmtrt." + ".".join(path.relative_to(PKG).with_suffix("").parts))
    for line, mod in imports_of(path):
        other = stage_of(mod)
        if other is None or other in FOUNDATION or other == own:
            continue
        assert other in RANK, f"{path}:{line} imports {mod}, which is no stage"
        if own in FOUNDATION:
            pytest.fail(f"{path}:{line}: the foundation module imports the stage {other} ({mod})")
        assert RANK[other] < RANK[own], (f"{path}:{line}: {own} imports {mod} from the later stage {other}; "
                                         f"move the shared code to {own} or to an earlier stage")


def test_the_checker_sees_violations(tmp_path):
    """The rule would catch a lower stage importing a higher one, relative or absolute, inside a function."""
    f = PKG / "runtime" / "_boundary_probe.py"
    f.write_text("def f():\n    from ..evals import evaluate\n    import dlmtrt.cli\n")
    try:
        found = [m for _, m in imports_of(f)]
        assert "dlmtrt.evals" in found and "dlmtrt.evals.evaluate" in found and "dlmtrt.cli" in found
        with pytest.raises(AssertionError, match="later stage evals"):
            test_no_stage_imports_a_later_one(f)
    finally:
        f.unlink()


def test_bench_is_not_imported_by_the_package():
    for path in SOURCES:
        for line, mod in imports_of(path):
            assert mod.split(".")[0] not in ("bench", "tests", "cli"), f"{path}:{line} imports {mod}"
