"""Export one denoising step (the step contract) of a checkpoint to ONNX.

Why the dynamo exporter (`torch.onnx.export(..., dynamo=True)`, torch.export + onnxscript): it gives a flat,
readable graph with symbolic `batch`/`active`/`canvas` dims straight from `torch.export.Dim`, keeps parameter
names as initializer names, and can trace a model whose weights are never materialised. The TorchScript
exporter is deprecated in this PyTorch and needs real weights to trace.

Memory: the model is built on the meta device and traced without weights; each initializer is then a lazy
tensor that reads its bytes from the safetensors shard (converted to the export dtype) only when the file is
written, one tensor at a time. Peak memory is therefore far below the weight bytes, which is what lets a
7B checkpoint export on a 24 GB machine. The graph optimizer is told not to fold anything that touches a
weight (it would materialise transposed copies).

Files are written to a temporary directory next to the output and renamed into place only after every check
passed, so a failed export leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import torch

from dlmtrt.dtypes import DTYPES
from dlmtrt.paths import check_output_dir
from dlmtrt.errors import DlmtrtError

from dlmtrt.models.loading import Checkpoint, load_tokenizer, open_checkpoint, quantization_format, read_tensor
from dlmtrt.models.loading import tensor_index
from dlmtrt.models.transformer import DiffusionLM, rope_inv_freq

from . import attention as attn
from .checks import available_memory, check_structure, memory_needed
from .checks import numeric_check as run_numeric_check
from .metadata import write_metadata
from .qdq import FP8_MIN_OPSET, insert_qdq
from dlmtrt.runtime.contract import input_names, output_names

from .step_graph import StepGraph, dynamic_shapes, example_inputs

SUPPORTED_OPSETS = range(18, 24)
DEFAULT_OPSET = 18
EXTERNAL_DATA_BYTES = 2 * 2 ** 30  # protobuf's limit: above it the weights go to one side file
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json", "generation_config.json")


class ExportError(DlmtrtError, RuntimeError):
    """The export cannot proceed or its checks failed; the message says what to do."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class ExportResult:
    out_dir: Path
    onnx_path: Path
    data_path: Path | None
    dtype: str
    opset: int
    attention: str
    weight_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    checks: object | None = None  # export.checks.NumericReport when the numeric check ran


def _dlmtrt_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def checkpoint_sha256(ck: Checkpoint, progress=None) -> str:
    """sha256 over config.json and the weight files (names and bytes): identifies the exact source weights.
    Files in the Hugging Face cache are named by their sha256 already; those are not re-hashed."""
    h = hashlib.sha256()
    for f in [ck.path / "config.json", *ck.weight_files]:
        real = f.resolve()
        h.update(f.name.encode())
        if real.parent.name == "blobs" and len(real.name) == 64:
            h.update(real.name.encode())
            continue
        with open(real, "rb") as fh:
            while chunk := fh.read(16 * 2 ** 20):
                h.update(chunk)
                if progress is not None:
                    progress(len(chunk))
    return h.hexdigest()


def check_tokenizer(tok, ck: Checkpoint, where: Path) -> None:
    """A tokenizer that does not belong to the model produces garbage silently; refuse it."""
    a = ck.args
    mask_id = tok.convert_tokens_to_ids(tok.mask_token) if tok.mask_token else None
    if mask_id != a.mask_token_id:
        raise ExportError(f"tokenizer in {where} does not match {ck.path}: its mask token is {tok.mask_token!r} "
                          f"(id {mask_id}) but the model's mask_token_id is {a.mask_token_id}; pass the tokenizer "
                          "shipped with the weights (--tokenizer)")
    if len(tok) > a.vocab_size:
        raise ExportError(f"tokenizer in {where} has {len(tok)} tokens but the model's vocabulary has {a.vocab_size} "
                          "rows; pass the tokenizer shipped with the weights (--tokenizer)")
    eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None
    if eos is not None and eos != a.eos_token_id and tok.convert_ids_to_tokens(a.eos_token_id) is None:
        raise ExportError(f"tokenizer in {where} has no token with the model's eos id {a.eos_token_id}; pass the "
                          "tokenizer shipped with the weights (--tokenizer)")


def _prepare_out_dir(out: Path) -> Path:
    """The temporary directory beside the destination (checked by `check_output_dir` before any work)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the export private to its writer
        return tmp
    except OSError as e:
        raise ExportError(f"cannot write the export to {out}: {e.strerror or e} ({e.filename or out.parent}); "
                          "choose a writable --out") from None


def _lazy_weights(model: ir.Model, ck: Checkpoint, index: dict, dtype: torch.dtype, prefix: str,
                  given: set[str] = frozenset()) -> int:
    """Give every initializer its weight as a lazy tensor read from the checkpoint; rename `prefix`.x to x.
    Initializers named in `given` have their values already (the Q/DQ rewrite's). Returns the weight bytes."""
    a = ck.args
    total = 0
    for name, value in list(model.graph.initializers.items()):
        if name in given:
            total += int(math.prod(value.shape.dims) * value.dtype.itemsize)
            continue
        ours = name.removeprefix(prefix)
        if ours == "inv_freq":
            fn = lambda: ir.tensor(rope_inv_freq(a))  # noqa: E731
        else:
            ref = index.get(ours) or (index.get("model.embed_tokens.weight") if ours == "lm_head.weight"
                                      and a.tie_word_embeddings else None)
            if ref is None:
                raise ExportError(f"internal: exported initializer {name} has no checkpoint tensor")
            fn = lambda ref=ref: ir.tensor(read_tensor(ref, dtype))  # noqa: E731
        value.const_value = ir.LazyTensor(fn, dtype=value.dtype, shape=value.shape)
        total += int(math.prod(value.shape.dims) * value.dtype.itemsize)
        if ours != name:
            model.graph.initializers.pop(name)
            value.name = ours
            model.graph.initializers[ours] = value
    return total


def _optimize(model: ir.Model) -> None:
    """onnxscript's cleanup (constant folding of shape arithmetic, CSE, dead code), never touching weights."""
    import onnxscript.optimizer
    weights = {v.name for v in model.graph.initializers.values() if math.prod(v.shape.dims) > 1024}

    def should_fold(node: ir.Node) -> bool | None:
        return False if any(i is not None and i.name in weights for i in node.inputs) else None

    onnxscript.optimizer.optimize_ir(model, should_fold=should_fold)


def trace_step(ck: Checkpoint, dtype: torch.dtype, opset: int, attention: str,
               index: dict | None = None) -> tuple[ir.Model, int]:
    """The step graph of `ck` with lazy weights: (model, weight bytes). `index`: `tensor_index(ck)` if known."""
    a = ck.args
    with torch.device("meta"):
        m = DiffusionLM(a).to(dtype)
        m.register_buffer("inv_freq", rope_inv_freq(a), persistent=False)
    m.tie_weights()
    if attention == "plugin":
        for layer in m.model.layers:
            layer.self_attn.attend = attn.plugin_attention
    n = a.num_layers
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision absent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(StepGraph(m).eval(), example_inputs(a, dtype, "meta"), dynamo=True, optimize=False,
                                 dynamic_shapes=dynamic_shapes(n), input_names=input_names(n),
                                 output_names=output_names(n), opset_version=opset,
                                 custom_translation_table=attn.translation_table() if attention == "plugin" else None,
                                 verbose=bool(os.environ.get("DLMTRT_EXPORT_VERBOSE")))
    model = prog.model
    index = index if index is not None else tensor_index(ck)
    fmt = quantization_format(ck)
    given = insert_qdq(model, ck, index, fmt, dtype, "m.") if fmt is not None else set()
    nbytes = _lazy_weights(model, ck, index, dtype, "m.", given)
    _optimize(model)
    return model, nbytes


def export_step(model: str, out: Path, *, dtype: str = "float32", opset: int | None = None,
                attention: str = "standard", tokenizer: str | None = None, overwrite: bool = False,
                numeric_check: bool = True, log=print) -> ExportResult:
    """Export, check, and move into `out`: model.onnx (+ model.onnx.data above 2 GB), tokenizer and configs.
    A calibrated checkpoint (`dlmtrt calibrate`) becomes a Q/DQ graph (export/qdq.py). `opset` None: the
    default, 18, or 19 for fp8 (E4M3 Q/DQ needs it)."""
    _check_choices(opset, dtype, attention)
    out = check_output_dir(out, "--out", overwrite=overwrite, offer_overwrite=True)
    ck = open_checkpoint(model)
    opset = _opset_for(ck, model, opset)
    tok_dir = _checked_tokenizer_dir(ck, tokenizer)
    index = tensor_index(ck)  # validates the weights before any heavy work
    tmp = _prepare_out_dir(out)
    times: dict[str, float] = {}
    try:
        path, nbytes = _write_export(ck, index, tmp, tok_dir, dtype, opset, attention, times, log)
        with _timed(times, "structure_check"):
            log("checking: onnx.checker (full), shape inference, step contract inputs/outputs")
            check_structure(path, ck.args.num_layers)
        report = _check_numerics(path, ck, nbytes, dtype, attention, times, log) if numeric_check else None
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data = out / DATA_FILE
    return ExportResult(out, out / ONNX_FILE, data if data.exists() else None, dtype, opset, attention, nbytes, times,
                        report)


def _check_choices(opset: int | None, dtype: str, attention: str) -> None:
    """Refuse an unsupported opset, dtype or attention before any work."""
    if opset is not None and opset not in SUPPORTED_OPSETS:
        raise ExportError(f"opset {opset} is not supported: choose one of {SUPPORTED_OPSETS.start}.."
                          f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not supported: choose one of {', '.join(DTYPES)}")
    if attention not in ("standard", "plugin"):
        raise ExportError(f"attention {attention!r} is not supported: choose standard or plugin")


def _opset_for(ck: Checkpoint, model: str, opset: int | None) -> int:
    """The opset to export with: the default when none is given, at least FP8_MIN_OPSET for an fp8 checkpoint
    (its E4M3 Q/DQ needs it), where a lower one asked for is refused."""
    fp8 = quantization_format(ck) == "fp8"
    if opset is None:
        opset = max(DEFAULT_OPSET, FP8_MIN_OPSET) if fp8 else DEFAULT_OPSET
    if fp8 and opset < FP8_MIN_OPSET:
        raise ExportError(f"{model} is an fp8 checkpoint: its E4M3 QuantizeLinear/DequantizeLinear need opset "
                          f"{FP8_MIN_OPSET} or later; pass --opset {FP8_MIN_OPSET} (or leave --opset out)")
    return opset


def _checked_tokenizer_dir(ck: Checkpoint, tokenizer: str | None) -> Path:
    """The directory whose tokenizer files the export ships (`tokenizer`, else the checkpoint's), after checking
    that its tokenizer belongs to the model."""
    tok_dir = Path(tokenizer).expanduser() if tokenizer else ck.path
    if tokenizer:
        from transformers import PreTrainedTokenizerFast
        if not (tok_dir / "tokenizer.json").exists():
            raise ExportError(f"no tokenizer.json in {tok_dir}; pass a directory with the model's tokenizer files")
        tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    else:
        tok = load_tokenizer(ck)
    check_tokenizer(tok, ck, tok_dir)
    return tok_dir


@contextlib.contextmanager
def _timed(times: dict[str, float], key: str):
    """Record the seconds the block took as times[key] (not when it raises: the export fails then)."""
    t0 = time.perf_counter()
    yield
    times[key] = time.perf_counter() - t0


def _write_export(ck: Checkpoint, index: dict, tmp: Path, tok_dir: Path, dtype: str, opset: int, attention: str,
                  times: dict[str, float], log) -> tuple[Path, int]:
    """(path of model.onnx, weight bytes): the traced graph with its metadata written into `tmp` (the weights read
    from the checkpoint while it is written), the tokenizer and configs beside it."""
    with _timed(times, "trace"):
        log(f"tracing the {ck.family} step graph ({ck.args.num_layers} layers, {dtype}, opset {opset}, "
            f"{attention} attention)")
        graph, nbytes = trace_step(ck, DTYPES[dtype], opset, attention, index)
    with _timed(times, "hash"):
        write_metadata(graph, ck, dtype=dtype, attention=attention, opset=opset,
                       source_sha256=checkpoint_sha256(ck), dlmtrt=_dlmtrt_version())
    with _timed(times, "write"):
        path = tmp / ONNX_FILE
        external = nbytes > EXTERNAL_DATA_BYTES
        log(f"writing {nbytes / 2**20:.1f} MiB of weights" + (f" to {DATA_FILE}" if external else ""))
        ir.save(graph, path, external_data=DATA_FILE if external else None)
        del graph
        _copy_tokenizer_files(ck, tok_dir, tmp)
    return path, nbytes


def _copy_tokenizer_files(ck: Checkpoint, tok_dir: Path, tmp: Path) -> None:
    """The tokenizer's files from `tok_dir`; the model's configs from the checkpoint where `tok_dir` has none."""
    for name in TOKENIZER_FILES:
        if (tok_dir / name).exists():
            shutil.copy2(tok_dir / name, tmp / name)
        elif name in ("config.json", "generation_config.json") and (ck.path / name).exists():
            shutil.copy2(ck.path / name, tmp / name)


def _check_numerics(path: Path, ck: Checkpoint, nbytes: int, dtype: str, attention: str, times: dict[str, float],
                    log):
    """ONNX Runtime against PyTorch fp32 on random step inputs (export.checks.NumericReport); refused up front
    when this machine lacks the memory for both, and an error carrying the report when they disagree."""
    need, have = memory_needed(ck.args, nbytes), available_memory()
    if need > have:
        raise ExportError(f"the numeric check needs about {need / 2**30:.1f} GiB (fp32 reference model + "
                          f"ONNX Runtime) but {have / 2**30:.1f} GiB are available; pass --no-numeric-check "
                          "(the structural checks still run) or check on a larger machine with "
                          "`dlmtrt compare`")
    log("checking: ONNX Runtime vs PyTorch fp32 on random step inputs")
    with _timed(times, "numeric_check"):
        report = run_numeric_check(path, ck, dtype, attention, quantized=quantization_format(ck) is not None)
    if not report.ok:
        raise ExportError("ONNX Runtime disagrees with PyTorch beyond tolerance (outputs out of tolerance "
                          "below); nothing was written.\n" + report.render_text(), report)
    return report


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export to `out`; an old export there is moved aside first and removed after."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
