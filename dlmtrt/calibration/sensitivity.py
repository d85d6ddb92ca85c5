"""Which transformer blocks suffer most from 8 bits: each block is quantised alone and the change of the model's
predictions on the calibration canvases is measured.

Why per block: the 8-bit formats lose accuracy unevenly across depth, and leaving the few worst blocks in the
model dtype recovers most of it at a small cost in weight bytes (`dlmtrt calibrate --keep-blocks N`). A whole
block (q|k|v, o, gate|up, down) keeps the fused projections of one dtype. The measure is the mean KL divergence
from the unquantised model's next-token distributions at the masked answer positions (the predictions a step
commits from), over the same stratified canvases the scales come from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlmtrt.models.quantized import QuantLinear, quantizable_linears

from .canvases import Canvas, batches
from .quantize import input_scale
from .statistics import LayerStats


def block_names(model, i: int) -> list[str]:
    """The quantisable projections of block `i`."""
    return [n for n in quantizable_linears(model) if n.startswith(f"model.layers.{i}.")]


def predicts_mask(ids: torch.Tensor, am: torch.Tensor, mask_id: int, shift: bool) -> torch.Tensor:
    """Rows whose logits predict a masked position: the position itself, or the next one for a family that
    predicts token j from row j - 1 (Dream)."""
    masked = (ids == mask_id) & am
    if not shift:
        return masked
    sel = torch.zeros_like(masked)
    sel[:, :-1] = masked[:, 1:]
    return sel & am


@torch.no_grad()
def block_sensitivity(model, canvases: list[Canvas], fmt: str, stats: dict[str, LayerStats], *, mask_id: int,
                      pad_id: int, batch: int = 16, progress=None) -> list[float]:
    """Mean KL(unquantised || block i quantised) over the masked positions of `canvases`, per block, in order.
    The model is left as it was. For w8a8 the blocks are quantised without SmoothQuant's folding (it rewrites
    every block's norms at once), so the score ranks blocks by their unsmoothed int8 error."""
    chunks = list(batches(canvases, batch, pad_id, model.model.embed_tokens.weight.device))
    ref = [F.log_softmax(model.full_logits(ids, am).float(), -1) for ids, am, _ in chunks]
    out = []
    for i in range(len(model.model.layers)):
        names = block_names(model, i)
        saved = {n: model.get_submodule(n) for n in names}
        for n, lin in saved.items():
            model.set_submodule(n, QuantLinear.from_linear(lin, fmt, input_scale(stats[n].amax, fmt)))
        try:
            total, count = 0.0, 0
            for (ids, am, _), lp in zip(chunks, ref):
                q = F.log_softmax(model.full_logits(ids, am).float(), -1)
                sel = predicts_mask(ids, am, mask_id, model.args.logits_shift)
                kl = (lp.exp() * (lp - q)).sum(-1)[sel]
                total += float(kl.sum())
                count += int(kl.numel())
            out.append(total / max(count, 1))
        finally:
            for n, lin in saved.items():
                model.set_submodule(n, lin)
        if progress is not None:
            progress(1)
    return out
