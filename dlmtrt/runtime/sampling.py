"""Token sampling and confidence scores with the exact semantics of the reference decoders.

Dream's `sample_tokens` (temperature, top-p, top-k, margin and negative-entropy confidences) and LLaDA's
float64 Gumbel-max trick are reproduced operation for operation, so that greedy decoding matches the
upstream implementations token for token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import row_rng


def top_p_logits(logits: Tensor, top_p: float) -> Tensor:
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: Tensor, top_k: int) -> Tensor:
    top_k = min(top_k, logits.size(-1))
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def sample_tokens(logits: Tensor, temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                  margin_confidence: bool = False, neg_entropy: bool = False,
                  rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(confidence, token) per row of `logits` [N, V], as Dream's generation_utils.sample_tokens. `rows`: which
    of the N belong to each batch row, for per-sequence generators (runtime/row_rng.py's `counts`)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    gens = row_rng.active()
    if temperature > 0 and rows is not None and gens is not None:
        parts = [_sample(p, g) for p, g in zip(probs.split(row_rng.counts(rows)), gens)]
        confidence, x0 = torch.cat([c for c, _ in parts]), torch.cat([x for _, x in parts])
    elif temperature > 0:
        confidence, x0 = _sample(probs, None)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        top2 = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = top2[:, 0] - top2[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def _sample(probs: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Upstream's draw (from `gen`, one sequence's block, under row generators) and its greedy fallback for
    invalid probs (all -inf rows); a block falls back alone, as its sequence would alone."""
    try:
        x0 = torch.distributions.Categorical(probs=probs).sample() if gen is None else \
            row_rng.categorical(probs, gen)
        return torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1), x0
    except (ValueError, RuntimeError):
        return probs.max(dim=-1)


def add_gumbel_noise(logits: Tensor, temperature: float, rows: Tensor | None = None) -> Tensor:
    """LLaDA's Gumbel-max in float64 (low precision Gumbel noise hurts generation quality, arXiv:2409.02908).
    Temperature 0 is plain argmax and draws nothing, as upstream. `rows`: as in `sample_tokens`."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = row_rng.rand_like(logits, rows, dtype=torch.float64)
    return logits.exp() / (-torch.log(noise)) ** temperature


def top_n(conf: Tensor, n: Tensor) -> Tensor:
    """[B, L] bool: per row the `n[b]` largest entries (NaN counts as largest, as torch.topk has it)."""
    order = torch.sort(conf, dim=1, descending=True, stable=True).indices
    rank_ok = torch.arange(conf.shape[1], device=conf.device)[None] < n[:, None]
    return torch.zeros_like(rank_ok).scatter(1, order, rank_ok)
