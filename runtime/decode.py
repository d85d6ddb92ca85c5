"""The denoising loop, independent of the model family, the unmasking rule, the cache policy and the backend.

Each step: the rule says which masked positions it needs predictions for; the policy turns that into the
active rows and the stable mask of the step contract; the backend computes the active rows; the loop maps
predictions back to positions (undoing Dream's logits shift: position p is predicted by row p-1) and lets
the rule commit tokens. The past K/V returned by the backend are carried to the next step.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
from torch import Tensor

from .step import StepBackend, StepInputs, StepOutputs


@dataclass
class GenerationStats:
    """Work and time of one generate call (the whole batch)."""

    batch: int
    canvas_length: int
    new_tokens: int  # generated positions per sequence
    steps: int = 0
    forward_passes: int = 0
    rows_computed: int = 0  # active rows summed over steps and sequences (CFG's extra batch included)
    rows_full: int = 0  # what recomputing every canvas row at every executed step would have cost
    wall_s: float = 0.0
    per_step_rows: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")

    @property
    def rows_fraction(self) -> float:
        return self.rows_computed / self.rows_full if self.rows_full else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("per_step_rows")
        d.update(tokens_per_s=self.tokens_per_s, rows_fraction=self.rows_fraction)
        return d


class CachePolicy(Protocol):
    name: str

    def plan(self, i: int, needed_rows: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """(active [B, L], stable [B, L]) for step i; `needed_rows` must be among the active rows."""
        ...


class NoCache:
    """Every row is recomputed at every step: the reference behaviour and the baseline of every policy."""

    name = "none"

    def plan(self, i: int, needed_rows: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(needed_rows), torch.zeros_like(needed_rows)


class Rule(Protocol):
    num_steps: int

    def needed(self, i: int, mask_index: Tensor) -> Tensor: ...

    def commit(self, i: int, x: Tensor, needed: Tensor, logits: Tensor) -> Tensor: ...


def pack_rows(active: Tensor) -> Tensor:
    """Canvas slots of the active rows, [B, A] ascending; shorter rows repeat their last slot (an idempotent
    rewrite of the same row) so the batch stays rectangular."""
    counts = active.sum(1)
    A = int(counts.max())
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :A]
    last = order.gather(1, (counts - 1).clamp_min(0)[:, None])
    pad = torch.arange(A, device=active.device)[None] >= counts[:, None]
    return torch.where(pad, last, order)


def source_rows(positions: Tensor, shift: bool) -> Tensor:
    """Row whose logits predict each position: p-1 under Dream's shift (row 0 predicts itself), else p."""
    return (positions - 1).clamp_min(0) if shift else positions


def denoise(backend: StepBackend, x: Tensor, attention_mask: Tensor, rule: Rule, *, policy: CachePolicy | None = None,
            cfg_scale: float = 0.0, prompt_index: Tensor | None = None,
            on_step: Callable[[int, int], None] | None = None) -> tuple[Tensor, GenerationStats]:
    """Run `rule` on canvas `x` [B, L] until it is done or nothing is masked; returns (x, stats).

    With `cfg_scale` > 0 (LLaDA's unsupervised classifier-free guidance) every step also runs an
    unconditional copy of the canvas whose `prompt_index` positions are masked.
    """
    info = backend.info
    policy = policy or NoCache()
    B, L = x.shape
    cfg = cfg_scale > 0
    if cfg and prompt_index is None:
        raise ValueError("cfg_scale > 0 needs prompt_index (the positions to mask in the unconditional copy)")
    am = attention_mask.bool()
    am_in = torch.cat([am, am]) if cfg else am
    n_new = int((x == info.mask_token_id).sum(1).max())
    stats = GenerationStats(batch=B, canvas_length=L, new_tokens=n_new)
    keys, values = backend.new_cache(2 * B if cfg else B, L)
    valid = torch.zeros(B, L, dtype=torch.bool, device=x.device)
    t0 = time.perf_counter()
    for i in range(rule.num_steps):
        mask_index = x == info.mask_token_id
        if not mask_index.any():
            break
        needed = rule.needed(i, mask_index)
        needed_rows = torch.zeros_like(needed)
        b_idx, p_idx = needed.nonzero(as_tuple=True)
        src = source_rows(p_idx, info.logits_shift)
        needed_rows[b_idx, src] = True
        active, stable = policy.plan(i, needed_rows, valid)
        pos = pack_rows(active)
        x_in = x
        if cfg:
            x_in = torch.cat([x, torch.where(prompt_index, torch.full_like(x, info.mask_token_id), x)])
            pos, stable = torch.cat([pos, pos]), torch.cat([stable, stable])
        out: StepOutputs = backend.step(StepInputs(x_in.gather(1, pos), pos, keys, values, stable, am_in))
        keys, values = out.present_keys, out.present_values
        valid = out.present_valid[:B]
        slot = torch.full((pos.shape[0], L), -1, dtype=torch.long, device=x.device)
        slot.scatter_(1, pos, torch.arange(pos.shape[1], device=x.device).expand_as(pos))
        logits = out.logits
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (cfg_scale + 1) * (cond - uncond)
        pred = logits[b_idx, slot[:B][b_idx, src]]
        x = rule.commit(i, x, needed, pred)
        n_rows = pos.shape[0] * pos.shape[1]
        stats.steps += 1
        stats.forward_passes += 1
        stats.rows_computed += n_rows
        stats.rows_full += pos.shape[0] * L
        stats.per_step_rows.append(n_rows)
        if on_step is not None:
            on_step(i + 1, rule.num_steps)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    stats.wall_s = time.perf_counter() - t0
    return x, stats
