"""Activation statistics of every quantisable linear layer's input over calibration canvases.

Per layer: the absolute maximum (what a static per-tensor scale is set from), the per-channel absolute maximum
(SmoothQuant's smoothing factors), percentiles of |x| (99.9 and 99.99, from a bounded random sample: how heavy
the tail above the bulk is), and the absolute maximum per mask-ratio stratum (how much the range depends on
the noise level). The inputs are whole canvases through `DiffusionLM.full_logits`: the rows a cached step
computes are a subset of these, with the same values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dlmtrt.models.quantized import quantizable_linears

from .canvases import Canvas, batches, stratum_of

SAMPLE = 1 << 16  # |x| values kept per layer for the percentiles


@dataclass
class LayerStats:
    amax: float = 0.0
    channel_amax: Tensor | None = None  # [in]
    by_stratum: dict[int, float] = field(default_factory=dict)
    sample: list[Tensor] = field(default_factory=list)
    percentiles: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"amax": self.amax, "percentiles": self.percentiles,
                "amax_by_stratum": {str(k): v for k, v in sorted(self.by_stratum.items())}}


@torch.no_grad()
def collect(model, canvases: list[Canvas], *, strata: int, pad_id: int, batch: int = 16, seed: int = 0,
            head: bool = False, progress=None) -> dict[str, LayerStats]:
    """Run the canvases through the model and record the statistics of each quantisable linear's input (the
    head's too with `head`)."""
    names = quantizable_linears(model, head)
    stats = {n: LayerStats() for n in names}
    gen = torch.Generator().manual_seed(seed)
    current: dict = {}

    def hook(name):
        def fn(_mod: nn.Module, args):
            x = args[0].detach()
            am = current["am"]
            vals = x[am].float().abs()  # real rows only: padding is no input the model will see
            st = stats[name]
            cm = vals.amax(0).cpu()
            st.channel_amax = cm if st.channel_amax is None else torch.maximum(st.channel_amax, cm)
            st.amax = max(st.amax, float(cm.max()))
            for k in current["strata"]:
                rows = current["rows_of"][k]
                st.by_stratum[k] = max(st.by_stratum.get(k, 0.0), float(x[rows].float().abs().amax()))
            flat = vals.flatten().cpu()
            take = min(flat.numel(), SAMPLE // 4)
            st.sample.append(flat[torch.randint(flat.numel(), (take,), generator=gen)])
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    dev = model.model.embed_tokens.weight.device
    try:
        for ids, am, chunk in batches(canvases, batch, pad_id, dev):
            ks = [stratum_of(c.ratio, strata) for c in chunk]
            rows_of = {}
            for k in set(ks):
                sel = torch.tensor([r == k for r in ks], device=dev)
                rows_of[k] = am & sel[:, None]
            current.update(am=am, strata=sorted(set(ks)), rows_of=rows_of)
            model.full_logits(ids, am)
            if progress is not None:
                progress(len(chunk))
    finally:
        for h in handles:
            h.remove()
    for st in stats.values():
        s = torch.cat(st.sample)
        if s.numel() > SAMPLE:
            s = s[torch.randperm(s.numel(), generator=gen)[:SAMPLE]]
        st.percentiles = {f"p{q}": float(torch.quantile(s, q / 100)) for q in (99.9, 99.99)}
        st.sample = []
    return stats
