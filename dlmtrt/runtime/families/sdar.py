"""SDAR's generation (JetAstra/SDAR `generate.py`, `block_diffusion_generate`), token for token, over any backend.

What the authors' code does, and so what this does (tests/fixtures/upstream/sdar.json is their output):

- The canvas is the prompt and masks up to whole blocks of `block_length`, counted from the sequence's first
  token (the output is never cut back to `gen_length`). The prompt's whole blocks are prefilled in one pass
  with the block-causal mask and stored; the prompt's tail shares the first decoded block.
- Each block is denoised for up to `denoising_steps` steps: every step computes all of the block's rows over the
  cache, samples every row (temperature, then top-k, then top-p, `torch.multinomial`: one draw over the block's
  rows per step), and commits by `remasking_strategy`; `get_num_transfer_tokens` splits the *block length*, not
  the masks left, over the steps. When the block has no mask left, one more pass stores its K/V from its final
  tokens. After each stored block, generation stops if a stop id (`stopping_criteria_idx`) is in the answer.
- Upstream's own quirks are kept, because they decide the tokens: the confidence is the sampled token's
  probability under the filtered distribution; a step whose share exceeds the masks left commits over rows
  already decoded (prompt-tail rows included) with that step's samples; torch.topk breaks ties in its own order.
- Refused, because upstream fails on them: temperature 0 (it divides by zero; greedy upstream is top_k=1) and
  `entropy_bounded` (it fails at the first denoising step: `transfer_index` is never assigned, or
  `eb_threshold=None` cannot be a tensor).

Upstream runs one prompt at a time; here a batch runs each sequence on its own block schedule (left padding moves
no block boundary). Sampling draws from the one global random stream in sequence order, so a batch equals its
prompts run alone where the draws do not matter (top_k=1) and for a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmtrt.errors import UsageError

from ..params import Params, check_float, positive_int
from ..unmasking import Schedule
from . import Family, read_config

STRATEGIES = ("low_confidence_static", "low_confidence_dynamic", "sequential")
BROKEN_UPSTREAM = {"entropy_bounded": "SDAR's entropy_bounded fails in the authors' code before it commits anything "
                                      "(its transfer_index is never assigned, and eb_threshold=None is not a number)"}
PREFILL, DENOISE, STORE, DONE = 0, 1, 2, 3  # a sequence's phase


@dataclass
class SDARParams(Params):
    """`block_diffusion_generate`'s parameters and defaults."""

    gen_length: int = 128
    block_length: int = 8
    denoising_steps: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    remasking_strategy: str = "low_confidence_dynamic"
    confidence_threshold: float = 0.85
    eb_threshold: float | None = None
    stopping_criteria_idx: tuple[int, ...] | None = None

    def validate(self) -> "SDARParams":
        positive_int("gen_length", self.gen_length)
        positive_int("block_length", self.block_length)
        positive_int("denoising_steps", self.denoising_steps)
        if self.remasking_strategy in BROKEN_UPSTREAM:
            raise UsageError(f"{BROKEN_UPSTREAM[self.remasking_strategy]}; choose {', '.join(STRATEGIES)}",
                             field="remasking_strategy")
        if self.remasking_strategy not in STRATEGIES:
            raise UsageError(f"unknown remasking_strategy '{self.remasking_strategy}'; choose from "
                             f"{', '.join(STRATEGIES)}", field="remasking_strategy")
        check_float("temperature", self.temperature)
        if float(self.temperature) == 0:
            raise UsageError("temperature 0 divides SDAR's logits by zero (the authors' code fails on it); its greedy "
                             "decoding is top_k=1", field="temperature")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", field="top_k")
        if not 0 < float(self.top_p) <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        check_float("confidence_threshold", self.confidence_threshold)
        if self.stopping_criteria_idx is not None:
            self.stopping_criteria_idx = tuple(int(i) for i in self.stopping_criteria_idx)
        return self


class SDAR(Family):
    name = "sdar"
    title = "SDAR"
    params = SDARParams
    aliases = {"max_new_tokens": "gen_length", "steps": "denoising_steps", "remasking": "remasking_strategy"}
    schedule = "sdar blocks"
    blockwise_schedule = True
    block_causal = True
    default_policy = "append"
    published_policies = frozenset({"append"})
    modifiers = frozenset()
    surplus_steps = "steps beyond one per token of a block commit nothing (upstream's schedule is the same then)"

    def defaults(self, checkpoint_dir) -> dict:
        """What SDAR's `generate.py` runs with for a checkpoint: its generation_config's sampling (temperature 0.6,
        top-k 20, top-p 0.95 for the released models) and stop ids, the model's block size with as many steps."""
        gen = read_config(checkpoint_dir, "generation_config.json")
        cfg = read_config(checkpoint_dir)
        out = {k: gen[k] for k in ("temperature", "top_k", "top_p") if gen.get(k) is not None}
        if cfg.get("block_size"):
            out["block_length"] = out["denoising_steps"] = int(cfg["block_size"])
        stops = gen.get("eos_token_id", cfg.get("eos_token_id"))
        if stops is not None:
            out["stopping_criteria_idx"] = tuple(stops) if isinstance(stops, (list, tuple)) else (stops,)
        return out

    def budget(self, params: dict) -> tuple[int, int, str]:
        return params["denoising_steps"], params["block_length"], "tokens of a block"

    def draws_random(self, params: dict) -> bool:
        return params["top_k"] != 1  # it always draws, but only top_k=1 makes the draw irrelevant

    def schedule_name(self, params: dict) -> str:
        return f"sdar blocks of {params['block_length']}, {params['denoising_steps']} steps"

    def greedy(self, new_tokens: int, *, steps=None, blocks=None, block_length=None, remasking=None, alg=None,
               **own) -> dict:
        """top_k=1 (SDAR's greedy) with static low-confidence remasking, one token per step; blocks of
        `block_length` (default 4, as released)."""
        if own:
            raise UsageError(f"{', '.join(own)} does not apply to sdar models", field=next(iter(own)))
        block = block_length or (-(-new_tokens // blocks) if blocks else 4)
        return self.params(gen_length=new_tokens, block_length=block, denoising_steps=steps or block, top_k=1,
                           remasking_strategy=remasking or "low_confidence_static").validate().to_dict()

    def canvas_tokens(self, params: dict, prompt_lengths: Tensor, padded: int) -> int:
        """Masks after a left-padded prompt of `padded` columns so that every sequence's canvas reaches its own
        last whole block."""
        B = params["block_length"]
        ends = (padded - prompt_lengths) + -(-(prompt_lengths + params["gen_length"]) // B) * B
        return int(ends.max()) - padded

    def new_tokens(self, params: dict) -> int:
        return params["gen_length"]

    def rule(self, info, params: dict, prompt_length: int, plan):
        return SDARRule(info.mask_token_id, self.params(**params).validate(), **plan.rule_options())

    def session(self, backend, input_ids, attention_mask, params: dict, plan, prefix_store=None):
        from ..decode import DecodeSession
        from . import canvas
        am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        lengths = am.long().sum(1).cpu()
        x, am = canvas(input_ids, am, self.canvas_tokens(params, lengths, input_ids.shape[1]),
                       backend.info.mask_token_id)
        return DecodeSession(backend, x, am, self.rule(backend.info, params, input_ids.shape[1], plan), plan,
                             prefix_store=prefix_store)


@dataclass
class SDARRule(Schedule):
    """`block_diffusion_generate`'s schedule, one state machine per sequence (prefill, denoise, store, done)."""

    mask_token_id: int
    p: SDARParams
    exact_ties: bool = False

    def __post_init__(self):
        self.B = self.p.block_length
        self.attention = f"block_causal:{self.B}"
        n, s = self.B, self.p.denoising_steps
        self.transfer = [n // s + (1 if k < n % s else 0) for k in range(s)]  # get_num_transfer_tokens

    # ---- per-sequence state
    def start(self, seq) -> None:
        am = seq["am"].cpu()
        answer = seq["answer"].cpu()
        real = am & ~answer
        P = real.sum(1)  # prompt tokens
        pad = (~am).sum(1)  # left padding
        self.L = am.shape[1]
        seq["rule.prompt"], seq["rule.pad"] = P, pad
        seq["rule.blocks"] = -(-(P + self.p.gen_length) // self.B)
        seq["rule.blk"] = P // self.B  # the first block to decode: the one holding the prompt's tail
        seq["rule.step"] = torch.zeros_like(P)
        prefill = P // self.B * self.B
        served = torch.tensor([bool(seq["frozen"][b, int(pad[b]):int(pad[b] + prefill[b])].all())
                               for b in range(seq.batch)])  # every prompt block came from a prefix store
        seq["rule.phase"] = torch.where((prefill > 0) & ~served, PREFILL, DENOISE)
        self.max_steps = int((1 + seq["rule.blocks"] * (self.p.denoising_steps + 2)).max())

    def _rows(self, seq, b: int, lo_block: int, hi_block: int) -> slice:
        base = int(seq["rule.pad"][b])
        return slice(base + lo_block * self.B, base + hi_block * self.B)

    def scope(self, i: int, seq) -> Tensor:
        rows = torch.zeros(seq.batch, self.L, dtype=torch.bool)
        for b in range(seq.batch):
            phase, blk = int(seq["rule.phase"][b]), int(seq["rule.blk"][b])
            if phase == PREFILL:
                rows[b, self._rows(seq, b, 0, blk)] = True
            elif phase in (DENOISE, STORE):
                rows[b, self._rows(seq, b, blk, blk + 1)] = True
        return rows.to(seq["x"].device)

    def running(self, mask_index: Tensor, seq) -> Tensor:
        return (seq["rule.phase"] != DONE).to(mask_index.device)

    def num_steps(self, seq) -> int:
        return self.max_steps

    def block(self, i: int):
        return None

    def block_step(self, i: int) -> int:
        return i

    @property
    def max_needed(self) -> int:
        return self.B

    def needed(self, i: int, mask_index: Tensor, seq) -> Tensor:
        """Every row of the current block of the sequences that denoise this step; a block with no mask left is
        stored instead (upstream's check at the top of its step loop)."""
        needed = torch.zeros_like(mask_index)
        for b in range(seq.batch):
            if int(seq["rule.phase"][b]) != DENOISE:
                continue
            rows = self._rows(seq, b, int(seq["rule.blk"][b]), int(seq["rule.blk"][b]) + 1)
            if not bool(mask_index[b, rows].any()):
                seq["rule.phase"][b] = STORE
                continue
            if int(seq["rule.step"][b]) >= self.p.denoising_steps:
                raise UsageError("a block still has masks after its denoising steps (a sampled token was the mask "
                                 "id); SDAR's generation fails here too", field="denoising_steps")
            needed[b, rows] = True
        return needed

    def quota(self, i: int, needed: Tensor, seq=None) -> Tensor:
        return needed.sum(1)

    def commit(self, i: int, x: Tensor, preds, rows: Tensor, seq) -> Tensor:
        x = x.clone()
        for b in range(seq.batch):
            phase, blk = int(seq["rule.phase"][b]), int(seq["rule.blk"][b])
            block = self._rows(seq, b, blk, blk + 1)
            if phase == PREFILL:
                seq["rule.phase"][b] = DENOISE
            elif phase == DENOISE:
                x[b, block] = self._denoise(x[b, block], preds.logits[b, :self.B], int(seq["rule.step"][b]))
                seq["rule.step"][b] += 1
            elif phase == STORE:
                self._next_block(seq, b, x[b])
        return x

    def _denoise(self, cur: Tensor, logits: Tensor, step: int) -> Tensor:
        """One of upstream's denoising steps on one block: sample every row, commit by the strategy."""
        x0, x0_p = sample(logits, self.p.temperature, self.p.top_k, self.p.top_p)
        mask = cur == self.mask_token_id
        k = self.transfer[step]
        take = torch.zeros_like(mask)
        if self.p.remasking_strategy == "sequential":
            first = int(mask.nonzero()[0])
            take[first:first + k] = True
        else:
            conf = torch.where(mask, x0_p, -torch.inf)
            high = conf > self.p.confidence_threshold
            if self.p.remasking_strategy == "low_confidence_dynamic" and int(high.sum()) >= k:
                take = high
            else:
                take[torch.topk(conf, k).indices] = True
        return torch.where(take, x0, cur)

    def _next_block(self, seq, b: int, x: Tensor) -> None:
        """After a block's store pass: stop on a stop id in the answer, else go on to the next block."""
        stops = self.p.stopping_criteria_idx
        answer = x[int(seq["rule.pad"][b]) + int(seq["rule.prompt"][b]):]
        if stops and bool(torch.isin(answer, torch.tensor(stops, device=x.device)).any()):
            seq["rule.phase"][b] = DONE
            return
        seq["rule.blk"][b] += 1
        seq["rule.step"][b] = 0
        seq["rule.phase"][b] = DONE if seq["rule.blk"][b] >= seq["rule.blocks"][b] else DENOISE


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float) -> tuple[Tensor, Tensor]:
    """SDAR's `sample_with_temperature_topk_topp` on [rows, V] logits: (tokens, their probability under the
    tempered and filtered distribution); one `torch.multinomial` draw over all rows."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k).values[..., -1, None]
        logits = torch.where(logits < kth, torch.full_like(logits, -torch.inf), logits)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        drop = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1) > top_p
        drop[..., 1:] = drop[..., :-1].clone()
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -torch.inf)
    probs = F.softmax(logits, dim=-1)
    token = torch.multinomial(probs, num_samples=1)
    return token[:, 0], probs.gather(-1, token)[:, 0]


FAMILY = SDAR()


def sdar_generate(backend, input_ids, attention_mask=None, *, gen_length: int = 128, block_length: int = 8,
                  denoising_steps: int = 8, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  remasking_strategy: str = "low_confidence_dynamic", confidence_threshold: float = 0.85,
                  eb_threshold: float | None = None, stopping_criteria_idx=None, policy=None, on_step=None,
                  max_positions: int | None = None, prefix_store=None):
    """SDAR's `block_diffusion_generate` with its parameter names and defaults; returns the canvas (the prompt
    and whole blocks after it; blocks after a stop stay masked) and the statistics. `policy` defaults to the
    append-only cache (`none` recomputes every row, with the same tokens)."""
    return FAMILY.generate(backend, input_ids, attention_mask, policy=policy or FAMILY.default_policy,
                           on_step=on_step, max_positions=max_positions, prefix_store=prefix_store,
                           gen_length=gen_length, block_length=block_length, denoising_steps=denoising_steps,
                           temperature=temperature, top_k=top_k, top_p=top_p, remasking_strategy=remasking_strategy,
                           confidence_threshold=confidence_threshold, eb_threshold=eb_threshold,
                           stopping_criteria_idx=stopping_criteria_idx)
