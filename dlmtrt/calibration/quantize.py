"""Turn a loaded model and its calibration statistics into an 8-bit model, and write it as a checkpoint.

Static activation scales come from the calibrated absolute maximum (E4M3: amax / 448; int8: amax / 127), weight
scales from each output channel's maximum. `w8a8` first applies SmoothQuant (Xiao et al. 2023): per input
channel j of the layers that read a normalised hidden state (q|k|v, gate|up), s_j = amax(X_j)^a /
amax(W_:,j)^(1-a); X / s is folded into the RMSNorm weight and W * s into the layers, which moves the
activation outliers into the weights, where per-channel scales absorb them. `o_proj` and `down_proj` read no
norm output, so they are quantised unsmoothed.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from dlmtrt.errors import UsageError
from dlmtrt.models.families import get as model_family
from dlmtrt.models.loading import Checkpoint
from dlmtrt.models.quantized import FORMATS, FP8_MAX, INT8_MAX, QuantLinear, quantizable_linears
from dlmtrt.models.tiny import save_weights
from dlmtrt.paths import check_output_dir

from .statistics import LayerStats

SHARD_BYTES = 5 * 2 ** 30


@torch.no_grad()
def smooth(model, stats: dict[str, LayerStats], alpha: float) -> dict[str, float]:
    """SmoothQuant in place; returns each smoothed layer's new input amax (the stats' amax no longer applies)."""
    if not 0 <= alpha <= 1:
        raise UsageError(f"alpha must be in [0, 1], got {alpha}")
    new_amax = {}
    for i, layer in enumerate(model.model.layers):
        groups = [(layer.input_layernorm, "self_attn", ("q_proj", "k_proj", "v_proj")),
                  (layer.post_attention_layernorm, "mlp", ("gate_proj", "up_proj"))]
        for norm, sub, names in groups:
            lins = [getattr(getattr(layer, sub), n) for n in names]
            key = f"model.layers.{i}.{sub}.{names[0]}"
            x_amax = stats[key].channel_amax.to(norm.weight.device).float().clamp_min(1e-5)
            w_amax = torch.stack([lin.weight.abs().amax(0).float() for lin in lins]).amax(0).clamp_min(1e-5)
            s = (x_amax.pow(alpha) / w_amax.pow(1 - alpha)).clamp_min(1e-5)
            norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
            for lin in lins:
                lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))
            for n in names:
                new_amax[f"model.layers.{i}.{sub}.{n}"] = float((x_amax / s).max())
    return new_amax


def input_scale(amax: float, fmt: str) -> float | None:
    """The static activation scale of a layer whose calibrated input maximum is `amax` (None for weight-only)."""
    if fmt == "int8-wo":
        return None
    return max(amax, 1e-8) / (FP8_MAX if fmt == "fp8" else INT8_MAX)


@torch.no_grad()
def quantize(model, fmt: str, stats: dict[str, LayerStats], *, alpha: float = 0.5,
             keep: frozenset[str] = frozenset(), head: bool = False) -> dict[str, dict]:
    """Replace every quantisable linear of `model` (the head too with `head`) but those named in `keep` by a
    `QuantLinear` of `fmt`, in place; returns per quantised layer the input amax used and the input scale. The
    head is never smoothed (w8a8): the final norm's weight is not the head's alone when embeddings are tied."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    if head and model.lm_head.weight is model.model.embed_tokens.weight:
        raise UsageError("this model's output head shares the embedding's weights (tied embeddings), which stay "
                         "unquantised: leave out --quantize-head")
    names = [n for n in quantizable_linears(model, head) if n not in keep]
    missing = [n for n in names if n not in stats]
    if missing:
        raise UsageError(f"no calibration statistics for {len(missing)} layer(s) ({missing[0]}, ...); calibrate again")
    amax = {n: stats[n].amax for n in names}
    if fmt == "w8a8":
        amax.update(smooth(model, stats, alpha))
    report = {}
    for n in names:
        lin: nn.Linear = model.get_submodule(n)
        scale = input_scale(amax[n], fmt)
        model.set_submodule(n, QuantLinear.from_linear(lin, fmt, scale))
        report[n] = {"input_amax": amax[n], "input_scale": scale}
    return report


def write_checkpoint(model, ck: Checkpoint, out: str | Path, fmt: str, report: dict) -> Path:
    """The quantised model as a checkpoint directory: the source's config (plus `quantization_config`),
    generation config and tokenizer files, the weights in the source's layout and names, and
    `quantization.json` (how it was calibrated, per-layer statistics). Written to a temporary directory and
    renamed into place, so a failure leaves nothing."""
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fam = model_family(ck.family)
        for f in ck.path.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) \
                    and f.name not in ("config.json", "quantization.json", "README.md"):
                shutil.copy2(f, tmp / f.name)
        cfg = dict(ck.config)
        cfg["quantization_config"] = {"quant_method": "dlmtrt", "format": fmt}
        if report.get("unquantized"):
            cfg["quantization_config"]["unquantized"] = report["unquantized"]
        if report.get("head"):
            cfg["quantization_config"]["head"] = True
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        sd = model.state_dict()
        if ck.args.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        named = {fam.ours_to_checkpoint(k): v.detach().contiguous().cpu() for k, v in sd.items()}
        save_weights(tmp, named, SHARD_BYTES)
        (tmp / "quantization.json").write_text(json.dumps(report, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        tmp.chmod(0o755)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
