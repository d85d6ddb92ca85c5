"""Decode policies: which rows each step recomputes (cache policies), how many tokens a step may commit
(confidence-threshold parallel decoding) and when to commit everything at once (early commit).

A cache policy only chooses the active rows and the stable mask of the step contract from a `DecodeState`
the loop keeps; it never sees K/V, logits or the backend, so every policy runs on every backend and with
every unmasking rule. A stable row is read from the cache, which always holds the K/V of the row's last
computation. Policies are stateless: what one generation must remember between steps lives in
`DecodeState.memory`, so one policy object serves any number of concurrent generations.

The published policies reproduce their authors' code row for row (tests/test_upstream_fixtures.py):
dKV-Cache's Decode, Greedy, Prefill and PD (horseee/dKV-Cache) and Fast-dLLM's prefix and dual caches
(NVlabs/Fast-dLLM). `adaptive` and `delayed` are ours.

Spelling, shared by the CLI, the eval harness and the Python API: a cache policy with options, then any
modifiers, joined by '+':  `decode:cache_steps=4,shift=un+early`, `dual+parallel:threshold=0.9`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Protocol

import torch
from torch import Tensor

from dlmtrt.errors import UsageError


class PolicyError(UsageError):
    """A policy spec or combination that is refused; the field is always the policy."""

    def __init__(self, message: str):
        super().__init__(message, field="policy")

NEVER = 1 << 30  # decoded_at of a row whose input is still masked


@dataclass
class DecodeState:
    """What the loop knows before step `i`; every tensor is [B, L] over canvas rows."""

    i: int
    block_step: int  # steps since the rule's current block started
    needed_rows: Tensor  # rows whose logits the rule wants this step
    quota: Tensor  # [B] tokens the rule expects to commit this step
    valid: Tensor  # rows whose K/V in the cache are valid (present_valid of the last step)
    attention_mask: Tensor
    decoded_at: Tensor  # step whose commit decoded the row's input token; -1 prompt; NEVER still masked
    computed_at: Tensor  # last step the row was recomputed; -1 never
    masked: Tensor  # positions still masked that the rule wants predictions for
    block: tuple[int, int]  # [start, end) canvas positions of the rule's current block
    shift: bool  # Dream's logits shift: row p-1 predicts position p
    order: Tensor | None = None  # scores the rule commits by, when it drew them ahead (LLaDA random, order='block')
    memory: dict = field(default_factory=dict)  # per-sequence state (the session's SequenceState), kept across steps
    scope: Tensor | None = None  # rows the rule's schedule computes itself (block-causal families), else None


class CachePolicy(Protocol):
    """Chooses (active, stable) rows for a step. Everything the decode loop reads is declared here; `Policy`
    gives the defaults."""

    name: str
    skips_needed_rows: bool  # may leave rows whose logits the rule wants uncomputed (they get -inf logits)
    needs_blocks: bool  # defined over a block schedule (Fast-dLLM's prefix and dual caches)
    observes_drift: bool  # `observe` reads each step's kv_drift (the backend must compute it)
    order: str  # LLaDA random remasking: 'step' draws per step, 'block' once per block (dKV-Cache-Greedy)

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]: ...

    def requires(self, family, remasking: str | None, parallel: float | None) -> None:
        """Refuse a schedule the policy's definition does not cover (UsageError)."""

    def observe(self, memory: dict, active: Tensor, drift: Tensor, known: Tensor, committed: Tensor) -> None:
        """See a step's rows and kv_drift (policies with `observes_drift`)."""


class Policy:
    """Defaults of the `CachePolicy` protocol: covers every family, skips no needed row, reads no drift."""

    skips_needed_rows = False
    observes_drift = False
    order = "step"
    needs_blocks = False  # defined over a block schedule (Fast-dLLM's caches): Dream then decodes in blocks

    def requires(self, family, remasking: str | None, parallel: float | None) -> None:
        pass

    def observe(self, memory: dict, active: Tensor, drift: Tensor, known: Tensor, committed: Tensor) -> None:
        pass


def _all(s: DecodeState) -> tuple[Tensor, Tensor]:
    """Recompute every row: the refresh of every cached policy, as upstream does (padding rows included)."""
    return torch.ones_like(s.valid), torch.zeros_like(s.valid)


def _finish(s: DecodeState, stable: Tensor, forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forced rows (default: the rows whose logits the rule wants) and rows without valid K/V are computed;
    everything else in `stable` is read from the cache."""
    forced = s.needed_rows if forced is None else forced
    stable = stable & s.valid & ~forced
    return ~stable, stable


def _exact(s: DecodeState, stable: Tensor) -> tuple[Tensor, Tensor]:
    """The published row sets as they are: nothing is forced (a rule gets -inf logits for a needed position
    whose row stayed cached, as upstream does)."""
    stable = stable & s.valid
    return ~stable, stable


@dataclass
class AppendCache(Policy):
    """The block-causal families' cache (SDAR, the authors' DynamicCache): each step computes the rows the
    schedule names (the prompt's whole blocks once, then the current block) and reads every earlier row from
    the cache; a committed block is stored once, from its final tokens, and never recomputed. Exact: under
    block-causal attention no row attends a later block. `store=fused` (the default) stores a finished block in
    the next block's first pass, with the same logits and tokens; `store=separate` in a pass of its own, as the
    authors' code does."""

    name: str = field(default="append", init=False)
    store: str = "fused"

    def __post_init__(self):
        if self.store not in ("fused", "separate"):
            raise PolicyError(f"append: store must be fused or separate, got {self.store!r}")

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.scope is None:
            raise PolicyError("append: this schedule names no rows of its own; the policy is for block-causal "
                              "families (SDAR)")
        return s.scope, s.valid & ~s.scope

    def requires(self, family, remasking: str | None, parallel: float | None) -> None:
        if not family.block_causal:
            raise PolicyError(f"append: an append-only cache is exact only for block-causal families; {family.title} "
                              "attends bidirectionally (use decode, block or dual)")


@dataclass
class NoCache(Policy):
    """Every row is recomputed at every step: the reference behaviour and the baseline of every policy."""

    name: str = field(default="none", init=False)

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        return _all(s)


SHIFTS = ("un", "right", "un_right")


def dream_cached_rows(decoded_at: Tensor, j: int, shift: str) -> Tensor:
    """The rows dKV-Cache on Dream stores during step j+1 (its `cache_position` after step j's commit).
    j = -1 is the prompt-only canvas, where every shift type uses the prompt mask moved left by one.
    `un`: row p once token p+1 is decoded (row p's logits, which predict p+1, are no longer needed), the last
    row taking token 0's state; `right`: row p once token p is decoded; `un_right`: both p and p+1."""
    done = decoded_at <= j
    if j < 0:
        return torch.cat([done[:, 1:], done[:, -1:]], 1)
    if shift == "un":
        return torch.cat([done[:, 1:], done[:, :1]], 1)
    if shift == "right":
        return done
    both = done[:, :-1] & done[:, 1:]
    return torch.cat([both, both[:, -1:]], 1)


def _check_shift(name: str, shift: str) -> None:
    if shift not in SHIFTS:
        raise PolicyError(f"{name}: shift must be one of {', '.join(SHIFTS)}, got '{shift}'")


@dataclass
class DKVDecode(Policy):
    """dKV-Cache-Decode (arXiv 2505.15781), as its authors' code does it.

    Dream: rows are cached one step after the tokens that make them final are decoded (`shift`, see
    `dream_cached_rows`): what the cache holds at step i is what step i-1 stored, i.e. the rows final after
    step i-2; every `cache_steps` steps (counted from the first) the cache is emptied and every row computed.
    LLaDA: the cache is reset at every block; the first two steps of a block and every `cache_steps`-th step
    of it compute every row, the others reuse the rows decoded two steps before. Near lossless."""

    cache_steps: int = 4
    shift: str = "un"
    name: str = field(default="decode", init=False)

    def __post_init__(self):
        _check_steps(self.name, self.cache_steps)
        _check_shift(self.name, self.shift)

    @property
    def skips_needed_rows(self) -> bool:
        """`right` caches rows whose logits a masked position still needs (upstream then fills -inf)."""
        return self.shift == "right"

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if not s.shift:
            if s.block_step <= 1 or s.block_step % self.cache_steps == 0:
                return _all(s)
            return _exact(s, s.decoded_at <= s.i - 2)
        if s.i % self.cache_steps == 0:
            return _all(s)
        return _exact(s, dream_cached_rows(s.decoded_at, s.i - 2, self.shift))

    def requires(self, family, remasking: str | None, parallel: float | None) -> None:
        if not family.logits_shift and self.shift != "un":
            raise PolicyError("decode: shift applies to Dream (its logits shift); LLaDA's Decode has no shift option")


@dataclass
class DKVPrefill(Policy):
    """dKV-Cache-Prefill (Dream): the prompt rows (the prompt mask moved left by one, as in Decode) are
    computed once at the first step and read from the cache for the rest of the generation."""

    name: str = field(default="prefill", init=False)

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.i == 0:
            return _all(s)
        return _exact(s, dream_cached_rows(s.decoded_at, -1, "un"))

    def requires(self, family, remasking: str | None, parallel: float | None) -> None:
        _published_for(self.name, family)


@dataclass
class DKVPD(DKVDecode):
    """dKV-Cache-PD (Dream): Prefill and Decode together: the prompt rows are cached after the first step and
    never recomputed; decoded rows are cached as in Decode, and the periodic refresh recomputes every row
    except the prompt's."""

    name: str = field(default="pd", init=False)

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.i == 0:
            return _all(s)
        j = -1 if s.i % self.cache_steps == 0 else s.i - 2
        return _exact(s, dream_cached_rows(s.decoded_at, j, self.shift))

    def requires(self, family, remasking: str | None, parallel: float | None) -> None:
        _published_for(self.name, family)


@dataclass
class DKVGreedy(Policy):
    """dKV-Cache-Greedy (LLaDA with random remasking), as its authors' code does it: the order in which a
    block is decoded is drawn when the block starts, so each step knows the tokens the next step decodes.
    A step computes only the tokens it decodes, the tokens decoded by the step before (once more, with
    their token) and up to `window` still-masked positions nearest each token decoded next (alternately
    left and right); every other row is read from the cache. Every `cache_steps`-th step of a block
    computes every row. Faster than Decode, lossy."""

    cache_steps: int = 2
    window: int = 4
    name: str = field(default="greedy", init=False)
    order = "block"  # the rule must draw its decoding order when a block starts

    def __post_init__(self):
        _check_steps(self.name, self.cache_steps)
        if not isinstance(self.window, int) or self.window < 0:
            raise PolicyError(f"greedy: window must be an integer >= 0, got {self.window!r}")

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.block_step % self.cache_steps == 0:
            return _all(s)
        compute = s.decoded_at == s.i - 1
        was_masked = s.decoded_at >= s.i - 1
        for b in range(s.valid.shape[0]):
            q = int(s.quota[b])
            if q <= 0:
                continue
            scores = torch.where(s.masked[b], s.order[b], torch.full_like(s.order[b], -torch.inf))
            nxt = torch.topk(scores, q).indices
            nxt = nxt[scores[nxt] > -torch.inf]
            compute[b, nxt] = True
            if self.window:
                window_tokens(compute[b], nxt.tolist(), was_masked[b], self.window)
        return _exact(s, ~compute)

    def requires(self, family, remasking: str | None, parallel: float | None) -> None:
        if self.name not in family.published_policies or remasking != "random":
            raise PolicyError("greedy: dKV-Cache-Greedy is defined for LLaDA with --remasking random (it decodes "
                             "each block in an order drawn when the block starts); for Dream, or with "
                             "low_confidence, use decode")
        if parallel is not None:
            raise PolicyError("greedy decodes a fixed number of tokens per step in a drawn order; it does not "
                             "combine with +parallel")


def window_tokens(chosen: Tensor, centres: list[int], masked: Tensor, window: int) -> None:
    """Mark, for each centre in order, up to `window` masked positions not yet chosen, searching outwards and
    alternating left and right (dKV-Cache's `find_window_tokens`, including where its search stops)."""
    n = chosen.shape[0]
    m = masked.tolist()
    for c in centres:
        left, right, cnt, go_left = c - 1, c + 1, 0, True
        while cnt < window:
            if go_left:
                if left >= 0 and not chosen[left] and m[left]:
                    chosen[left] = True
                    cnt += 1
                left -= 1
            else:
                if right < n and not chosen[right] and m[right]:
                    chosen[right] = True
                    cnt += 1
                right += 1
            go_left = not go_left
            if left < 0 and right > n:
                break


@dataclass
class BlockCache(Policy):
    """Fast-dLLM's prefix cache (`block`) and dual cache (`dual`): at the first step of each block every row
    is recomputed; for the rest of the block the rows before it (`dual`: and after it) are read from the
    cache. With Dream's own schedule (no block_length) the answer is one block, so this caches the prompt."""

    dual: bool = False
    name: str = field(default="block", init=False)
    needs_blocks = True

    def __post_init__(self):
        self.name = "dual" if self.dual else "block"

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.block_step == 0:
            return _all(s)
        start, end = s.block
        rows = torch.arange(s.valid.shape[1], device=s.valid.device)
        outside = (rows < start) | ((rows >= end) if self.dual else torch.zeros_like(rows, dtype=torch.bool))
        return _finish(s, outside.expand_as(s.valid))


@dataclass
class DelayedCache(Policy):
    """Ours (this project's first reading of dKV-Cache-Decode, kept for comparison): a row is cached once it
    was recomputed after its own token was decoded and its logits are no longer needed (Dream: the row p-1
    that predicts p stays active until p is decoded); every `cache_steps` steps every row is recomputed."""

    cache_steps: int = 4
    name: str = field(default="delayed", init=False)

    def __post_init__(self):
        _check_steps(self.name, self.cache_steps)

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.i % self.cache_steps == 0:
            return _all(s)
        return _finish(s, s.computed_at > s.decoded_at)


@dataclass
class AdaptiveCache(Policy):
    """Ours, beyond the papers: a row becomes stable when its keys moved less than `tol` (relative, the
    step's `kv_drift` output) between its last two computations, instead of after a fixed delay; it leaves
    the cache when its input token changes, and the refresh every `cache_steps` steps re-measures every
    row, so rows whose drift exceeds `tol` are recomputed again."""

    tol: float = 0.02
    cache_steps: int = 8
    name: str = field(default="adaptive", init=False)
    observes_drift = True

    def __post_init__(self):
        if not isinstance(self.tol, (int, float)) or self.tol < 0:
            raise PolicyError(f"adaptive: tol must be a number >= 0, got {self.tol!r}")
        _check_steps(self.name, self.cache_steps)

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        calm = s.memory.get("calm")
        if calm is None or s.i == 0 or calm.shape != s.valid.shape:
            s.memory["calm"] = torch.zeros_like(s.valid)
        if s.i % self.cache_steps == 0:
            return _all(s)
        return _finish(s, s.memory["calm"])

    def observe(self, memory: dict, active: Tensor, drift: Tensor, measured: Tensor, changed: Tensor) -> None:
        """After a step: `drift` [B, L] of the active rows, `measured` where they had a valid past,
        `changed` rows whose input token was committed by this step."""
        calm = memory["calm"].clone()
        calm[active] = measured[active] & (drift[active] < self.tol)
        calm[changed] = False
        memory["calm"] = calm


def _check_steps(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PolicyError(f"{name}: cache_steps must be an integer >= 1, got {value!r}")


def _published_for(name: str, family) -> None:
    """A published policy runs only on the families its authors defined it for (their `published_policies`)."""
    if name not in family.published_policies:
        from .families import FAMILIES
        defined = [f.title for f in FAMILIES.values() if name in f.published_policies]
        raise PolicyError(f"{name}: its authors' code defines it for {', '.join(defined)} only; for {family.title} "
                         f"use {', '.join(sorted(family.published_policies)) or 'none'} (or our adaptive, delayed)")


def rows_of(positions: Tensor, shift: bool) -> Tensor:
    """Rows whose logits predict the given positions (Dream: row p-1; row 0 predicts itself)."""
    if not shift:
        return positions
    rows = torch.zeros_like(positions)
    rows[:, :-1] = positions[:, 1:]
    rows[:, 0] |= positions[:, 0]
    return rows


@dataclass
class Parallel:
    """Fast-dLLM's confidence-threshold parallel decoding: commit every computed masked token whose
    confidence is at least `threshold`, and at least the most confident one per step (each schedule applies
    it in the form its authors wrote for it: runtime/unmasking.py)."""

    threshold: float = 0.9

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not 0 < self.threshold <= 1:
            raise PolicyError(f"parallel: threshold must be in (0, 1], got {self.threshold!r}")


@dataclass
class EarlyCommit:
    """Prophet-style early commit: when, for every still-masked position of the rule's current scope (the
    whole answer for Dream, the current block for LLaDA), the top-1 minus top-2 probability is at least
    the threshold, all of them are committed at once (argmax) and that scope ends. The threshold loosens
    as decoding progresses: `gaps[0]` while under a third of the answer is decoded, `gaps[1]` up to two
    thirds, `gaps[2]` after, because late positions have more context and their argmax rarely changes.
    The defaults are strict because the tiny task models are over-confident: with 0.9/0.75/0.6 Dream's
    sudoku accuracy fell from 1.0 to 0.83 (bench/results/early-gaps-dream-cpu.json)."""

    gaps: tuple[float, float, float] = (0.999, 0.995, 0.99)

    def __post_init__(self):
        if isinstance(self.gaps, str):
            try:
                self.gaps = tuple(float(v) for v in self.gaps.split("/"))
            except ValueError:
                raise PolicyError(f"early: gaps must be three numbers like 0.9/0.75/0.6, got '{self.gaps}'") from None
        if isinstance(self.gaps, (int, float)):
            self.gaps = (float(self.gaps),) * 3
        if len(self.gaps) != 3 or not all(0 < g <= 1 for g in self.gaps):
            raise PolicyError(f"early: gaps must be three values in (0, 1] like 0.9/0.75/0.6, got {self.gaps}")

    def thresholds(self, progress: Tensor) -> Tensor:
        """`threshold` for a batch of progress values, without leaving the device."""
        g = torch.tensor(self.gaps, device=progress.device, dtype=torch.float)
        return g[(progress >= 1 / 3).long() + (progress >= 2 / 3).long()]


PROPHET_SPAN = 5  # answer positions whose gaps Prophet averages (their answer_length, hard-coded in generate())


@dataclass
class Prophet:
    """Prophet's early exit (arXiv 2508.19982; pixeli99/Prophet `generate_earlyexit.py`, token for token on its
    fixtures): at every step, the top-1 minus top-2 *logit* gap averaged over the five answer positions from
    `answer_start_pos` (inside the canvas); once it reaches the threshold of the step's phase, every masked
    position of the whole canvas takes the step's argmax and the sequence stops. The phase is the global step
    (1-based, counted across blocks) over the schedule's steps: below 0.33 `early`, below 0.67 `mid`, else `late`
    (their `early_exit_thresholds`). It needs this step's logits at the span and at every masked position, so it
    runs with the cache policy `none` only (a cache leaves those rows uncomputed)."""

    early: float = 7.5
    mid: float = 5.0
    late: float = 2.5

    def __post_init__(self):
        for k in ("early", "mid", "late"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise PolicyError(f"prophet: {k} must be a number (a logit gap, e.g. 7.5), got {v!r}")
            setattr(self, k, float(v))

    @classmethod
    def of(cls, thresholds: dict | None) -> "Prophet":
        """Their `early_exit_thresholds` dict (missing keys take their defaults, as their .get does)."""
        thresholds = dict(thresholds or {})
        unknown = sorted(set(thresholds) - {"early", "mid", "late"})
        if unknown:
            raise PolicyError(f"early_exit_thresholds takes early, mid and late, not {', '.join(map(str, unknown))}")
        return cls(**thresholds)

    def threshold(self, step: int, steps: int) -> float:
        """Their should_early_exit's phase threshold at 1-based global `step` of `steps`."""
        progress = step / steps
        return self.early if progress < 0.33 else self.mid if progress < 0.67 else self.late

    @property
    def spec(self) -> str:
        return f"prophet:early={self.early:g},mid={self.mid:g},late={self.late:g}"


CACHE_POLICIES: dict[str, type] = {"none": NoCache, "append": AppendCache, "decode": DKVDecode, "greedy": DKVGreedy,
                                   "prefill": DKVPrefill, "pd": DKVPD, "block": BlockCache, "dual": BlockCache,
                                   "adaptive": AdaptiveCache, "delayed": DelayedCache}
MODIFIERS: dict[str, type] = {"parallel": Parallel, "early": EarlyCommit, "prophet": Prophet}


@dataclass
class DecodePlan:
    """One parsed `--policy`: a cache policy plus optional parallel decoding and early commit."""

    cache: CachePolicy
    parallel: Parallel | None = None
    early: EarlyCommit | None = None
    spec: str = "none"
    prophet: Prophet | None = None

    def check(self, family, remasking: str | None = None) -> None:
        """Refuse a combination the policy's definition does not cover, before any work. `family`: a name or a
        runtime family (runtime/families/); LLaDA's `remasking` matters to Greedy."""
        if isinstance(family, str):
            from .families import get
            family = get(family)
        if family.block_causal and self.cache.name not in ("none", "append"):
            raise PolicyError(f"{self.cache.name}: {family.title} is block-causal, so its cache is exact already: use "
                              "append (its default) or none")
        for mod in ("parallel", "early", "prophet"):
            if getattr(self, mod) is not None and mod not in family.modifiers:
                raise PolicyError(f"+{mod} is not defined for {family.title} (its own remasking strategies decide how "
                                  "many tokens a step commits)")
        if self.prophet is not None:
            if self.cache.name != "none":
                raise PolicyError(f"+prophet runs with the cache policy none only: its exit check and whole-canvas "
                                  f"fill need this step's logits at the answer span and at every masked position, "
                                  f"which {self.cache.name} leaves uncomputed; use none+prophet")
            other = [m for m in ("parallel", "early") if getattr(self, m) is not None]
            if other:
                raise PolicyError(f"+prophet and +{other[0]} both decide when to stop committing one token at a "
                                  "time; Prophet's code has no such combination: use one of them")
        self.cache.requires(family, remasking, self.parallel.threshold if self.parallel is not None else None)

    def rule_options(self, blockwise: bool = False) -> dict:
        """What a rule built for this plan is told once, at construction: `exact_ties` (a policy leaves needed
        rows uncomputed, whose -inf/NaN ties upstream breaks with torch.topk), `scoped` (the append cache computes
        exactly the rule's scope), `fuse_store` (it stores a finished block in the next block's pass) and, for block-wise rules, `lockstep` (nothing can end
        a block before its steps are done)."""
        opts = {"exact_ties": self.cache.skips_needed_rows}
        if self.cache.name == "append":
            opts["scoped"] = True
            if self.cache.store == "fused":
                opts["fuse_store"] = True
        if blockwise:
            opts["lockstep"] = self.early is None and self.parallel is None  # Prophet ends a sequence, not a block
        return opts


def parse_policy(spec) -> DecodePlan:
    """'decode:cache_steps=4+parallel:threshold=0.9+early:gaps=0.9/0.8/0.7' -> DecodePlan; a DecodePlan is
    accepted as is, and a cache policy object (the `CachePolicy` protocol) becomes a plan of its own."""
    if isinstance(spec, DecodePlan):
        return spec
    if hasattr(spec, "plan"):
        missing = [a for a in ("name", "skips_needed_rows", "observes_drift", "order", "needs_blocks", "requires",
                               "observe") if not hasattr(spec, a)]
        if missing:
            raise PolicyError(f"cache policy {type(spec).__name__} lacks {', '.join(missing)} of the CachePolicy "
                             "protocol: subclass dlmtrt.runtime.policies.Policy for the defaults")
        return DecodePlan(spec, spec=spec.name)
    if spec is not None and not isinstance(spec, str):
        raise PolicyError(f"a policy is a string like 'decode:cache_steps=4+early', got {type(spec).__name__}")
    spec = (spec or "none").strip()
    parts = [p.strip() for p in spec.split("+")]
    name, kwargs = _component(parts[0])
    if name not in CACHE_POLICIES:
        hint = " (parallel, early and prophet are modifiers: none+parallel)" if name in MODIFIERS else ""
        raise PolicyError(f"unknown cache policy '{name}'{hint}; available: {', '.join(CACHE_POLICIES)}")
    if name == "dual":
        kwargs["dual"] = True
    plan = DecodePlan(_make(name, CACHE_POLICIES[name], kwargs), spec=spec)
    for part in parts[1:]:
        mod, kw = _component(part)
        if mod not in MODIFIERS:
            raise PolicyError(f"unknown modifier '{mod}' in policy '{spec}'; available: {', '.join(MODIFIERS)}")
        if getattr(plan, mod) is not None:
            raise PolicyError(f"modifier '{mod}' appears twice in policy '{spec}'")
        setattr(plan, mod, _make(mod, MODIFIERS[mod], kw))
    return plan


def _component(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise PolicyError(f"policy option '{item}' must look like key=value")
        kwargs[key.strip().replace("-", "_")] = _value(val.strip())
    return name.strip(), kwargs


def _make(name: str, cls: type, kwargs: dict):
    """Build a policy component, naming unknown options and the ones it takes (never a Python signature)."""
    allowed = [f.name for f in fields(cls) if f.init and f.name != "dual"]
    unknown = sorted(set(kwargs) - set(allowed) - {"dual"})
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes no options"
        raise PolicyError(f"'{name}' has no option {', '.join(unknown)}; {takes}")
    return cls(**kwargs)


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
