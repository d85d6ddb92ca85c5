"""Test oracle: a literal re-implementation of LLaDA's reference decoder.

Mirrors `generate.py` of ML-GSAI/LLaDA (by the LLaDA authors; MIT per the upstream README):

* `add_gumbel_noise`         -> `llada_add_gumbel_noise`
* `get_num_transfer_tokens`  -> `llada_num_transfer_tokens`
* `generate`                 -> `llada_reference_generate`

Rewritten in our own words with identical semantics: float64 Gumbel-max (`exp(logits) / (-log u) ** T`,
skipped entirely - no RNG draw - at temperature 0), float64 softmax confidences for `low_confidence`,
`torch.rand` confidences for `random`, the semi-autoregressive block loop, unsupervised CFG (prompt tokens
replaced by the mask id in the unconditional copy, batch [x; un_x]), the `-inf` fence on everything after the
current block, and a per-row `topk` commit.

Upstream allocates `x` with batch 1 (`torch.full((1, ...))`); here `x` takes `prompt.shape[0]` rows so that B
rows sharing one prompt length can be decoded together - with B = 1 it is the upstream code path. The
`is_mps` float32 variant and the later `attention_mask` / eos-suppression options are not modelled.
`forward(x)` stands in for `model(x).logits`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["llada_reference_generate", "llada_add_gumbel_noise", "llada_num_transfer_tokens"]


def llada_add_gumbel_noise(logits: Tensor, temperature: float) -> Tensor:
    """Upstream `add_gumbel_noise`: Gumbel-max in float64; identity (and no RNG use) at temperature 0."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    u = torch.rand_like(logits, dtype=torch.float64)
    return logits.exp() / ((-torch.log(u)) ** temperature)


def llada_num_transfer_tokens(mask_index: Tensor, steps: int) -> Tensor:
    """Upstream `get_num_transfer_tokens`: per row, masks // steps each step, remainder on the first steps."""
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base = mask_num // steps
    remainder = mask_num % steps
    counts = torch.zeros(mask_num.size(0), steps, device=mask_index.device, dtype=torch.int64) + base
    for r in range(mask_num.size(0)):
        counts[r, :remainder[r]] += 1
    return counts


@torch.no_grad()
def llada_reference_generate(forward: Callable[[Tensor], Tensor], prompt: Tensor, *, steps: int, gen_length: int,
                             block_length: int, temperature: float = 0.0, cfg_scale: float = 0.0,
                             remasking: str = "low_confidence", mask_id: int) -> Tensor:
    """Upstream `generate`; returns x [B, prompt_len + gen_length]."""
    prompt_len = prompt.shape[1]
    x = torch.full((prompt.shape[0], prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_len] = prompt.clone()

    prompt_index = x != mask_id

    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps_per_block = steps // num_blocks

    for blk in range(num_blocks):
        lo = prompt_len + blk * block_length
        hi = prompt_len + (blk + 1) * block_length
        block_mask_index = x[:, lo:hi] == mask_id
        schedule = llada_num_transfer_tokens(block_mask_index, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = forward(torch.cat([x, un_x], dim=0))
                cond, uncond = torch.chunk(both, 2, dim=0)
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = forward(x)

            noisy = llada_add_gumbel_noise(logits, temperature=temperature)
            x0 = torch.argmax(noisy, dim=-1)

            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            elif remasking == "random":
                x0_p = torch.rand((x0.shape[0], x0.shape[1]), device=x0.device)
            else:
                raise NotImplementedError(remasking)

            # nothing after the current block may be committed
            x0_p[:, hi:] = -np.inf

            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)

            transfer_index = torch.zeros_like(x0, dtype=torch.bool, device=x0.device)
            for r in range(confidence.shape[0]):
                _, picked = torch.topk(confidence[r], k=int(schedule[r, i]))
                transfer_index[r, picked] = True
            x[transfer_index] = x0[transfer_index]

    return x
