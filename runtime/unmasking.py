"""Unmasking rules: given predictions at masked positions, decide which tokens to commit this step.

Each rule owns its schedule (how many steps, how many tokens per step) and says which canvas positions
it needs predictions for; the decode loop turns that into active rows for the backend. Rules never see
K/V or backends, so every cache policy combines with every rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .sampling import add_gumbel_noise, sample_tokens

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
LLADA_REMASKING = ("low_confidence", "random")


@dataclass
class DreamRule:
    """Dream's `diffusion_generate` (generation_utils._sample): a linear timestep schedule from 1 to `eps`;
    at step i a fraction 1 - s/t of the still-masked tokens is committed, all of them at the last step."""

    mask_token_id: int
    steps: int
    eps: float = 1e-3
    alg: str = "origin"
    alg_temp: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self):
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"unknown alg '{self.alg}'; choose from {', '.join(DREAM_ALGS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1), got {self.eps}")
        self.timesteps = torch.linspace(1, self.eps, self.steps + 1)

    @property
    def num_steps(self) -> int:
        return self.steps

    def needed(self, i: int, mask_index: Tensor) -> Tensor:
        return mask_index

    def commit(self, i: int, x: Tensor, needed: Tensor, logits: Tensor) -> Tensor:
        """`logits` [N, V] are the predictions at `needed` positions in row-major order; returns new x."""
        mask_index = needed
        t, s = self.timesteps[i], self.timesteps[i + 1]
        last = i == self.steps - 1
        kw = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.alg == "origin":
            p_transfer = 1 if last else 1 - s / t
            x0 = torch.zeros_like(x[mask_index]) + self.mask_token_id
            transfer = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer] = sample_tokens(logits[transfer], **kw)
            x = x.clone()
            x[mask_index] = x0
            return x
        confidence, x0 = sample_tokens(logits, margin_confidence=self.alg == "topk_margin",
                                       neg_entropy=self.alg == "entropy", **kw)
        num_mask = mask_index.sum() / mask_index.shape[0]
        n = int(num_mask) if last else int(num_mask * (1 - s / t))
        if n <= 0:
            return x
        full_conf = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
        full_conf[mask_index] = confidence
        if not self.alg_temp:
            _, idx = torch.topk(full_conf, n)
        else:
            idx = torch.multinomial(F.softmax(full_conf / self.alg_temp, dim=-1), num_samples=n)
        cand = torch.full_like(x, self.mask_token_id)
        cand[mask_index] = x0
        rows = torch.arange(x.size(0), device=x.device)[:, None].expand_as(idx)
        x = x.clone()
        x[rows, idx] = cand[rows, idx]
        return x


@dataclass
class LLaDARule:
    """LLaDA's `generate`: the answer is split into blocks decoded left to right (semi-autoregressive when
    block_length < gen_length); each block gets steps/num_blocks steps with an equal share of its masked
    tokens per step, committing the most confident (low_confidence) or random ones."""

    steps: int
    gen_length: int
    block_length: int
    prompt_length: int
    temperature: float = 0.0
    remasking: str = "low_confidence"

    def __post_init__(self):
        if self.remasking not in LLADA_REMASKING:
            raise ValueError(f"unknown remasking '{self.remasking}'; choose from {', '.join(LLADA_REMASKING)}")
        if self.block_length < 1 or self.gen_length % self.block_length:
            raise ValueError(f"gen_length ({self.gen_length}) must be a multiple of block_length ({self.block_length})")
        self.num_blocks = self.gen_length // self.block_length
        if self.steps < self.num_blocks or self.steps % self.num_blocks:
            raise ValueError(f"steps ({self.steps}) must be a positive multiple of the number of blocks "
                             f"({self.num_blocks} = gen_length / block_length)")
        self.steps_per_block = self.steps // self.num_blocks
        self._transfer: Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.steps

    def block_end(self, i: int) -> int:
        return self.prompt_length + (i // self.steps_per_block + 1) * self.block_length

    def needed(self, i: int, mask_index: Tensor) -> Tensor:
        needed = mask_index.clone()
        needed[:, self.block_end(i):] = False
        return needed

    def commit(self, i: int, x: Tensor, needed: Tensor, logits: Tensor) -> Tensor:
        k = i % self.steps_per_block
        if k == 0:
            start = self.block_end(i) - self.block_length
            self._transfer = num_transfer_tokens(needed[:, start:self.block_end(i)], self.steps_per_block)
        x0 = torch.argmax(add_gumbel_noise(logits, self.temperature), dim=-1)
        if self.remasking == "low_confidence":
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[:, None]).squeeze(-1)
            conf = torch.full(x.shape, -torch.inf, dtype=torch.float64, device=x.device)
            conf[needed] = x0_p
        else:
            r = torch.rand(x.shape, device=x.device)
            conf = torch.where(needed, r, torch.full_like(r, -torch.inf))
        cand = x.clone()
        cand[needed] = x0
        transfer = torch.zeros_like(needed)
        for j in range(x.shape[0]):
            _, sel = torch.topk(conf[j], k=int(self._transfer[j, k]))
            transfer[j, sel] = True
        x = x.clone()
        x[transfer] = cand[transfer]
        return x


def num_transfer_tokens(block_mask: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to commit per step: an equal share of the block's masks, remainder first (LLaDA)."""
    n = block_mask.sum(dim=1, keepdim=True)
    out = torch.zeros(block_mask.size(0), steps, dtype=torch.int64, device=block_mask.device) + n // steps
    for j in range(block_mask.size(0)):
        out[j, : int(n[j, 0] % steps)] += 1
    return out
