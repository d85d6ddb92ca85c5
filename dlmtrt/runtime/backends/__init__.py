"""Step backends, one file each (`<name>_backend.py` in this package, found by listing it): adding a backend is
adding one file. Its class is the module's `BACKEND` and declares its capabilities, which the CLI choices,
`compare`, the server's scheduler and the engine builds read from here:

    name                  as users type it (--backend)
    takes                 "checkpoint" (directory, alias or repo id), "export" (dlmtrt export) or "engine"
    default_device        where it runs when --device is left out
    selects_logit_rows    honours StepInputs.logit_rows / need_drift (the output head on the needed rows only)
    shares_cache          owns its K/V buffers (new_cache hands the same ones out again): one session at a time
    deep_rows             takes StepInputs.deep (rows that join from a deeper layer on: BiCache) and prefix_states
    polygraphy_runner     the Polygraphy runner `dlmtrt compare` runs it with, or None
    describe(model)       -> ModelSource, cheap, without loading weights (for checking options first)
    open(model, dtype, device, progress) -> (backend, tokenizer, ModelSource)

The names come from the file names, so `--help` and usage errors list them without importing any backend.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

from dlmtrt.errors import UsageError
from dlmtrt.models.args import ModelArgs

_MODULES = {m.name.removesuffix("_backend").replace("_", "-"): m.name for m in pkgutil.iter_modules(__path__)
            if m.name.endswith("_backend")}
BACKENDS: tuple[str, ...] = tuple(sorted(_MODULES, key=lambda n: (n not in ("torch", "torch-graph"), n)))


class Backend:
    """The capabilities' defaults (see the module docstring); a backend class overrides what differs."""

    name: str
    takes = "checkpoint"
    default_device = "cpu"
    selects_logit_rows = False
    shares_cache = False
    deep_rows = False
    polygraphy_runner: str | None = None
    step_options: tuple[str, ...] = ()  # constructor options `bench` may pass (torch-graph: compile, attention)


class CheckpointBackend(Backend):
    """A backend over a checkpoint loaded into memory (`cls(model)` takes a models.transformer.DiffusionLM)."""

    @classmethod
    def describe(cls, model: str) -> "ModelSource":
        return checkpoint_source(cls.name, model)

    @classmethod
    def open(cls, model: str, dtype: str | None = None, device: str | None = None, progress=None):
        return open_checkpoint_backend(cls, model, dtype, device, progress)


@dataclass(frozen=True)
class ModelSource:
    """What a backend runs, described without loading it: where it is, its family and its architecture."""

    path: Path
    family: str
    args: ModelArgs
    dtype: str | None = None  # fixed by the file for exported graphs; chosen at load time for checkpoints


def backend_class(name: str):
    """The class of backend `name` (imports its module)."""
    if name not in _MODULES:
        raise UsageError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}", field="backend")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").BACKEND


def names_with(**capabilities) -> tuple[str, ...]:
    """The backends whose capabilities have these values, e.g. names_with(takes="checkpoint")."""
    return tuple(n for n in BACKENDS if all(getattr(backend_class(n), k) == v for k, v in capabilities.items()))


def describe_model(backend: str, model: str) -> ModelSource:
    """Cheap description for validating options before the (possibly slow) load."""
    return backend_class(backend).describe(model)


def make_backend(name: str, model: str, dtype: str | None = None, device: str | None = None, progress=None):
    """(backend, tokenizer, ModelSource) for a backend name and a model (what the backend `takes`). `dtype`
    None means the default (float32 for checkpoints, the exported dtype for graphs); `device` None the
    backend's default."""
    return backend_class(name).open(model, dtype=dtype, device=device, progress=progress)


def shares_cache(backend) -> bool:
    """Whether a backend object owns one K/V buffer that every session's `new_cache` hands out again."""
    return bool(backend.shares_cache)


# ---- shared by the backends that take a checkpoint -----------------------------------------------------------

def checkpoint_source(backend: str, model: str) -> ModelSource:
    from dlmtrt.models.loading import open_checkpoint
    _not_an_artifact(backend, model)
    ck = open_checkpoint(model)
    return ModelSource(ck.path, ck.family, ck.args)


def open_checkpoint_backend(cls, model: str, dtype: str | None, device: str | None, progress):
    from dlmtrt.dtypes import dtype_name
    from dlmtrt.models.loading import load
    _not_an_artifact(cls.name, model)
    m, tok, ck = load(model, dtype=dtype or "float32", device=device or cls.default_device, progress=progress)
    return cls(m), tok, ModelSource(ck.path, ck.family, ck.args, dtype_name(m.model.embed_tokens.weight.dtype))


def _not_an_artifact(backend: str, model: str) -> None:
    """A checkpoint backend given an ONNX export or an engine: say which backend runs it, rather than that the
    weights are missing."""
    p = Path(model).expanduser()
    takers = {kind: ", ".join(names_with(takes=kind)) for kind in ("export", "engine")}
    if (p.is_dir() and (p / "model.onnx").is_file()) or (p.is_file() and p.suffix == ".onnx"):
        raise UsageError(f"{model} is an ONNX export (dlmtrt export), not a checkpoint: run it with --backend "
                         f"{takers['export']} (--backend {backend} takes a checkpoint directory, alias or repo id)",
                         field="backend")
    if p.is_file() and (p.suffix in (".engine", ".plan") or p.with_name(p.name + ".json").is_file()):
        raise UsageError(f"{model} is a TensorRT engine (dlmtrt build-engine), not a checkpoint: run it with "
                         f"--backend {takers['engine']} (--backend {backend} takes a checkpoint directory, alias or "
                         "repo id)", field="backend")


def export_dir_of(engine: Path) -> Path:
    """The export directory an engine was built from (its config and tokenizer), else the engine's folder."""
    from ..artifacts import read_manifest
    d = Path(read_manifest(engine)[1].get("onnx", {}).get("dir", ""))
    return d if d.is_dir() and (d / "config.json").exists() else Path(engine).parent
