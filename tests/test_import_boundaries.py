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


def module_of(path: Path) -> str:
    """'dlmtrt.runtime.policies' for PKG/runtime/policies.py."""
    return ".".join(path.relative_to(PKG.parent).with_suffix("").parts)


def imports_of(path: Path, module: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in a file (named `module`, default: its place in the package),
    relative imports resolved."""
    package = (module or module_of(path)).split(".")[:-1]
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


def check_boundaries(path: Path, module: str) -> None:
    """Fail unless file `path`, module `module` of the package, imports only its own and earlier stages."""
    own = stage_of(module)
    for line, mod in imports_of(path, module):
        other = stage_of(mod)
        if other is None or other in FOUNDATION or other == own:
            continue
        assert other in RANK, f"{path}:{line} imports {mod}, which is no stage"
        if own in FOUNDATION:
            pytest.fail(f"{path}:{line}: the foundation module imports the stage {other} ({mod})")
        assert RANK[other] < RANK[own], (f"{path}:{line}: {own} imports {mod} from the later stage {other}; "
                                         f"move the shared code to {own} or to an earlier stage")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PKG)))
def test_no_stage_imports_a_later_one(path):
    check_boundaries(path, module_of(path))


def test_the_checker_sees_violations(tmp_path):
    """The rule would catch a lower stage importing a higher one, relative or absolute, inside a function (a
    probe file outside the package, checked as if it were dlmtrt/runtime/_probe.py)."""
    f = tmp_path / "_probe.py"
    f.write_text("def f():\n    from ..evals import evaluate\n    import dlmtrt.cli\n")
    found = [m for _, m in imports_of(f, "dlmtrt.runtime._probe")]
    assert "dlmtrt.evals" in found and "dlmtrt.evals.evaluate" in found and "dlmtrt.cli" in found
    with pytest.raises(AssertionError, match="later stage evals"):
        check_boundaries(f, "dlmtrt.runtime._probe")
    f.write_text("from ..models import args\n")
    check_boundaries(f, "dlmtrt.runtime._probe")  # an earlier stage is fine


def test_bench_is_not_imported_by_the_package():
    for path in SOURCES:
        for line, mod in imports_of(path):
            assert mod.split(".")[0] not in ("bench", "tests", "cli"), f"{path}:{line} imports {mod}"
