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

from .contract import StepBackend, StepInputs, StepOutputs
from .policies import NEVER, DecodePlan, DecodeState, parse_policy, rows_of
from .sampling import add_gumbel_noise
from .state import KVCache, SequenceState


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
    exit_steps: list[int | None] = field(default_factory=list)  # +prophet: each sequence's 1-based exit step
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
    """An unmasking schedule (runtime/unmasking.py): which positions want predictions, how many tokens a step
    commits, and the commit itself. One object per generation, built once with the plan's options
    (`DecodePlan.rule_options`); its per-sequence state lives in the session's `SequenceState` (`seq`, keys
    `rule.*`), which every call receives, so that a batch cut needs nothing from the rule."""

    remasking: str | None  # LLaDA's remasking (what Greedy needs), None for schedules without one
    exact_ties: bool  # a policy leaves needed rows uncomputed: break their -inf ties as upstream does
    attention: str | None  # the attention kind of its steps when not the model's (SDAR's block length)
    known_rows: int | None  # after needed(): this step's active row count where the rule knows it on the host

    def start(self, seq: SequenceState) -> None: ...  # register its per-sequence state

    def scope(self, i: int, seq: SequenceState) -> Tensor | None: ...  # rows it computes itself, or None

    def running(self, mask_index: Tensor, seq: SequenceState) -> Tensor: ...  # [B] sequences still decoding

    def num_steps(self, seq: SequenceState) -> int: ...  # an upper bound; it may grow (parallel decoding)

    def needed(self, i: int, mask_index: Tensor, seq: SequenceState) -> Tensor: ...

    def block(self, i: int) -> tuple[int, int] | None: ...

    def block_step(self, i: int) -> int: ...

    def quota(self, i: int, needed: Tensor, seq: SequenceState) -> Tensor: ...

    @property
    def max_needed(self) -> int: ...  # the most positions one sequence can want at a step

    def commit(self, i: int, x: Tensor, preds: "Predictions", rows: Tensor, seq: SequenceState) -> Tensor: ...


def pack_rows(active: Tensor, A: int | None = None) -> Tensor:
    """Canvas slots of the active rows, [B, A] ascending; shorter rows repeat their last slot (an idempotent
    rewrite of the same row) so the batch stays rectangular. `A` is the largest count, when known."""
    counts = active.sum(1)
    A = int(counts.max()) if A is None else A
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :A]
    last = order.gather(1, (counts - 1).clamp_min(0)[:, None])
    pad = torch.arange(A, device=active.device)[None] >= counts[:, None]
    return torch.where(pad, last, order)


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
    """One generation (a batch of sequences that decode together). It owns the generation's state: the K/V cache
    (`self.cache`, runtime/state.py, with its declared owner) and the per-sequence tensors (`self.seq`: the canvas
    `x`, its attention mask `am`, the answer positions, which rows are valid, when each row was decoded and
    computed, the prefix rows served from a store; the rule's schedule counts; the cache policy's memory).
    Policies and rules are stateless towards it: one `DecodePlan` serves any number of sessions at once, and a
    server advances many sessions one `step()` at a time.

    A step reads the device back once: the number of active rows (which also says whether anything is left),
    because the backend's shapes depend on it. Everything after the backend is queued without waiting, except
    for the schedules that draw a random number per masked token (Dream's `origin` and sampling, LLaDA's
    per-step random order), which follow upstream's draws and read the count back.

    `plan` picks the rows each step recomputes and whether parallel decoding and early commit apply. With
    `cfg_scale` > 0 (LLaDA's unsupervised classifier-free guidance) every step also runs an unconditional copy
    of the canvas whose `prompt_index` positions are masked; both copies use the same active rows."""

    def __init__(self, backend: StepBackend, x: Tensor, attention_mask: Tensor, rule: Rule, plan: DecodePlan,
                 *, cfg_scale: float = 0.0, prompt_index: Tensor | None = None, prefix_store=None,
                 answer_span: list[int] | None = None):
        info = backend.info
        plan.check(info.family, rule.remasking)
        if plan.prophet is not None and answer_span is None:
            raise UsageError("+prophet needs the answer's position: give constraints (its span starts 2 positions "
                             "after the last one, as Prophet's eval_llada.py sets it) or answer_start_pos",
                             field="answer_start_pos")
        if cfg_scale > 0 and prompt_index is None:
            raise ValueError("cfg_scale > 0 needs prompt_index (the positions to mask in the unconditional copy)")
        if plan.cache.skips_needed_rows and not rule.exact_ties:
            raise ValueError(f"policy {plan.spec} leaves needed rows uncomputed: build the rule with "
                             "plan.rule_options() (exact_ties), as the families do")
        if prefix_store is not None and cfg_scale > 0:
            raise UsageError("prefix reuse does not apply with classifier-free guidance (its unconditional copy "
                             "masks the prompt); leave cfg_scale at 0 or turn prefix reuse off")
        self.backend, self.rule, self.plan, self.info = backend, rule, plan, info
        self.cfg_scale = cfg_scale
        B, L = x.shape
        dev = x.device
        answer = x == info.mask_token_id
        self.seq = seq = SequenceState(B)
        seq["x"], seq["am"], seq["answer"] = x, attention_mask.bool(), answer
        seq["valid"] = torch.zeros(B, L, dtype=torch.bool, device=dev)
        seq["decoded_at"] = torch.where(answer, NEVER, -1)
        seq["computed_at"] = torch.full((B, L), -1, dtype=torch.long, device=dev)
        seq["frozen"] = torch.zeros(B, L, dtype=torch.bool, device=dev)  # prefix rows served from a store
        if prompt_index is not None:
            seq["prompt_index"] = prompt_index
        self.answer_start = int(answer.float().argmax(1).min()) if answer.any() else L
        self.stats = GenerationStats(batch=B, canvas_length=L, new_tokens=int(answer.sum(1).max()))
        self.cache = KVCache.new(backend, B, L, copies=2 if cfg_scale > 0 else 1)
        self.i = 0
        self.finished = self.stats.new_tokens == 0
        self._seq_fwd = torch.zeros((), dtype=torch.long, device=dev)  # device-side counters, read at the end
        self._early = torch.zeros((), dtype=torch.long, device=dev)
        self.prefix_store = prefix_store  # serves stored prompt prefixes (runtime/prefix.py, runtime/bicache.py)
        if prefix_store is not None:
            self.stats.prefix_rows = prefix_store.attach(self)
        rule.start(seq)  # after the prefix store: a schedule may skip what it served
        self.answer_span = answer_span  # +prophet: the canvas positions whose gaps it averages
        self.prophet_trace: list | None = None  # set to a list to record (step, mean gaps [B], filled canvas [B, L])
        if plan.prophet is not None:
            seq["prophet.exit"] = torch.full((B,), -1, dtype=torch.long, device=dev)
            self.prophet_steps = rule.num_steps(seq)  # their max_steps: the schedule's steps

    # the per-sequence tensors the loop, the prefix store and the server read
    x = property(lambda self: self.seq["x"])
    am = property(lambda self: self.seq["am"])
    answer = property(lambda self: self.seq["answer"])
    valid = property(lambda self: self.seq["valid"])
    frozen = property(lambda self: self.seq["frozen"])
    computed_at = property(lambda self: self.seq["computed_at"])

    @property
    def done(self) -> bool:
        return self.finished or self.i >= self.rule.num_steps(self.seq)

    def step(self) -> None:
        """One denoising step: plan the rows, run the backend, commit tokens, keep the cache."""
        rule, plan, i, seq = self.rule, self.plan, self.i, self.seq
        x, mask_id = seq["x"], self.info.mask_token_id
        mask_index = x == mask_id
        needed = rule.needed(i, mask_index, seq)
        prophet = plan.prophet
        want = needed  # what the step's predictions must cover: +prophet also reads the span and every mask
        if prophet is not None:
            want = needed | mask_index
            want[:, self.answer_span] = True
        active, stable = self._plan_rows(i, needed)
        running = rule.running(mask_index, seq)
        active = active & running[:, None]  # a finished sequence computes nothing (its rows stay valid)
        counts = active.sum(1)
        # the step's one read-back (the backend's shapes depend on it), unless the rule knows the count on the host
        A = int(counts.max()) if rule.known_rows is None else rule.known_rows
        if A == 0:
            self.finished = True
            return
        pos = pack_rows(active, A)
        known = stable | (active & seq["valid"])  # active rows with a valid past: kv_drift is measured against it
        cand = self._candidates(pos, counts, want, A, rule_needed=needed if prophet is not None else None)
        out, logits = self._run(x, pos, known, cand[0])
        if prophet is None:
            preds = Predictions(logits, cand[1], cand[2], cand[0], needed)
        else:  # the rule's candidates come first: it sees exactly what it would without +prophet
            R = min(A, rule.max_needed)
            ok = cand[2][:, :R] & needed.gather(1, cand[1][:, :R])
            preds = Predictions(logits[:, :R], cand[1][:, :R], ok, cand[0][:, :R], needed)
        new_x = rule.commit(i, x, preds, pos, seq)
        if prophet is not None:
            new_x = self._prophet_exit(i, x, new_x, Predictions(logits, cand[1], cand[2], cand[0], want), running)
        if plan.early is not None:
            new_x = _early_commit(plan.early, new_x, preds, seq["answer"], mask_id, self)
        committed = (new_x != mask_id) & mask_index
        seq["decoded_at"] = torch.where(committed, i, seq["decoded_at"])
        seq["computed_at"] = torch.where(active, i, seq["computed_at"])
        if plan.cache.observes_drift:
            B, L = x.shape
            drift = torch.zeros(B, L, device=x.device).scatter(1, pos, out.kv_drift[:B].float())
            plan.cache.observe(seq, active, drift, known, committed)
        seq["x"] = new_x
        self._count(pos.shape[0] * (2 if self.cfg_scale > 0 else 1), A, x.shape[1], running)
        if self.prefix_store is not None:
            self.prefix_store.capture(self, i)

    def _plan_rows(self, i: int, needed: Tensor) -> tuple[Tensor, Tensor]:
        """The cache policy's (active, stable) rows; prefix rows served from a store are always stable."""
        rule, seq, shift = self.rule, self.seq, self.info.logits_shift
        L = needed.shape[1]
        state = DecodeState(i, rule.block_step(i), rows_of(needed, shift), rule.quota(i, needed, seq), seq["valid"],
                            seq["am"], seq["decoded_at"], seq["computed_at"], needed,
                            rule.block(i) or (self.answer_start, L), shift, seq.get("rule.scores"), seq,
                            rule.scope(i, seq))
        active, stable = self.plan.cache.plan(state)
        return active & ~seq["frozen"], stable | seq["frozen"]

    def _run(self, x: Tensor, pos: Tensor, known: Tensor, rows: Tensor) -> tuple[StepOutputs, Tensor]:
        """The backend's step over the active rows `pos` (and the unconditional copy under CFG); returns its
        outputs and the logits of the candidate rows `rows` (CFG-combined)."""
        seq, info = self.seq, self.info
        am = seq["am"]
        if self.cfg_scale > 0:
            uncond = torch.where(seq["prompt_index"], torch.full_like(x, info.mask_token_id), x)
            x, am = torch.cat([x, uncond]), torch.cat([am, am])
            pos, known, rows = torch.cat([pos, pos]), torch.cat([known, known]), torch.cat([rows, rows])
        selects = self.backend.selects_logit_rows
        out: StepOutputs = self.backend.step(StepInputs(
            x.gather(1, pos), pos, self.cache.keys, self.cache.values, known, am,
            logit_rows=rows if selects else None, need_drift=self.plan.cache.observes_drift,
            attention=self.rule.attention,
            deep=self.prefix_store.deep(self, self.i) if self.prefix_store is not None else None))
        self.cache.update(out.present_keys, out.present_values)
        B = seq.batch
        seq["valid"] = out.present_valid[:B]
        logits = out.logits
        if self.cfg_scale > 0:
            cond, uncond = logits.chunk(2)
            logits = uncond + (self.cfg_scale + 1) * (cond - uncond)
        if not selects:
            logits = logits.gather(1, rows[:B][..., None].expand(-1, -1, logits.shape[-1]))
        return out, logits

    def _count(self, rows_in: int, A: int, L: int, running: Tensor) -> None:
        st = self.stats
        n_rows = rows_in * A
        st.steps += 1
        st.forward_passes += 1
        self._seq_fwd += running.sum()
        st.rows_computed += n_rows
        st.rows_full += rows_in * L
        st.per_step_rows.append(n_rows)
        self.i += 1

    def keep(self, rows: list[int]) -> None:
        """Go on with these sequences only, in this order: a server drops the ones it has answered or whose
        client has gone, so that later steps compute nothing for them. Every per-sequence tensor (the session's,
        the rule's, the policy's: `self.seq`) and the cache are cut to `rows`; what the kept sequences compute
        does not change. Only for a cache the session owns (not a backend's shared buffer)."""
        B = self.seq.batch
        if sorted(set(rows)) != sorted(rows) or not rows or not all(0 <= r < B for r in rows):
            raise ValueError(f"keep() takes distinct rows of the batch of {B}, got {rows}")
        idx = torch.tensor(rows, dtype=torch.long, device=self.x.device)
        self.cache.keep(idx)
        self.seq.keep(idx)
        self.stats.batch = len(rows)

    def _prophet_exit(self, i: int, x: Tensor, new_x: Tensor, wide: Predictions, running: Tensor) -> Tensor:
        """Prophet's exit check (policies.Prophet) on this step's logits, before the rule's commit counts: a
        sequence whose mean top-2 logit gap over the span reaches the phase's threshold has every masked
        position of its canvas set to the step's argmax (a Gumbel draw at temperature > 0, as theirs) and ends.
        The mean is summed left to right in float64, as their Python loop over `.item()` values does."""
        seq, mask_id = self.seq, self.info.mask_token_id
        if not self.answer_span:
            return new_x
        logits = wide.logits.float()
        top2 = logits.topk(2, dim=-1).values
        gaps = wide.full(top2[..., 0] - top2[..., 1], float("nan"))[:, self.answer_span].double()
        total = gaps[:, 0]
        for j in range(1, gaps.shape[1]):
            total = total + gaps[:, j]
        mean = total / gaps.shape[1]
        exited = seq["prophet.exit"]
        fire = running & (exited < 0) & (mean >= self.plan.prophet.threshold(i + 1, self.prophet_steps))
        temperature = getattr(self.rule, "temperature", 0.0)  # LLaDA's; Dream's fill (ours) is the argmax
        pick = add_gumbel_noise(logits, temperature) if temperature and bool(fire.any()) else logits
        argmax = wide.full(pick.argmax(-1), mask_id)
        if self.prophet_trace is not None:  # what an exit at this step would give (bench/prophet_eval.py)
            self.prophet_trace.append((i + 1, mean.cpu(),
                                       torch.where(x == mask_id, argmax, x).cpu()))
        seq["prophet.exit"] = torch.where(fire, i + 1, exited)
        return torch.where(fire[:, None] & (x == mask_id), argmax, torch.where(fire[:, None], x, new_x))

    def _candidates(self, pos: Tensor, counts: Tensor, needed: Tensor, A: int, rule_needed: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """The candidate rows (index [B, R] into the active rows, predicted position, real or padding): active
        rows whose predicted position the rule wants, at most as many as it can want (`rule.max_needed`), in
        position order. Known before the step, so a backend can run the output head on these rows only. With
        `rule_needed` (+prophet: `needed` is wider than what the rule wants) every active row is a candidate,
        the rule's own first."""
        B, L = needed.shape
        shift = self.info.logits_shift
        pred_pos = pos + 1 if shift else pos  # Dream: row p predicts p + 1 (row 0's own position is never masked)
        in_canvas = pred_pos < L
        pp = pred_pos.clamp_max(L - 1)
        first = torch.arange(A, device=pos.device)[None] < counts[:, None]  # padding repeats the last row
        ok = in_canvas & first & needed.gather(1, pp)
        if rule_needed is None:
            R, key = min(A, self.rule.max_needed), (~ok).to(torch.int8)
        else:
            R, key = A, (~ok).to(torch.int8) + (~(ok & rule_needed.gather(1, pp))).to(torch.int8)
        cand = torch.sort(key, dim=1, stable=True).indices[:, :R]
        return cand, pp.gather(1, cand), ok.gather(1, cand)

    def finish(self) -> GenerationStats:
        self.stats.seq_forward_passes = int(self._seq_fwd)
        self.stats.early_committed = int(self._early)
        if "prophet.exit" in self.seq:
            self.stats.exit_steps = [int(s) if s > 0 else None for s in self.seq["prophet.exit"].tolist()]
        return self.stats


def drive(session: DecodeSession, on_step: Callable[[int, int], None] | None = None
          ) -> tuple[Tensor, GenerationStats]:
    """Step `session` until it is done; returns (canvas, stats)."""
    t0 = time.perf_counter()
    while not session.done:
        i = session.i
        session.step()
        if on_step is not None and session.i > i:
            on_step(session.i, max(session.i, session.rule.num_steps(session.seq)))
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
