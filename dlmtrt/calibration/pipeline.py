"""`calibrate`: record trajectories, pick stratified canvases, collect statistics, quantise, write."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dlmtrt.errors import UsageError
from dlmtrt.models.loading import load_weights, open_checkpoint, quantization_format, resolve_device, resolve_dtype
from dlmtrt.models.loading import load_tokenizer
from dlmtrt.models.quantized import FORMATS
from dlmtrt.paths import check_output_dir
from dlmtrt.runtime.backends.torch_backend import TorchBackend

from . import canvases as cv
from .quantize import quantize, write_checkpoint
from .sensitivity import block_names, block_sensitivity
from .statistics import collect


@dataclass
class CalibrationResult:
    out: Path
    format: str
    prompts: int
    canvases_recorded: int
    canvases_used: int
    per_stratum: dict[int, int]
    layers: int
    seconds: float
    amax_by_stratum: dict[int, float] = field(default_factory=dict)  # max over layers, per mask-ratio stratum
    block_sensitivity: list[float] | None = None  # with keep_blocks: KL per block quantised alone
    kept_blocks: list[int] = field(default_factory=list)  # left unquantised


def calibrate(model: str, fmt: str, out: str | Path, prompts: list[str], *, new_tokens: int | list[int],
              steps: int | None = None,
              strata: int = 8, per_stratum: int = 32, masked_only: bool = False, alpha: float = 0.5,
              keep_blocks: int = 0, quantize_head: bool = False, device: str = "cpu", dtype: str = "float32",
              batch: int = 16, seed: int = 0, progress=None) -> CalibrationResult:
    """Quantise checkpoint `model` to `fmt` with statistics from its own denoising of `prompts`; write `out`.
    `new_tokens`: the answer length of every prompt, or one per prompt (tasks of different answer lengths).
    `keep_blocks`: leave that many of the most sensitive transformer blocks unquantised (sensitivity.py).
    `quantize_head`: quantise the output head too (not for tied embeddings).
    `progress(stage, done, total)` is called as work advances."""
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise UsageError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    if not prompts:
        raise UsageError("no calibration data: give prompts (a text file, one per line) or a task")
    out = check_output_dir(out)  # before the slow part; written only at the end
    ck = open_checkpoint(model)
    if not 0 <= keep_blocks < ck.args.num_layers:
        raise UsageError(f"--keep-blocks must be between 0 and {ck.args.num_layers - 1} (the model has "
                         f"{ck.args.num_layers} blocks), got {keep_blocks}")
    if quantize_head and ck.args.tie_word_embeddings:
        raise UsageError(f"{ck.path}: the output head shares the embedding's weights (tied embeddings), which stay "
                         "unquantised: leave out --quantize-head")
    already = quantization_format(ck)
    if already is not None:
        raise UsageError(f"{ck.path} is already quantised ({already}); calibrate the original weights")
    dev = resolve_device(device)
    m = load_weights(ck, resolve_dtype(dtype, dev), dev)
    tok = load_tokenizer(ck)
    be = TorchBackend(m)
    tick = (lambda stage, total: (lambda n: progress(stage, n, total))) if progress else (lambda *_: None)  # noqa: E731
    lengths = list(new_tokens) if isinstance(new_tokens, (list, tuple)) else [new_tokens] * len(prompts)
    if len(lengths) != len(prompts):
        raise UsageError(f"{len(lengths)} answer lengths for {len(prompts)} prompts")
    recorded: list[cv.Canvas] = []
    step = tick("trajectories", len(prompts))
    for n in sorted(set(lengths)):
        group = [p for p, k in zip(prompts, lengths) if k == n]
        recorded += cv.record(be, tok, group, new_tokens=n, steps=steps, batch=batch, progress=step)
    chosen = cv.stratify(recorded, strata=strata, per_stratum=per_stratum, masked_only=masked_only, seed=seed)
    if not chosen:
        raise UsageError("the trajectories gave no canvas to calibrate on (no masked answer position); "
                         "ask for more new tokens")
    stats = collect(m, chosen, strata=strata, pad_id=ck.args.pad_token_id, batch=batch, seed=seed,
                    head=quantize_head, progress=tick("statistics", len(chosen)))
    sensitivity, worst = None, []
    if keep_blocks:
        sensitivity = block_sensitivity(m, chosen, fmt, stats, mask_id=ck.args.mask_token_id,
                                        pad_id=ck.args.pad_token_id, batch=batch,
                                        progress=tick("sensitivity", ck.args.num_layers))
        worst = sorted(sorted(range(len(sensitivity)), key=lambda i: -sensitivity[i])[:keep_blocks])
    keep = [n for i in worst for n in block_names(m, i)]
    layers = quantize(m, fmt, stats, alpha=alpha, keep=frozenset(keep), head=quantize_head)
    counts: dict[int, int] = {}
    for c in chosen:
        k = cv.stratum_of(c.ratio, strata)
        counts[k] = counts.get(k, 0) + 1
    by_stratum = {k: max(s.by_stratum.get(k, 0.0) for s in stats.values()) for k in sorted(counts)}
    report = {
        "format": fmt, "source": str(ck.path), "alpha": alpha if fmt == "w8a8" else None,
        "calibration": {"prompts": len(prompts), "new_tokens": sorted(set(lengths)), "steps": steps,
                        "canvases_recorded": len(recorded), "canvases_used": len(chosen), "strata": strata,
                        "per_stratum": per_stratum, "masked_only": masked_only, "dtype": dtype,
                        "canvases_per_stratum": {str(k): v for k, v in sorted(counts.items())}},
        "layers": {n: {**layers[n], **stats[n].to_dict()} for n in layers},
        "excluded": ["model.embed_tokens"] + ([] if quantize_head else ["lm_head"]),
        "head": quantize_head,
        "unquantized": keep,
        "block_sensitivity": sensitivity,
    }
    write_checkpoint(m, ck, out, fmt, report)
    return CalibrationResult(out, fmt, len(prompts), len(recorded), len(chosen), counts, len(layers),
                             time.perf_counter() - t0, by_stratum, sensitivity, worst)
