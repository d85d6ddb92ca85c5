"""The block-diffusion training objective (BD3-LM's vectorized form, as SDAR trains it).

A block-diffusion model denoises a block while attending to itself bidirectionally and to the *clean* earlier
blocks, which is what makes its cache exact at inference: a committed block's K/V come from its final tokens and
no row ever attends a later block. Training shows it both at once in one pass of length 2L: the noisy canvas x_t
followed by the clean x_0, both at the same RoPE positions, under a mask of three parts (SDAR's
`block_diff_mask`, BD3-LM's M_BD | M_OBC | M_BC):

- noisy query, noisy key: the same block (bidirectional inside the block being denoised);
- noisy query, clean key: an earlier block (the clean context the cache will hold);
- clean query, clean key: the same or an earlier block (the clean half is the block-causal model itself, so the
  clean keys that noisy rows read are the K/V inference caches).

No clean row attends a noisy one. Blocks are counted in sequence positions from each sequence's first real token,
as at inference (models/attention_kinds.py), so left padding moves no block boundary. Only the noisy half's
logits enter the loss.

Noise follows SDAR's `forward_add_noise_packed`: one masking rate t per sequence for all of its answer blocks
(`noise="sequence"`, the default, because the models run through SDAR's generation); BD3-LM draws one per block
(`noise="block"`). Masking schedule and weighting are those of the masked-diffusion training (train.py): answer
tokens masked with probability t, cross-entropy weighted 1/t, normalised by the answer length.
"""
from __future__ import annotations

import torch
from torch import Tensor

from dlmtrt.models.attention_kinds import sequence_positions
from dlmtrt.models.transformer import DiffusionLM, rope_cos_sin

NOISE = ("sequence", "block")


def block_diffusion_mask(pos: Tensor, valid: Tensor, block: int) -> Tensor:
    """[B, 1, 2L, 2L] bool over [noisy | clean] rows with sequence positions `pos` [B, L] and key validity
    `valid` [B, L]: may row q attend row k."""
    blk = pos // block
    same = blk[:, :, None] == blk[:, None, :]
    earlier = blk[:, None, :] < blk[:, :, None]  # key block before the query's
    never = torch.zeros_like(same)
    top = torch.cat([same, earlier], 2)  # noisy queries: noisy keys of their block, clean keys before it
    bottom = torch.cat([never, same | earlier], 2)  # clean queries: clean keys of their block and before
    keys = torch.cat([valid, valid], 1).bool()
    return (torch.cat([top, bottom], 1) & keys[:, None, :])[:, None]


def block_diffusion_logits(model: DiffusionLM, xt: Tensor, x0: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits [B, L, V] of the noisy canvas `xt`, each block conditioned on the clean earlier blocks of `x0`:
    one pass over [xt | x0] (2L rows) under `block_diffusion_mask`, with the model's block size."""
    block = model.args.attention_kind.block
    if not block:
        raise ValueError("the block-diffusion objective needs a block-causal model (ModelArgs.attention "
                         "block_causal:N)")
    L = xt.shape[1]
    pos = sequence_positions(attention_mask)
    cos, sin = rope_cos_sin(torch.cat([pos, pos], 1), model.inv_freq, model.model.embed_tokens.weight.dtype)
    mask = block_diffusion_mask(pos, attention_mask, block)
    x, *_ = model.run_layers(model.model.embed_tokens(torch.cat([xt, x0], 1)), cos, sin, mask)
    return model.lm_head(model.model.norm(x[:, :L]))


def masking_rates(ans: Tensor, attention_mask: Tensor, block: int | None, noise: str, g: torch.Generator) -> Tensor:
    """[B, L] masking probability of every row: one t ~ U(0, 1) per sequence, or (`noise="block"`, needs `block`)
    one per block of the sequence; clamped at 1e-3 as the masked-diffusion training does."""
    B, L = ans.shape
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {', '.join(NOISE)}, got {noise!r}")
    if noise == "sequence":
        return torch.rand(B, 1, device=ans.device, generator=g).clamp_min(1e-3).expand(B, L)
    blk = sequence_positions(attention_mask) // block
    t = torch.rand(B, L // block + 2, device=ans.device, generator=g).clamp_min(1e-3)
    return t.gather(1, blk)
