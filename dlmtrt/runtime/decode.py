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

from dlmtrt.errors import UsageError

from .prefix import attach, capture
from .policies import NEVER, DecodePlan, DecodeState, parse_policy, rows_of
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
    prefix_rows: int = 0  # prompt rows served from a prefix store instead of computed (runtime/prefix.py)
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

    @property
    def max_needed(self) -> int: ...  # the most positions one sequence can want at a step

    def commit(self, i: int, x: Tensor, preds: "Predictions", rows: Tensor) -> Tensor: ...

    def keep(self, rows: Tensor) -> None: ...  # go on with these sequences only (DecodeSession.keep)


def pack_rows(active: Tensor, A: int | None = None) -> Tensor:
    """Canvas slots of the active rows, [B, A] ascending; shorter rows repeat their last slot (an idempotent
    rewrite of the same row) so the batch stays rectangular. `A` is the largest count, when known."""
    counts = active.sum(1)
    A = int(counts.max()) if A is None else A
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :A]
    last = order.gather(1, (counts - 1).clamp_min(0)[:, None])
    pad = torch.arange(A, device=active.device)[None] >= counts[:, None]
    return torch.where(pad, last, order)


def source_rows(positions: Tensor, shift: bool) -> Tensor:
    """Row whose logits predict each position: p-1 under Dream's shift (row 0 predicts itself), else p."""
    return (positions - 1).clamp_min(0) if shift else positions


@dataclass
class Predictions:
    """The step's predictions for the positions the rule wants, in a fixed shape: candidate rows [B, R]
    (R bounded by what the rule can want), the logits of each [B, R, V], the position each predicts, and
    which candidates are real (`ok`). `index` says which active row each candidate is. Nothing here reads
    the device back, so a step can queue its whole commit behind the backend's work."""

    logits: Tensor  # [B, R, V]
    pos: Tensor  # [B, R] predicted positions (valid where ok)
    ok: Tensor  # [B, R] bool
    index: Tensor  # [B, R] index into the step's active rows
    needed: Tensor  # [B, L] positions the rule wanted this step

    def full(self, values: Tensor, fill, missing=None) -> Tensor:
        """[B, L] with `values` [B, R] at the predicted positions, `missing` at needed positions nobody
        predicted (a cache kept their row stable), `fill` elsewhere."""
        B, L = self.needed.shape
        idx = torch.where(self.ok, self.pos, L)
        out = torch.full((B, L + 1), fill, dtype=values.dtype, device=values.device).scatter(1, idx, values)[:, :L]
        if missing is not None:
            covered = torch.zeros(B, L + 1, dtype=torch.bool, device=idx.device).scatter(1, idx, True)[:, :L]
            out = torch.where(self.needed & ~covered, torch.full_like(out, missing), out)
        return out

    @property
    def computed(self) -> Tensor:
        """[B, L] needed positions whose prediction was computed."""
        B, L = self.needed.shape
        idx = torch.where(self.ok, self.pos, L)
        return torch.zeros(B, L + 1, dtype=torch.bool, device=idx.device).scatter(1, idx, True)[:, :L]

    def flat(self) -> Tensor:
        """Logits of the computed positions in row-major position order [N, V] (reads the count back)."""
        return self.logits[self.ok]


class DecodeSession:
    """One generation (a batch of sequences that decode together): the canvas, the K/V cache it owns, the
    rule with its schedule state, the policy's per-generation memory and the statistics. Policies are
    stateless, so one `DecodePlan` serves any number of sessions at once; a server advances many sessions
    one `step()` at a time.

    A step reads the device back once: the number of active rows (which also says whether anything is left),
    because the backend's shapes depend on it. Everything after the backend is queued without waiting, except
    for the schedules that draw a random number per masked token (Dream's `origin` and sampling, LLaDA's
    per-step random order), which follow upstream's draws and read the count back.

    `plan` picks the rows each step recomputes and whether parallel decoding and early commit apply. With
    `cfg_scale` > 0 (LLaDA's unsupervised classifier-free guidance) every step also runs an unconditional copy
    of the canvas whose `prompt_index` positions are masked; both copies use the same active rows."""

    def __init__(self, backend: StepBackend, x: Tensor, attention_mask: Tensor, rule: Rule, plan: DecodePlan,
                 *, cfg_scale: float = 0.0, prompt_index: Tensor | None = None, prefix_store=None):
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
        self.memory: dict = {}
        self.frozen = torch.zeros(B, L, dtype=torch.bool, device=dev)  # prefix rows served from a store (prefix.py)
        self.i = 0
        self.finished = self.stats.new_tokens == 0
        self._seq_fwd = torch.zeros((), dtype=torch.long, device=dev)  # device-side counters, read at the end
        self._early = torch.zeros((), dtype=torch.long, device=dev)
        if plan.cache.skips_needed_rows and not rule.exact_ties:
            raise ValueError(f"policy {plan.spec} leaves needed rows uncomputed: build the rule with "
                             "plan.rule_options() (exact_ties), as the families do")
        self.prefix_store = prefix_store  # serves stored prompt prefixes, and takes the ones step 0 computes
        if prefix_store is not None:
            if cfg_scale > 0:
                raise UsageError("prefix reuse does not apply with classifier-free guidance (its unconditional copy "
                                 "masks the prompt); leave cfg_scale at 0 or turn prefix reuse off")
            self.stats.prefix_rows = attach(self, prefix_store)

    @property
    def done(self) -> bool:
        return self.finished or self.i >= self.rule.num_steps

    def step(self) -> None:
        """One denoising step: plan the rows, run the backend, commit tokens, keep the cache."""
        info, rule, plan, i = self.info, self.rule, self.plan, self.i
        x, shift, cfg = self.x, info.logits_shift, self.cfg_scale > 0
        B, L = x.shape
        dev = x.device
        mask_index = x == info.mask_token_id
        needed = rule.needed(i, mask_index)
        state = DecodeState(i, rule.block_step(i), rows_of(needed, shift), rule.quota(i, needed), self.valid, self.am,
                            self.decoded_at, self.computed_at, needed, rule.block(i) or (self.answer_start, L), shift,
                            getattr(rule, "scores", None), self.memory)
        active, stable = plan.cache.plan(state)
        active, stable = active & ~self.frozen, stable | self.frozen
        running = mask_index.any(1)
        active = active & running[:, None]  # a finished sequence computes nothing (its rows stay valid)
        counts = active.sum(1)
        A = int(counts.max())  # the step's one read-back: the backend's shapes depend on it
        if A == 0:
            self.finished = True
            return
        pos = pack_rows(active, A)
        known = stable | (active & self.valid)  # active rows with a valid past: kv_drift is measured against it
        cand = self._candidates(pos, counts, needed, A)
        x_in = x
        if cfg:
            x_in = torch.cat([x, torch.where(self.prompt_index, torch.full_like(x, info.mask_token_id), x)])
            pos_in, known_in, cand_in = torch.cat([pos, pos]), torch.cat([known, known]), torch.cat([cand[0], cand[0]])
        else:
            pos_in, known_in, cand_in = pos, known, cand[0]
        selects = getattr(self.backend, "selects_logit_rows", False)
        out: StepOutputs = self.backend.step(StepInputs(
            x_in.gather(1, pos_in), pos_in, self.keys, self.values, known_in, self.am_in,
            logit_rows=cand_in if selects else None, need_drift=plan.cache.observes_drift))
        self.keys, self.values = out.present_keys, out.present_values
        self.valid = out.present_valid[:B]
        logits = out.logits
        if cfg:
            cond, uncond = logits.chunk(2)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        if not selects:
            logits = logits.gather(1, cand[0][..., None].expand(-1, -1, logits.shape[-1]))
        preds = Predictions(logits, cand[1], cand[2], cand[0], needed)
        new_x = rule.commit(i, x, preds, pos)
        if plan.early is not None:
            new_x = _early_commit(plan.early, new_x, preds, self.answer, info.mask_token_id, self)
        committed = (new_x != info.mask_token_id) & mask_index
        self.decoded_at = torch.where(committed, i, self.decoded_at)
        self.computed_at = torch.where(active, i, self.computed_at)
        if plan.cache.observes_drift:
            drift = torch.zeros(B, L, device=dev).scatter(1, pos, out.kv_drift[:B].float())
            plan.cache.observe(self.memory, active, drift, known, committed)
        self.x = new_x
        n_rows = pos_in.shape[0] * A
        st = self.stats
        st.steps += 1
        st.forward_passes += 1
        self._seq_fwd += running.sum()
        st.rows_computed += n_rows
        st.rows_full += pos_in.shape[0] * L
        st.per_step_rows.append(n_rows)
        self.i += 1
        if self.prefix_store is not None and i == 0:
            capture(self, self.prefix_store, 0)

    def keep(self, rows: list[int]) -> None:
        """Go on with these sequences only, in this order: a server drops the ones it has answered or whose
        client has gone, so that later steps compute nothing for them. Every per-sequence tensor (canvas, masks,
        cache, the rule's and the policy's state) is cut to `rows`; what the kept sequences compute does not
        change. Only for a cache the session owns (not a backend's shared buffer)."""
        B = self.x.shape[0]
        if sorted(set(rows)) != sorted(rows) or not rows or not all(0 <= r < B for r in rows):
            raise ValueError(f"keep() takes distinct rows of the batch of {B}, got {rows}")
        idx = torch.tensor(rows, dtype=torch.long, device=self.x.device)
        cache_idx = torch.cat([idx, idx + B]) if self.cfg_scale > 0 else idx
        self.x, self.am, self.answer, self.valid = self.x[idx], self.am[idx], self.answer[idx], self.valid[idx]
        self.decoded_at, self.computed_at, self.frozen = self.decoded_at[idx], self.computed_at[idx], self.frozen[idx]
        self.am_in = self.am_in[cache_idx]
        if self.prompt_index is not None:
            self.prompt_index = self.prompt_index[idx]
        self.keys = [k[cache_idx] for k in self.keys]
        self.values = [v[cache_idx] for v in self.values]
        self.memory = {k: v[idx] if isinstance(v, Tensor) and v.shape[:1] == (B,) else v for k, v in self.memory.items()}
        self.rule.keep(idx)
        self.stats.batch = len(rows)

    def _candidates(self, pos: Tensor, counts: Tensor, needed: Tensor, A: int) -> tuple[Tensor, Tensor, Tensor]:
        """The candidate rows (index [B, R] into the active rows, predicted position, real or padding): active
        rows whose predicted position the rule wants, at most as many as it can want (`rule.max_needed`), in
        position order. Known before the step, so a backend can run the output head on these rows only."""
        B, L = needed.shape
        shift = self.info.logits_shift
        pred_pos = pos + 1 if shift else pos  # Dream: row p predicts p + 1 (row 0's own position is never masked)
        in_canvas = pred_pos < L
        pp = pred_pos.clamp_max(L - 1)
        first = torch.arange(A, device=pos.device)[None] < counts[:, None]  # padding repeats the last row
        ok = in_canvas & first & needed.gather(1, pp)
        R = min(A, self.rule.max_needed)
        cand = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices[:, :R]
        return cand, pp.gather(1, cand), ok.gather(1, cand)

    def finish(self) -> GenerationStats:
        self.stats.seq_forward_passes = int(self._seq_fwd)
        self.stats.early_committed = int(self._early)
        return self.stats


def drive(session: DecodeSession, on_step: Callable[[int, int], None] | None = None
          ) -> tuple[Tensor, GenerationStats]:
    """Step `session` until it is done; returns (canvas, stats)."""
    t0 = time.perf_counter()
    while not session.done:
        i = session.i
        session.step()
        if on_step is not None and session.i > i:
            on_step(session.i, max(session.i, session.rule.num_steps))
    if session.x.device.type == "cuda":
        torch.cuda.synchronize(session.x.device)
    stats = session.finish()
    stats.wall_s = time.perf_counter() - t0
    return session.x, stats


def denoise(backend: StepBackend, x: Tensor, attention_mask: Tensor, rule: Rule, *,
            policy: str | DecodePlan | None = None, cfg_scale: float = 0.0, prompt_index: Tensor | None = None,
            on_step: Callable[[int, int], None] | None = None, prefix_store=None) -> tuple[Tensor, GenerationStats]:
    """Run `rule` on canvas `x` [B, L] until it is done or nothing is masked; returns (x, stats). One
    `DecodeSession` driven to the end. With a `prefix_store` (runtime/prefix.py) the prompts' stored prefixes
    are served from it and the prompt blocks the first step computes are added to it."""
    return drive(DecodeSession(backend, x, attention_mask, rule, parse_policy(policy), cfg_scale=cfg_scale,
                               prompt_index=prompt_index, prefix_store=prefix_store), on_step)


def _early_commit(early, x: Tensor, preds: Predictions, answer: Tensor, mask_id: int, session) -> Tensor:
    """Commit every still-masked needed position of the sequences whose top-2 gap is large everywhere."""
    probs = torch.softmax(preds.logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values if probs.shape[-1] > 1 else torch.cat([probs, 0 * probs], -1)
    gap = preds.full(top2[..., 0] - top2[..., 1], -1.0)
    argmax = preds.full(probs.argmax(-1), mask_id)
    computed = preds.computed
    progress = 1 - (x == mask_id).logical_and(answer).sum(1).float() / answer.sum(1).clamp_min(1)
    rest = preds.needed & (x == mask_id)
    gap_ok = torch.where(rest, gap >= early.thresholds(progress)[:, None], True).all(1)
    fire = rest.any(1) & ~(rest & ~computed).any(1) & gap_ok
    take = rest & fire[:, None]
    session._early += take.sum()
    return torch.where(take, argmax, x)
