"""Unmasking rules: given predictions at masked positions, decide which tokens to commit this step.

Each rule is one published schedule, reproduced token for token against the authors' code on fixtures
(tests/test_upstream_fixtures.py): Dream's `diffusion_generate` (`DreamRule`), Fast-dLLM's block decoding
of Dream (`DreamBlockRule`) and LLaDA's `generate` (`LLaDARule`), each with Fast-dLLM's confidence-threshold
parallel decoding in the form its authors wrote for that schedule. A rule owns its schedule (how many steps,
how many tokens per step) and says which canvas positions it needs predictions for; the decode loop turns
that into active rows for the backend. Rules never see K/V or backends, so every cache policy combines with
every rule. A rule object holds the state of one generation (one batch of requests): make one per call.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmtrt.errors import UsageError

from . import row_rng
from .sampling import add_gumbel_noise, sample_tokens, top_n


class BlockCursor:
    """Where a block-wise schedule stands: blocks of `block_length` after the prompt, decoded left to right,
    `steps / num_blocks` steps each; a block ends when it has no mask left, possibly before its step budget
    (parallel decoding, early commit). Shared by LLaDA's schedule and Fast-dLLM's block decoding of Dream."""

    def __init__(self, prompt_length: int, gen_length: int, block_length: int, steps: int):
        self.prompt_length, self.block_length = prompt_length, block_length
        self.num_blocks = gen_length // block_length  # the params checked that blocks and steps divide evenly
        self.steps_per_block = steps // self.num_blocks
        self.blk, self.start = 0, 0

    def range(self) -> tuple[int, int]:
        start = self.prompt_length + self.blk * self.block_length
        return start, start + self.block_length

    def advance(self, i: int, mask_index: Tensor, lockstep: bool = False) -> bool:
        """Move to the first block that still has masks; True when step i starts a block. In `lockstep` (no
        parallel decoding or early commit) every block takes exactly its steps, so the block follows from i
        without reading the canvas back."""
        if i == 0:
            self.blk, self.start = 0, 0
            return True
        if lockstep:
            blk = min(i // self.steps_per_block, self.num_blocks - 1)
            entered = blk != self.blk
            if entered:
                self.blk, self.start = blk, i
            return entered
        entered = False
        start, end = self.range()
        while self.blk < self.num_blocks - 1 and not mask_index[:, start:end].any():
            self.blk, self.start, entered = self.blk + 1, i, True
            start, end = self.range()
        return entered

    def step(self, i: int) -> int:
        return i - self.start


class Schedule:
    """The defaults of the decode loop's `Rule` protocol (runtime/decode.py) that most rules share: they keep
    no per-sequence state beyond what they register lazily, let the cache policy choose the rows, run while a
    sequence has masks, use the model's own attention kind and have no remasking option."""

    remasking = None
    attention: str | None = None  # the attention kind of its steps when not the model's
    known_rows: int | None = None  # the loop reads each step's active row count back

    def start(self, seq) -> None:
        """Register the per-sequence state the rule needs from the first step on (runtime/state.py)."""

    def scope(self, i: int, seq) -> Tensor | None:
        """[B, L] rows the schedule itself computes at step i (block-causal families), or None: the cache
        policy decides."""
        return None

    def running(self, mask_index: Tensor, seq) -> Tensor:
        """[B] sequences that still decode."""
        return mask_index.any(1)


class Blockwise(Schedule):
    """What a block-wise rule answers from its `cursor` (and `parallel`, `steps_per_block`)."""

    cursor: BlockCursor
    lockstep: bool  # nothing can end a block before its steps are done (no parallel decoding, no early commit)

    def block(self, i: int) -> tuple[int, int]:
        return self.cursor.range()

    def block_step(self, i: int) -> int:
        return self.cursor.step(i)

    def needs_all(self, i: int) -> bool:
        return self.parallel is None and self.block_step(i) >= self.steps_per_block - 1



@dataclass
class DreamRule(Schedule):
    """Dream's `diffusion_generate` (its generation_utils `_sample`): a linear timestep schedule from 1 to
    `eps`; at step i a fraction 1 - s/t of the masked tokens is committed (the most confident by `alg`;
    `origin` commits each masked token with that probability), everything left at the last step.

    With `parallel` (Fast-dLLM's `alg='confidence_threshold'` for Dream): each step may commit up to
    max_new_tokens/steps tokens plus the ones it declined before; it always commits the most confident and
    declines the others below the threshold; at the last step a declined token adds a step.

    Positions whose predicting row was not computed (a cache policy kept it stable) get logits of -inf, as
    upstream's dKV-Cache fills them: that is what makes its `shift=right` commit token 0 there."""

    mask_token_id: int
    p: object  # the family's validated parameters (runtime/families/dream.py DreamParams)
    parallel: float | None = None  # confidence threshold, or None
    exact_ties: bool = False  # a policy leaves needed rows uncomputed: break -inf ties as upstream (DecodePlan)

    def __post_init__(self):
        p = self.p.validate()
        self.steps, self.alg, self.alg_temp = p.steps, p.alg, p.alg_temp
        self.sampling = dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        self.timesteps = torch.linspace(1, p.eps, p.steps + 1)
        # parallel decoding's per-sequence counts live in the session's state: rule.per_step (tokens a step may
        # commit), rule.left (declined so far), rule.steps (each sequence's step count; grows when the last declines)

    def num_steps(self, seq) -> int:
        if self.parallel is None or "rule.steps" not in seq:
            return self.steps
        return int(seq["rule.steps"].max())

    def needed(self, i: int, mask_index: Tensor, seq) -> Tensor:
        return mask_index

    def block(self, i: int) -> tuple[int, int] | None:
        return None  # one block: the whole answer

    def block_step(self, i: int) -> int:
        return i

    def needs_all(self, i: int) -> bool:
        return self.parallel is None and i == self.steps - 1

    def quota(self, i: int, needed: Tensor, seq=None) -> Tensor:
        """Tokens per sequence this step commits (parallel: at least): a fraction 1 - s/t of its masked tokens,
        all of them at the last step. Upstream computes one count from the batch mean, which is the same
        thing while every sequence has the same number of masks (it always has, upstream); per sequence,
        sequences that early commit moved ahead keep a schedule of their own."""
        num_mask = needed.sum(1)
        if self.parallel is not None:
            return torch.ones_like(num_mask)
        if self.needs_all(i):
            return num_mask
        return linear_share(num_mask, self.timesteps, i)

    @property
    def max_needed(self) -> int:
        return self.p.max_new_tokens

    @property
    def deterministic(self) -> bool:
        """Greedy by confidence: commits without reading the device back (the other forms follow upstream's
        random draws, whose number depends on how many positions are masked)."""
        return self.sampling["temperature"] == 0 and self.alg != "origin" and not self.alg_temp and \
            self.parallel is None and not self.exact_ties

    def commit(self, i: int, x: Tensor, preds, rows: Tensor, seq) -> Tensor:
        """The new canvas from the step's predictions (`decode.Predictions`). Needed positions whose predicting
        row stayed cached get -inf logits, as upstream's dKV-Cache fills them."""
        needed = preds.needed
        kw = self.sampling
        if self.deterministic:
            B = x.shape[0]
            conf, x0 = sample_tokens(preds.logits.flatten(0, 1), margin_confidence=self.alg == "topk_margin",
                                     neg_entropy=self.alg == "entropy", **kw)
            full_conf = preds.full(conf.view(B, -1), -torch.inf, missing=torch.nan)
            take = top_n(full_conf, self.quota(i, needed)) & needed
            return torch.where(take, preds.full(x0.view(B, -1), -1, missing=0), x)
        computed, logits = preds.computed, preds.flat()
        if not torch.equal(computed, needed):
            logits = _fill_missing(needed, computed, logits)
        if self.parallel is not None:
            return self._commit_parallel(i, x, needed, logits, kw, seq)
        t, s = self.timesteps[i], self.timesteps[i + 1]
        last = i == self.steps - 1
        if self.alg == "origin":
            p_transfer = 1 if last else 1 - s / t
            x0 = torch.zeros_like(x[needed]) + self.mask_token_id
            transfer = row_rng.rand(x0.shape[0], needed, device=x.device) < p_transfer
            rows = torch.bincount(needed.nonzero(as_tuple=True)[0][transfer], minlength=x.shape[0]) \
                if row_rng.active() is not None else None
            _, x0[transfer] = sample_tokens(logits[transfer], rows=rows, **kw)
            x = x.clone()
            x[needed] = x0
            return x
        confidence, x0 = sample_tokens(logits, margin_confidence=self.alg == "topk_margin",
                                       neg_entropy=self.alg == "entropy", **kw)
        return _commit_top(x, needed, x0, confidence, self.quota(i, needed), self.alg_temp, logits.dtype)

    def _commit_parallel(self, i: int, x: Tensor, needed: Tensor, logits: Tensor, kw: dict, seq) -> Tensor:
        B = x.shape[0]
        if "rule.left" not in seq:
            total = needed.sum(1)
            if bool((total % self.steps).any()):
                raise UsageError(f"parallel decoding of Dream without blocks commits max_new_tokens / steps tokens "
                                 f"per step, so max_new_tokens ({int(total.max())}) must be a multiple of steps "
                                 f"({self.steps}); pass --steps dividing it, or --block-length for block decoding", field="steps")
            seq["rule.per_step"] = total // self.steps
            seq["rule.left"] = torch.zeros_like(total)
            seq["rule.steps"] = torch.full_like(total, self.steps)
        per_step, left, steps = seq["rule.per_step"], seq["rule.left"], seq["rule.steps"]
        confidence, x0 = sample_tokens(logits, **kw)
        conf = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
        conf[needed] = confidence
        cand = torch.full_like(x, self.mask_token_id)
        cand[needed] = x0
        take = torch.zeros_like(needed)
        for b in range(B):
            cur = int(per_step[b] + left[b])
            left[b] = 0
            cur = min(cur, int(needed[b].sum()))
            if cur <= 0:
                continue
            vals, idx = torch.topk(conf[b], cur)
            take[b, idx[0]] = True
            for k in range(1, cur):
                if vals[k] < self.parallel:
                    left[b] += 1
                    if i >= int(steps[b]) - 1:
                        per_step[b] = 0
                        steps[b] += 1
                else:
                    take[b, idx[k]] = True
        x = x.clone()
        x[take] = cand[take]
        return x


def linear_share(num_mask: Tensor, timesteps: Tensor, k: int) -> Tensor:
    """Dream's linear schedule: at step k, the fraction 1 - s/t of the masked tokens (t, s its timesteps)."""
    t, s = timesteps[k], timesteps[k + 1]
    return (num_mask * (1 - s / t)).long()


def _fill_missing(needed: Tensor, computed: Tensor, logits: Tensor) -> Tensor:
    """Logits for every needed position in row-major order: the computed ones, -inf rows for the others."""
    full = torch.full((int(needed.sum()), logits.shape[-1]), -torch.inf, dtype=logits.dtype, device=logits.device)
    full[computed[needed]] = logits
    return full


def _commit_top(x: Tensor, where: Tensor, x0: Tensor, confidence: Tensor, n: Tensor, alg_temp: float | None,
                dtype: torch.dtype) -> Tensor:
    """Dream's transfer: per row the `n[b]` highest confidences (over the whole row; positions outside
    `where` carry -inf), or `n[b]` draws from softmax(confidence / alg_temp). One batched call when every
    row takes the same number, as upstream makes it."""
    full_conf = torch.full(x.shape, -torch.inf, dtype=dtype, device=x.device)
    full_conf[where] = confidence
    cand = torch.full_like(x, -1)
    cand[where] = x0
    take = torch.zeros_like(where)
    groups = [(torch.arange(x.shape[0], device=x.device), int(n[0]))] if bool((n == n[0]).all()) else \
        [(torch.tensor([b], device=x.device), int(n[b])) for b in range(x.shape[0])]
    for rows, k in groups:
        if k <= 0:
            continue
        conf = full_conf[rows]
        if not alg_temp:
            idx = torch.topk(conf, k).indices
        else:
            idx = torch.multinomial(F.softmax(conf / alg_temp, dim=-1), num_samples=k)
        take[rows[:, None].expand_as(idx), idx] = True
    take &= where  # upstream would write the mask id back over a prompt position here; we skip it
    x = x.clone()
    x[take] = cand[take]
    return x


@dataclass
class DreamBlockRule(Blockwise):
    """Fast-dLLM's block decoding of Dream (its generation_utils_block `_sample`): the answer is split into
    blocks of `block_length` decoded left to right, `steps / num_blocks` steps each. A block's first step
    commits only its first position (the most probable token); the remaining steps follow Dream's linear
    schedule over the block's own timesteps, committing the most confident by `alg` (upstream fixes `alg`
    to entropy here whatever the caller asked; we honour maskgit_plus and topk_margin, and use entropy for
    `origin`, which has no block form: identical to upstream for entropy and origin). With `parallel`, after
    the first step each step commits the block's most confident token and every other one at or above the
    threshold, until the block is done."""

    mask_token_id: int
    p: object  # the family's validated parameters (runtime/families/dream.py DreamParams)
    prompt_length: int
    parallel: float | None = None
    exact_ties: bool = False
    lockstep: bool = False

    def __post_init__(self):
        p = self.p.validate()
        self.alg = "entropy" if p.alg == "origin" else p.alg  # upstream's block decoder has no origin variant
        self.alg_temp, self.steps = p.alg_temp, p.steps
        self.sampling = dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        self.cursor = BlockCursor(self.prompt_length, p.max_new_tokens, p.block_length, p.steps)
        self.steps_per_block = self.cursor.steps_per_block
        if self.parallel is None and self.steps_per_block < 2:
            raise UsageError(f"block decoding needs at least 2 steps per block (the first commits one token), "
                             f"got {self.steps_per_block}: pass more steps or a longer block_length", field="steps")
        self.timesteps = torch.linspace(1, p.eps, self.steps_per_block + 1)

    def num_steps(self, seq=None) -> int:
        return self.steps if self.parallel is None else self.p.max_new_tokens + self.cursor.num_blocks

    def needed(self, i: int, mask_index: Tensor, seq=None) -> Tensor:
        self.cursor.advance(i, mask_index, self.lockstep)
        start, end = self.cursor.range()
        needed = torch.zeros_like(mask_index)
        if i == self.cursor.start:
            needed[:, start] = mask_index[:, start]
        else:
            needed[:, start:end] = mask_index[:, start:end]
        return needed

    def quota(self, i: int, needed: Tensor, seq=None) -> Tensor:
        num_mask = needed.sum(1)
        k = self.block_step(i)
        if k == 0 or self.parallel is not None:
            return torch.ones_like(num_mask)
        if k >= self.steps_per_block - 1:
            return num_mask
        return linear_share(num_mask, self.timesteps, k)

    @property
    def max_needed(self) -> int:
        return self.p.block_length

    def commit(self, i: int, x: Tensor, preds, rows: Tensor, seq) -> Tensor:
        needed, kw = preds.needed, self.sampling
        if kw["temperature"] == 0 and not self.alg_temp and not self.exact_ties:  # fixed shapes, no read-back
            B = x.shape[0]
            plain = self.block_step(i) == 0 or self.parallel is not None
            conf, x0 = sample_tokens(preds.logits.flatten(0, 1), margin_confidence=not plain and self.alg == "topk_margin",
                                     neg_entropy=not plain and self.alg == "entropy", **kw)
            full_x0 = preds.full(x0.view(B, -1), -1, missing=0)
            if self.block_step(i) == 0:
                return torch.where(needed, full_x0, x)
            full_conf = preds.full(conf.view(B, -1), -torch.inf, missing=torch.nan)
            if self.parallel is not None:
                return commit_above_full(x, needed, full_x0, full_conf, self.parallel)
            take = top_n(full_conf, self.quota(i, needed)) & needed
            return torch.where(take, full_x0, x)
        computed, logits = preds.computed, preds.flat()
        if not torch.equal(computed, needed):
            logits = _fill_missing(needed, computed, logits)
        if self.block_step(i) == 0:
            _, x0 = sample_tokens(logits, **kw)
            x = x.clone()
            x[needed] = x0
            return x
        if self.parallel is not None:
            confidence, x0 = sample_tokens(logits, **kw)
            return commit_above(x, needed, x0, confidence, self.parallel)
        confidence, x0 = sample_tokens(logits, margin_confidence=self.alg == "topk_margin",
                                       neg_entropy=self.alg == "entropy", **kw)
        return _commit_top(x, needed, x0, confidence, self.quota(i, needed), self.alg_temp, logits.dtype)


def commit_above_full(x: Tensor, computed: Tensor, x0: Tensor, conf: Tensor, threshold: float) -> Tensor:
    """`commit_above` on full [B, L] confidences and tokens (-inf where not computed), without read-back."""
    take = (conf >= threshold) & computed
    best = torch.zeros_like(take).scatter(1, conf.argmax(1, keepdim=True), True)
    take |= best & computed.any(1, keepdim=True)
    return torch.where(take & computed, x0, x)


def commit_above(x: Tensor, computed: Tensor, x0: Tensor, confidence: Tensor, threshold: float) -> Tensor:
    """Fast-dLLM's confidence-threshold parallel decoding: commit the computed positions whose confidence
    reaches `threshold`, and in every sequence with a computed position at least the most confident one."""
    conf = torch.full(x.shape, -torch.inf, dtype=confidence.dtype, device=x.device)
    conf[computed] = confidence
    take = conf >= threshold
    best = conf.argmax(1)
    has = computed.any(1)
    take[has, best[has]] = True
    take &= computed
    cand = x.clone()
    cand[computed] = x0
    x = x.clone()
    x[take] = cand[take]
    return x


@dataclass
class LLaDARule(Blockwise):
    """LLaDA's `generate`: the answer is split into blocks decoded left to right (semi-autoregressive when
    block_length < gen_length); each block gets steps/num_blocks steps with an equal share of its masked
    tokens per step (remainder first), committing the most confident (`low_confidence`, float64 softmax as
    dKV-Cache and Fast-dLLM compute it) or random ones (`random`: a uniform draw over the rows the step
    computed, as upstream draws it).

    `order='block'` draws the random scores once when a block starts and commits in that order: the form
    dKV-Cache-Greedy uses, because it lets the cache policy know the rows decoded next. With `parallel`
    (Fast-dLLM), each step commits the block's best token and every other one at or above the threshold,
    and a block runs until it has no mask left."""

    p: object  # runtime/families/llada.py LLaDAParams
    prompt_length: int
    parallel: float | None = None
    order: str = "step"
    exact_ties: bool = False
    lockstep: bool = False

    def __post_init__(self):
        p = self.p.validate()
        if self.order not in ("step", "block") or (self.order == "block" and p.remasking != "random"):
            raise UsageError("order='block' applies to remasking='random' only", field="remasking")
        self.remasking, self.temperature = p.remasking, p.temperature
        self.cursor = BlockCursor(self.prompt_length, p.gen_length, p.block_length, p.steps)
        self.steps_per_block = self.cursor.steps_per_block
        # per sequence, in the session's state: rule.transfer (this block's tokens per step), rule.scores
        # (order='block': this block's commit order)

    def num_steps(self, seq=None) -> int:
        return self.p.steps if self.parallel is None else self.p.gen_length + self.cursor.num_blocks

    def needed(self, i: int, mask_index: Tensor, seq) -> Tensor:
        """Masked positions of the current block: the first block that still has masks."""
        entered = self.cursor.advance(i, mask_index, self.lockstep)
        start, end = self.cursor.range()
        if entered:
            seq["rule.transfer"] = num_transfer_tokens(mask_index[:, start:end], self.steps_per_block)
            if self.order == "block":
                s = torch.rand(mask_index.shape, device=mask_index.device)
                s[:, end:] = -torch.inf
                s[:, :start] = -torch.inf
                seq["rule.scores"] = s
        needed = torch.zeros_like(mask_index)
        needed[:, start:end] = mask_index[:, start:end]
        return needed

    def quota(self, i: int, needed: Tensor, seq) -> Tensor:
        if self.parallel is not None:
            return torch.ones_like(needed.sum(1))
        k = self.block_step(i)
        if k >= self.steps_per_block:
            return needed.sum(1)
        return seq["rule.transfer"][:, k]

    @property
    def max_needed(self) -> int:
        return self.p.block_length

    def commit(self, i: int, x: Tensor, preds, rows: Tensor, seq) -> Tensor:
        """`rows` [B, A]: the canvas rows this step computed, in the order upstream's random draw follows. A
        needed position that was not computed is never committed (upstream gives it -inf confidence)."""
        needed = preds.needed
        if self.temperature == 0:  # argmax tokens: fixed shapes, no read-back
            B = x.shape[0]
            x0 = torch.argmax(preds.logits, dim=-1)
            computed = preds.computed
            full_x0 = preds.full(x0, -1)
            if self.remasking == "low_confidence":
                p = torch.gather(F.softmax(preds.logits.to(torch.float64), dim=-1), -1, x0[..., None]).squeeze(-1)
                conf = preds.full(p, -torch.inf)
            elif self.order == "block":
                conf = torch.where(needed, seq["rule.scores"], torch.full_like(seq["rule.scores"], -torch.inf))
            else:
                r = torch.rand(rows.shape, device=x.device)  # upstream: one draw per computed row
                conf = preds.full(r.gather(1, preds.index), -torch.inf)
            if self.parallel is not None:
                return commit_above_full(x, computed, full_x0, torch.where(computed, conf, -torch.inf),
                                         self.parallel)
            take = top_n(conf, self.quota(i, needed, seq).expand(B)) & computed
            return torch.where(take, full_x0, x)
        computed, logits = preds.computed, preds.flat()
        x0 = torch.argmax(add_gumbel_noise(logits, self.temperature, computed), dim=-1)
        if self.remasking == "low_confidence":
            p = F.softmax(logits.to(torch.float64), dim=-1)
            conf = torch.full(x.shape, -torch.inf, dtype=torch.float64, device=x.device)
            conf[computed] = torch.gather(p, -1, x0[:, None]).squeeze(-1)
        elif self.order == "block":
            conf = torch.where(computed, seq["rule.scores"], torch.full_like(seq["rule.scores"], -torch.inf))
        else:
            r = torch.rand(rows.shape, device=x.device)
            conf = torch.full(x.shape, -torch.inf, device=x.device).scatter(1, rows, r)
            conf = torch.where(computed, conf, torch.full_like(conf, -torch.inf))
        cand = x.clone()
        cand[computed] = x0
        if self.parallel is not None:
            return commit_above(x, computed, cand[computed], conf[computed], self.parallel)
        if self.order == "block":  # commit in the drawn order, whether or not the row was computed
            conf = torch.where(needed, seq["rule.scores"], torch.full_like(seq["rule.scores"], -torch.inf))
        take = top_n(conf, self.quota(i, needed, seq).expand(x.shape[0])) & computed
        return torch.where(take, cand, x)


def num_transfer_tokens(block_mask: Tensor, steps: int) -> Tensor:
    """[B, steps] tokens to commit per step: an equal share of the block's masks, remainder first (LLaDA)."""
    n = block_mask.sum(dim=1, keepdim=True)
    return n // steps + (torch.arange(steps, device=block_mask.device)[None] < n % steps).long()
