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

    def block(self, i: int) -> tuple[int, int] | None:
        return None  # one block: the whole answer

    def needs_all(self, i: int) -> bool:
        return i == self.steps - 1

    def quota(self, i: int, needed: Tensor, parallel=None) -> Tensor:
        """Tokens per sequence this step will commit (at least; parallel decoding may commit more). Upstream
        computes the count from the batch mean of masked tokens; the last step commits every one left."""
        num_mask = needed.sum(1)
        if self.needs_all(i):
            return num_mask
        if parallel is not None:
            return torch.ones_like(num_mask)
        t, s = self.timesteps[i], self.timesteps[i + 1]
        return torch.full_like(num_mask, int(needed.sum() / needed.shape[0] * (1 - s / t)))

    def commit(self, i: int, x: Tensor, needed: Tensor, logits: Tensor, computed: Tensor | None = None,
               parallel=None) -> Tensor:
        """`logits` [N, V] are the predictions at the `computed` positions (default: all `needed`) in
        row-major order; returns the new canvas. Only computed positions can be committed."""
        computed = needed if computed is None else computed
        t, s = self.timesteps[i], self.timesteps[i + 1]
        last = self.needs_all(i)
        kw = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if parallel is not None and not last:
            confidence, x0 = sample_tokens(logits, **kw)
            return commit_above(x, computed, x0, confidence, parallel.threshold)
        if self.alg == "origin":
            p_transfer = 1 if last else 1 - s / t
            x0 = torch.zeros_like(x[computed]) + self.mask_token_id
            transfer = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[transfer] = sample_tokens(logits[transfer], **kw)
            x = x.clone()
            x[computed] = x0
            return x
        confidence, x0 = sample_tokens(logits, margin_confidence=self.alg == "topk_margin",
                                       neg_entropy=self.alg == "entropy", **kw)
        n = int(self.quota(i, needed).max())  # upstream schedules on the batch mean; the last step takes all
        if n <= 0:
            return x
        full_conf = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
        full_conf[computed] = confidence
        n = min(n, x.shape[1])
        if not self.alg_temp:
            _, idx = torch.topk(full_conf, n)
        else:
            idx = torch.multinomial(F.softmax(full_conf / self.alg_temp, dim=-1), num_samples=n)
        cand = x.clone()
        cand[computed] = x0
        rows = torch.arange(x.size(0), device=x.device)[:, None].expand_as(idx)
        keep = computed[rows, idx]  # fewer computed positions than n (Greedy's window): commit what exists
        x = x.clone()
        x[rows[keep], idx[keep]] = cand[rows[keep], idx[keep]]
        return x


def commit_above(x: Tensor, computed: Tensor, x0: Tensor, confidence: Tensor, threshold: float) -> Tensor:
    """Confidence-threshold parallel decoding: commit the computed positions whose confidence reaches
    `threshold`, and in every sequence with a computed position at least the most confident one."""
    conf = torch.full(x.shape, -torch.inf, dtype=torch.float32, device=x.device)
    conf[computed] = confidence.float()
    take = conf >= threshold
    best = conf.argmax(1)
    has = computed.any(1)
    take[has, best[has]] = True
    cand = x.clone()
    cand[computed] = x0
    x = x.clone()
    x[take] = cand[take]
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
        self._blk, self._blk_start = 0, 0

    @property
    def num_steps(self) -> int:
        return self.steps

    def _range(self) -> tuple[int, int]:
        start = self.prompt_length + self._blk * self.block_length
        return start, start + self.block_length

    def needed(self, i: int, mask_index: Tensor) -> Tensor:
        """Masked positions of the current block: the first block that still has masks (a block can end
        before its step budget when parallel decoding or early commit finished it)."""
        if i == 0:
            self._blk, self._blk_start, self._transfer = 0, 0, None
        start, end = self._range()
        while self._blk < self.num_blocks - 1 and not mask_index[:, start:end].any():
            self._blk, self._blk_start, self._transfer = self._blk + 1, i, None
            start, end = self._range()
        needed = torch.zeros_like(mask_index)
        needed[:, start:end] = mask_index[:, start:end]
        if self._transfer is None:
            self._transfer = num_transfer_tokens(needed[:, start:end], self.steps_per_block)
        return needed

    def block(self, i: int) -> tuple[int, int]:
        return self._range()

    def needs_all(self, i: int) -> bool:
        return i - self._blk_start >= self.steps_per_block - 1

    def quota(self, i: int, needed: Tensor, parallel=None) -> Tensor:
        if self.needs_all(i):
            return needed.sum(1)
        if parallel is not None:
            return torch.ones_like(needed.sum(1))
        return self._transfer[:, i - self._blk_start]

    def commit(self, i: int, x: Tensor, needed: Tensor, logits: Tensor, computed: Tensor | None = None,
               parallel=None) -> Tensor:
        computed = needed if computed is None else computed
        x0 = torch.argmax(add_gumbel_noise(logits, self.temperature), dim=-1)
        if parallel is not None and not self.needs_all(i):
            p = F.softmax(logits.to(torch.float64), dim=-1)
            return commit_above(x, computed, x0, torch.gather(p, -1, x0[:, None]).squeeze(-1), parallel.threshold)
        if self.remasking == "low_confidence":
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.gather(p, -1, x0[:, None]).squeeze(-1)
            conf = torch.full(x.shape, -torch.inf, dtype=torch.float64, device=x.device)
            conf[computed] = x0_p
        else:
            r = torch.rand(x.shape, device=x.device)
            conf = torch.where(computed, r, torch.full_like(r, -torch.inf))
        cand = x.clone()
        cand[computed] = x0
        quota = self.quota(i, needed)
        transfer = torch.zeros_like(needed)
        for j in range(x.shape[0]):
            k = min(int(quota[j]), int(computed[j].sum()))
            _, sel = torch.topk(conf[j], k=k)
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
