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

from .policies import NEVER, DecodePlan, DecodeState, parse_policy, positions_of, rows_of
from .contract import StepBackend, StepInputs, StepOutputs


@dataclass
class GenerationStats:
    """Work and time of one generate call (the whole batch)."""

    batch: int
    canvas_length: int
    new_tokens: int  # generated positions per sequence
    steps: int = 0
    forward_passes: int = 0
    seq_forward_passes: int = 0  # summed over sequences: steps at which each still had masks (its own NFE)
    rows_computed: int = 0  # active rows summed over steps and sequences (CFG's extra batch included)
    rows_full: int = 0  # what recomputing every canvas row at every executed step would have cost
    early_committed: int = 0  # tokens committed by early commit (all sequences)
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


class Rule(Protocol):
    """An unmasking schedule (runtime/unmasking.py): which positions want predictions, how many tokens
    a step commits, and the commit itself. One object per generation: it keeps that generation's state."""

    @property
    def num_steps(self) -> int: ...  # an upper bound on the steps; it may grow (parallel decoding)

    def needed(self, i: int, mask_index: Tensor) -> Tensor: ...

    def block(self, i: int) -> tuple[int, int] | None: ...

    def block_step(self, i: int) -> int: ...

    def quota(self, i: int, needed: Tensor) -> Tensor: ...

    def commit(self, i: int, x: Tensor, needed: Tensor, logits: Tensor, computed: Tensor | None = None,
               rows: Tensor | None = None) -> Tensor: ...


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


class DecodeSession:
    """One generation (a batch of sequences that decode together): the canvas, the K/V cache it owns, the
    rule with its schedule state, the policy's per-generation memory and the statistics. Policies are
    stateless, so one `DecodePlan` serves any number of sessions at once; a server advances many sessions
    one `step()` at a time.

    `plan` picks the rows each step recomputes and whether parallel decoding and early commit apply. With
    `cfg_scale` > 0 (LLaDA's unsupervised classifier-free guidance) every step also runs an unconditional copy
    of the canvas whose `prompt_index` positions are masked; both copies use the same active rows."""

    def __init__(self, backend: StepBackend, x: Tensor, attention_mask: Tensor, rule: Rule, plan: DecodePlan,
                 *, cfg_scale: float = 0.0, prompt_index: Tensor | None = None):
        info = backend.info
        plan.check(info.family, getattr(rule, "remasking", None))
        if cfg_scale > 0 and prompt_index is None:
            raise ValueError("cfg_scale > 0 needs prompt_index (the positions to mask in the unconditional copy)")
        self.backend, self.rule, self.plan, self.info = backend, rule, plan, info
        self.cfg_scale, self.prompt_index = cfg_scale, prompt_index
        B, L = x.shape
        self.x = x
        self.am = attention_mask.bool()
        self.am_in = torch.cat([self.am, self.am]) if cfg_scale > 0 else self.am
        self.answer = x == info.mask_token_id
        self.answer_start = int(self.answer.float().argmax(1).min()) if self.answer.any() else L
        self.stats = GenerationStats(batch=B, canvas_length=L, new_tokens=int(self.answer.sum(1).max()))
        self.keys, self.values = backend.new_cache(2 * B if cfg_scale > 0 else B, L)
        dev = x.device
        self.valid = torch.zeros(B, L, dtype=torch.bool, device=dev)
        self.decoded_at = torch.where(self.answer, NEVER, -1)
        self.computed_at = torch.full((B, L), -1, dtype=torch.long, device=dev)
        self.confidence = torch.full((B, L), -torch.inf, device=dev)
        self.memory: dict = {}
        self.i = 0

    @property
    def done(self) -> bool:
        return self.i >= self.rule.num_steps or not (self.x == self.info.mask_token_id).any()

    def step(self) -> None:
        """One denoising step: plan the rows, run the backend, commit tokens, keep the cache."""
        info, rule, plan, i = self.info, self.rule, self.plan, self.i
        x, shift, cfg = self.x, info.logits_shift, self.cfg_scale > 0
        B, L = x.shape
        dev = x.device
        mask_index = x == info.mask_token_id
        needed = rule.needed(i, mask_index)
        needed_rows = rows_of(needed, shift)
        state = DecodeState(i, rule.block_step(i), needed_rows, rule.quota(i, needed), self.valid, self.am,
                            self.decoded_at, self.computed_at, self.confidence, needed,
                            rule.block(i) or (self.answer_start, L), shift, getattr(rule, "scores", None), self.memory)
        active, stable = plan.cache.plan(state)
        running = mask_index.any(1)
        active = active & running[:, None]  # a finished sequence computes nothing (its rows stay valid)
        pos = pack_rows(active)
        known = stable | (active & self.valid)  # active rows with a valid past: kv_drift is measured against it
        x_in = x
        if cfg:
            x_in = torch.cat([x, torch.where(self.prompt_index, torch.full_like(x, info.mask_token_id), x)])
            pos, known = torch.cat([pos, pos]), torch.cat([known, known])
        out: StepOutputs = self.backend.step(StepInputs(x_in.gather(1, pos), pos, self.keys, self.values, known,
                                                        self.am_in))
        self.keys, self.values = out.present_keys, out.present_values
        self.valid = out.present_valid[:B]
        slot = torch.full((pos.shape[0], L), -1, dtype=torch.long, device=dev)
        slot.scatter_(1, pos, torch.arange(pos.shape[1], device=dev).expand_as(pos))
        logits = out.logits
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        computed = needed & positions_of(active, shift)
        b_idx, p_idx = computed.nonzero(as_tuple=True)
        pred = logits[b_idx, slot[:B][b_idx, source_rows(p_idx, shift)]]
        probs = torch.softmax(pred.float(), dim=-1)
        self.confidence = self.confidence.clone()
        self.confidence[b_idx, p_idx] = probs.max(-1).values
        new_x = rule.commit(i, x, needed, pred, computed, pos[:B])
        if plan.early is not None:
            new_x = _early_commit(plan.early, new_x, needed, computed, probs, self.answer, info.mask_token_id,
                                  self.stats)
        committed = (new_x != info.mask_token_id) & mask_index
        self.decoded_at = torch.where(committed, i, self.decoded_at)
        self.computed_at = torch.where(active, i, self.computed_at)
        if hasattr(plan.cache, "observe"):
            drift = torch.zeros(B, L, device=dev).scatter(1, pos[:B], out.kv_drift[:B].float())
            plan.cache.observe(self.memory, active, drift, known[:B], committed)
        self.x = new_x
        n_rows = pos.shape[0] * pos.shape[1]
        st = self.stats
        st.steps += 1
        st.forward_passes += 1
        st.seq_forward_passes += int(running.sum())
        st.rows_computed += n_rows
        st.rows_full += pos.shape[0] * L
        st.per_step_rows.append(n_rows)
        self.i += 1


def denoise(backend: StepBackend, x: Tensor, attention_mask: Tensor, rule: Rule, *,
            policy: str | DecodePlan | None = None, cfg_scale: float = 0.0, prompt_index: Tensor | None = None,
            on_step: Callable[[int, int], None] | None = None) -> tuple[Tensor, GenerationStats]:
    """Run `rule` on canvas `x` [B, L] until it is done or nothing is masked; returns (x, stats). One
    `DecodeSession` driven to the end."""
    session = DecodeSession(backend, x, attention_mask, rule, parse_policy(policy), cfg_scale=cfg_scale,
                            prompt_index=prompt_index)
    t0 = time.perf_counter()
    while not session.done:
        session.step()
        if on_step is not None:
            on_step(session.i, max(session.i, rule.num_steps))
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    session.stats.wall_s = time.perf_counter() - t0
    return session.x, session.stats


def _early_commit(early, x: Tensor, needed: Tensor, computed: Tensor, probs: Tensor, answer: Tensor,
                  mask_id: int, stats: GenerationStats) -> Tensor:
    """Commit every still-masked needed position of the sequences whose top-2 gap is large everywhere."""
    if probs.shape[0] == 0:
        return x
    top2 = probs.topk(2, dim=-1).values if probs.shape[-1] > 1 else torch.cat([probs, 0 * probs], -1)
    gap = torch.full(x.shape, -1.0, device=x.device)
    gap[computed] = top2[:, 0] - top2[:, 1]
    argmax = torch.full_like(x, mask_id)
    argmax[computed] = probs.argmax(-1)
    progress = 1 - (x == mask_id).logical_and(answer).sum(1).float() / answer.sum(1).clamp_min(1)
    rest = needed & (x == mask_id)
    gap_ok = torch.where(rest, gap >= early.thresholds(progress)[:, None], True).all(1)
    fire = rest.any(1) & ~(rest & ~computed).any(1) & gap_ok
    take = rest & fire[:, None]
    stats.early_committed += int(take.sum())
    return torch.where(take, argmax, x)
