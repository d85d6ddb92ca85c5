"""Decode policies: which rows each step recomputes (cache policies), how many tokens a step may commit
(confidence-threshold parallel decoding) and when to commit everything at once (early commit).

A cache policy only chooses the active rows and the stable mask of the step contract, from a `DecodeState`
the loop keeps; it never sees K/V, logits or the backend, so every policy runs on every backend and with
every unmasking rule. A row's K/V are *current* when it was
recomputed after its input token was decoded (`computed_at > decoded_at`); rows whose logits the rule
needs are always computed, except by Greedy, which computes only a window of them.

Spelling, shared by the CLI, the eval harness and the Python API: a cache policy with options, then any
modifiers, joined by '+':  `decode:cache_steps=4+parallel:threshold=0.9+early`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

NEVER = 1 << 30  # decoded_at of a row whose input is still masked


@dataclass
class DecodeState:
    """What the loop knows before step `i`; every tensor is [B, L] over canvas rows."""

    i: int
    needed_rows: Tensor  # rows whose logits the rule wants this step
    must_rows: Tensor  # needed rows whose logits the rule cannot do without this step
    quota: Tensor  # [B] tokens the rule expects to commit this step
    valid: Tensor  # rows whose K/V in the cache are valid (present_valid of the last step)
    attention_mask: Tensor
    decoded_at: Tensor  # step whose commit decoded the row's input token; -1 prompt; NEVER still masked
    computed_at: Tensor  # last step the row was recomputed; -1 never
    confidence: Tensor  # per position: last known top-1 probability; -inf where never predicted
    masked: Tensor  # positions still masked that the rule wants predictions for
    block: tuple[int, int]  # [start, end) canvas positions of the rule's current block
    shift: bool  # Dream's logits shift: row p-1 predicts position p


class NoCache:
    """Every row is recomputed at every step: the reference behaviour and the baseline of every policy."""

    name = "none"

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        return torch.ones_like(s.valid), torch.zeros_like(s.valid)


def _refresh(s: DecodeState) -> tuple[Tensor, Tensor]:
    """Recompute every attended row (padding rows are never attended, so never computed)."""
    return s.attention_mask.clone(), torch.zeros_like(s.valid)


def _finish(s: DecodeState, stable: Tensor, forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Forced rows (default: the needed ones) and rows without valid K/V are computed; padding rows never
    are (nobody attends to them)."""
    forced = s.needed_rows if forced is None else forced
    stable = stable & s.valid & ~forced & s.attention_mask
    active = ~stable & s.attention_mask
    return active, stable


@dataclass
class DKVDecode:
    """dKV-Cache-Decode (arXiv 2505.15781): a row is cached one step after its token is decoded, i.e. once
    its K/V were recomputed with that token and its logits are no longer needed (for Dream the row p-1
    that predicts position p stays active until p is decoded); prompt rows are cached after the first
    step (Dream's last prompt row once the first answer token is decoded); every
    `cache_steps` steps all rows are recomputed (refresh). Near lossless."""

    cache_steps: int = 4
    name: str = field(default="decode", init=False)

    def __post_init__(self):
        if self.cache_steps < 1:
            raise ValueError(f"decode: cache_steps must be >= 1, got {self.cache_steps}")

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.i % self.cache_steps == 0:
            return _refresh(s)
        return _finish(s, s.computed_at > s.decoded_at)


@dataclass
class DKVGreedy:
    """dKV-Cache-Greedy: a row is cached as soon as it is final (`delay=0`: its K/V are the ones computed
    while it was still masked; `delay=1` recomputes it once, as Decode does), and of the masked rows only a
    window is recomputed: the positions expected to be decoded next (highest last-known confidence, as many
    as the rule will commit) and the `window` nearest masked positions around each, alternately left and
    right as in the reference implementation. Refresh every `cache_steps` steps. Faster, lossy."""

    cache_steps: int = 2
    window: int = 4
    delay: int = 0
    name: str = field(default="greedy", init=False)

    def __post_init__(self):
        if self.cache_steps < 1 or self.window < 0 or self.delay not in (0, 1):
            raise ValueError("greedy: need cache_steps >= 1, window >= 0, delay 0 or 1; got "
                             f"{self.cache_steps}, {self.window}, {self.delay}")

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.i % self.cache_steps == 0:
            return _refresh(s)
        pos = window_positions(s.masked, s.confidence, s.quota, self.window)
        compute = s.must_rows | rows_of(pos, s.shift)
        if self.delay == 0:  # every row is cached: decoded ones at once, masked ones outside the window
            return _finish(s, torch.ones_like(compute), forced=compute)
        current = (s.computed_at > s.decoded_at) | (s.decoded_at >= NEVER)
        return _finish(s, current, forced=compute)


@dataclass
class BlockCache:
    """Fast-dLLM block caching for block-wise decoding: when a block starts every row is recomputed; for
    the rest of the block the rows before it (prefix) and, with `dual`, after it are stable. With a
    single block (Dream's `diffusion_generate`) this caches the prompt after the first step."""

    dual: bool = False
    name: str = field(default="block", init=False)

    def __post_init__(self):
        self.name = "dual" if self.dual else "block"
        self._block: tuple[int, int] | None = None

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if s.block != self._block or s.i == 0:
            self._block = s.block
            return _refresh(s)
        start, end = s.block
        if s.shift:
            start, end = start - 1, end - 1
        rows = torch.arange(s.valid.shape[1], device=s.valid.device)
        outside = (rows < start) | ((rows >= end) if self.dual else torch.zeros_like(rows, dtype=torch.bool))
        return _finish(s, outside.expand_as(s.valid))


@dataclass
class AdaptiveCache:
    """Beyond the paper: a row becomes stable when its keys moved less than `tol` (relative, the step's
    `kv_drift` output) between its last two computations, instead of after a fixed delay; it leaves the
    cache when its input token changes, and the refresh every `cache_steps` steps re-measures every row,
    so rows whose drift exceeds `tol` are recomputed again."""

    tol: float = 0.02
    cache_steps: int = 8
    name: str = field(default="adaptive", init=False)

    def __post_init__(self):
        if self.tol < 0 or self.cache_steps < 1:
            raise ValueError(f"adaptive: need tol >= 0 and cache_steps >= 1, got {self.tol}, {self.cache_steps}")
        self._calm: Tensor | None = None

    def plan(self, s: DecodeState) -> tuple[Tensor, Tensor]:
        if self._calm is None or s.i == 0 or self._calm.shape != s.valid.shape:
            self._calm = torch.zeros_like(s.valid)
        if s.i % self.cache_steps == 0:
            return _refresh(s)
        return _finish(s, self._calm)

    def observe(self, active: Tensor, drift: Tensor, measured: Tensor, changed: Tensor) -> None:
        """After a step: `drift` [B, L] of the active rows, `measured` where they had a valid past,
        `changed` rows whose input token was committed by this step."""
        calm = self._calm.clone()
        calm[active] = measured[active] & (drift[active] < self.tol)
        calm[changed] = False
        self._calm = calm


def window_positions(masked: Tensor, confidence: Tensor, quota: Tensor, window: int) -> Tensor:
    """[B, L] positions: per sequence the `quota` masked positions of highest last-known confidence, plus
    the `window` masked positions nearest to each (alternating left, right)."""
    out = torch.zeros_like(masked)
    for b in range(masked.shape[0]):
        cand = masked[b].nonzero().flatten()
        if cand.numel() == 0:
            continue
        q = max(1, min(int(quota[b]), cand.numel()))
        top = cand[torch.topk(confidence[b, cand].float(), q).indices]
        out[b, top] = True
        if window:
            order = cand.tolist()
            for p in top.tolist():
                k = order.index(p)
                left, right, taken, go_left = k - 1, k + 1, 0, True
                while taken < window and (left >= 0 or right < len(order)):
                    j = left if go_left else right
                    if 0 <= j < len(order) and not out[b, order[j]]:
                        out[b, order[j]] = True
                        taken += 1
                    if go_left:
                        left -= 1
                    else:
                        right += 1
                    go_left = not go_left
    return out


def rows_of(positions: Tensor, shift: bool) -> Tensor:
    """Rows whose logits predict the given positions (Dream: row p-1; row 0 predicts itself)."""
    if not shift:
        return positions
    rows = torch.zeros_like(positions)
    rows[:, :-1] = positions[:, 1:]
    rows[:, 0] |= positions[:, 0]
    return rows


def positions_of(rows: Tensor, shift: bool) -> Tensor:
    """Positions predicted by the given rows (inverse of `rows_of`)."""
    if not shift:
        return rows
    pos = torch.zeros_like(rows)
    pos[:, 1:] = rows[:, :-1]
    pos[:, 0] = rows[:, 0]
    return pos


@dataclass
class Parallel:
    """Confidence-threshold parallel decoding (Fast-dLLM): commit every computed masked token whose
    confidence is at least `threshold`, and at least the most confident one per step."""

    threshold: float = 0.9

    def __post_init__(self):
        if not 0 < self.threshold <= 1:
            raise ValueError(f"parallel: threshold must be in (0, 1], got {self.threshold}")


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
            self.gaps = tuple(float(v) for v in self.gaps.split("/"))
        if len(self.gaps) != 3 or not all(0 < g <= 1 for g in self.gaps):
            raise ValueError(f"early: gaps must be three values in (0, 1] like 0.9/0.75/0.6, got {self.gaps}")

    def threshold(self, progress: float) -> float:
        return self.gaps[0] if progress < 1 / 3 else self.gaps[1] if progress < 2 / 3 else self.gaps[2]

    def thresholds(self, progress: Tensor) -> Tensor:
        """`threshold` for a batch of progress values, without leaving the device."""
        g = torch.tensor(self.gaps, device=progress.device, dtype=torch.float)
        return g[(progress >= 1 / 3).long() + (progress >= 2 / 3).long()]


CACHE_POLICIES: dict[str, type] = {"none": NoCache, "decode": DKVDecode, "greedy": DKVGreedy,
                                   "block": BlockCache, "dual": BlockCache, "adaptive": AdaptiveCache}
MODIFIERS: dict[str, type] = {"parallel": Parallel, "early": EarlyCommit}


@dataclass
class DecodePlan:
    """One parsed `--policy`: a cache policy plus optional parallel decoding and early commit."""

    cache: object
    parallel: Parallel | None = None
    early: EarlyCommit | None = None
    spec: str = "none"


def parse_policy(spec) -> DecodePlan:
    """'decode:cache_steps=4+parallel:threshold=0.9+early:gaps=0.9/0.8/0.7' -> DecodePlan; a DecodePlan or
    a cache policy object (anything with `plan(state)`) is accepted as is."""
    if isinstance(spec, DecodePlan):
        return spec
    if hasattr(spec, "plan"):  # a cache policy object
        return DecodePlan(spec, spec=getattr(spec, "name", type(spec).__name__))
    spec = (spec or "none").strip()
    parts = [p.strip() for p in spec.split("+")]
    name, kwargs = _component(parts[0])
    if name not in CACHE_POLICIES:
        hint = " (parallel and early are modifiers: none+parallel)" if name in MODIFIERS else ""
        raise ValueError(f"unknown cache policy '{name}'{hint}; available: {', '.join(CACHE_POLICIES)}")
    if name == "dual":
        kwargs["dual"] = True
    plan = DecodePlan(_make(name, CACHE_POLICIES[name], kwargs), spec=spec)
    for part in parts[1:]:
        mod, kw = _component(part)
        if mod not in MODIFIERS:
            raise ValueError(f"unknown modifier '{mod}' in policy '{spec}'; available: {', '.join(MODIFIERS)}")
        setattr(plan, mod, _make(mod, MODIFIERS[mod], kw))
    return plan


def _component(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"policy option '{item}' must look like key=value")
        kwargs[key.strip().replace("-", "_")] = _value(val.strip())
    return name.strip(), kwargs


def _make(name: str, cls: type, kwargs: dict):
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for '{name}': {e}") from None


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
