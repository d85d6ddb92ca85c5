"""Step backends, one file each. `make_backend` is the only place that knows them all."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlmtrt.errors import UsageError
from dlmtrt.models.args import ModelArgs

BACKENDS = ("torch", "torch-graph", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class ModelSource:
    """What a backend runs, described without loading it: where it is, its family and its architecture."""

    path: Path
    family: str
    args: ModelArgs
    dtype: str | None = None  # fixed by the file for exported graphs; chosen at load time for checkpoints


def describe_model(backend: str, model: str) -> ModelSource:
    """Cheap description for validating options before the (possibly slow) load."""
    if backend in ("torch", "torch-graph"):
        from dlmtrt.models.loading import open_checkpoint
        _not_an_artifact(backend, model)
        ck = open_checkpoint(model)
        return ModelSource(ck.path, ck.family, ck.args)
    if backend == "onnxruntime":
        from .onnxruntime_backend import describe
        path, args, meta = describe(model)
        return ModelSource(path.parent, args.family, args, meta["dtype"])
    if backend == "tensorrt":
        from .tensorrt_backend import describe as describe_engine
        path, args, meta = describe_engine(model)
        return ModelSource(export_dir_of(path), args.family, args, meta["dtype"])
    raise UsageError(f"unknown backend '{backend}'; available: {', '.join(BACKENDS)}")


def _not_an_artifact(backend: str, model: str) -> None:
    """A checkpoint backend given an ONNX export or an engine: say which backend runs it, rather than that the
    weights are missing."""
    p = Path(model).expanduser()
    if (p.is_dir() and (p / "model.onnx").is_file()) or (p.is_file() and p.suffix == ".onnx"):
        raise UsageError(f"{model} is an ONNX export (dlmtrt export), not a checkpoint: run it with --backend "
                         f"onnxruntime (--backend {backend} takes a checkpoint directory, alias or repo id)",
                         field="backend")
    if p.is_file() and (p.suffix in (".engine", ".plan") or p.with_name(p.name + ".json").is_file()):
        raise UsageError(f"{model} is a TensorRT engine (dlmtrt build-engine), not a checkpoint: run it with "
                         f"--backend tensorrt (--backend {backend} takes a checkpoint directory, alias or repo id)",
                         field="backend")


def export_dir_of(engine: Path) -> Path:
    """The export directory an engine was built from (its config and tokenizer), else the engine's folder."""
    from .tensorrt_backend import read_manifest
    d = Path(read_manifest(engine)[1].get("onnx", {}).get("dir", ""))
    return d if d.is_dir() and (d / "config.json").exists() else Path(engine).parent


def make_backend(name: str, model: str, dtype: str | None = None, device: str | None = "cpu", progress=None):
    """(backend, tokenizer, ModelSource) for a backend name and a model: a checkpoint directory, alias or repo id
    for `torch` and `torch-graph` (the fast path: in-place cache, row buckets, CUDA graphs on a GPU); an
    export directory (`dlmtrt export`) for `onnxruntime`; an engine file (`dlmtrt build-engine`) for `tensorrt`. `dtype` None means the default
    (float32 for checkpoints, the exported dtype for graphs)."""
    if name in ("torch", "torch-graph"):
        from dlmtrt.dtypes import dtype_name
        from dlmtrt.models.loading import load

        m, tok, ck = load(model, dtype=dtype or "float32", device=device, progress=progress)
        if name == "torch":
            from .torch_backend import TorchBackend
            be = TorchBackend(m)
        else:
            from .torch_graph_backend import TorchGraphBackend
            be = TorchGraphBackend(m)
        return be, tok, ModelSource(ck.path, ck.family, ck.args, dtype_name(m.model.embed_tokens.weight.dtype))
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend, load_tokenizer
        be = OnnxRuntimeBackend(model, device=device or "cpu")
        if dtype is not None and dtype != be.meta["dtype"]:
            raise UsageError(f"{be.path} was exported as {be.meta['dtype']}, not {dtype}: pass --dtype "
                             f"{be.meta['dtype']} (or leave it out), or export again with --dtype {dtype}")
        return be, load_tokenizer(be), ModelSource(be.path.parent, be.args.family, be.args, be.meta["dtype"])
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend
        from .tensorrt_backend import load_tokenizer as engine_tokenizer
        from .tensorrt_backend import read_manifest
        _, _, _, meta = read_manifest(model)
        if dtype is not None and dtype != meta["dtype"]:
            raise UsageError(f"{model} was built from a {meta['dtype']} export, not {dtype}: leave --dtype out")
        be = TensorRTBackend(model, device=device or "cuda")
        return be, engine_tokenizer(be), ModelSource(export_dir_of(be.path), be.args.family, be.args,
                                                     be.meta["dtype"])
    raise UsageError(f"unknown backend '{name}'; available: {', '.join(BACKENDS)}")
