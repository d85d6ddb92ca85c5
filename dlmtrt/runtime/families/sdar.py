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

The append-only cache stores a finished block in the pass that denoises the next one (`append:store=fused`, the
default): under block-causal attention the next block's rows see the finished block's K/V computed in the same pass
from the same final tokens, so every denoising step's logits, every draw and every token are upstream's, with one
pass less per block (and none after the last block or a stop). `append:store=separate` keeps upstream's passes.

Upstream runs one prompt at a time; here a batch runs each sequence on its own block schedule (left padding moves
no block boundary). A step samples the blocks of every sequence in one draw from the global random stream, so a
batch equals its prompts run alone where the draws do not matter (top_k=1) and for a batch of one.
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

    def session(self, backend, input_ids, attention_mask, params: dict, plan, prefix_store=None, constraints=None,
                answer_start_pos=None):
        from ..decode import DecodeSession
        from . import canvas, constrain
        if answer_start_pos is not None:
            raise UsageError("+prophet is not defined for SDAR (its block schedule decides when a block is done)",
                             field="answer_start_pos")
        am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        lengths = am.long().sum(1).cpu()
        x, am = canvas(input_ids, am, self.canvas_tokens(params, lengths, input_ids.shape[1]),
                       backend.info.mask_token_id)
        if constraints:
            if any(not isinstance(p, int) or p < 0 or p >= params["gen_length"] for p in constraints):
                raise UsageError(f"SDAR's constraints take answer positions 0 to {params['gen_length'] - 1}",
                                 field="constraints")
            constrain(x, input_ids.shape[1], constraints, None)
        rule = self.rule(backend.info, params, input_ids.shape[1], plan)
        rule.answer_from = input_ids.shape[1]
        return DecodeSession(backend, x, am, rule, plan, prefix_store=prefix_store)


@dataclass
class SDARRule(Schedule):
    """`block_diffusion_generate`'s schedule as a per-sequence state machine (prefill, denoise, store, done),
    held in [B] tensors on the canvas's device so that a batch of any size costs the same few kernels per step.

    Whether a step draws (any sequence denoising) and how many rows it computes are host decisions. The static
    and sequential strategies commit a known share of each block per step, so a host copy of the schedule
    (`rule.host`: phase, step, masks left) predicts them inside a block, and the device is read back only where
    a block may end (one read-back per block, where a stop id, a finished answer or a stuck block is decided);
    with `scoped` (the append cache computes exactly the rule's scope) the loop then needs no read-back either.
    A predicted step's masks can only be fewer than the device's (a sampled mask id stays masked), so a block
    the host thinks unfinished is unfinished; where they differ, the read-back at the block's end resyncs. The
    dynamic strategy's threshold commits any number, so it reads back every step."""

    mask_token_id: int
    p: SDARParams
    exact_ties: bool = False
    fuse_store: bool = False  # store a finished block in the next block's first denoising pass
    scoped: bool = False  # the cache policy computes exactly scope() (append): the row count is the rule's
    answer_from: int = 1 << 62  # the canvas position where the answer starts (after it, unmasked = constrained)

    def __post_init__(self):
        self.B = self.p.block_length
        self.attention = f"block_causal:{self.B}"
        n, s = self.B, self.p.denoising_steps
        self.transfer = [n // s + (1 if k < n % s else 0) for k in range(s)]  # get_num_transfer_tokens
        self._denoising = False
        self._host_shares = torch.tensor(self.transfer)  # the shares on the host, for its copy of the schedule
        self.predicts = self.p.remasking_strategy in ("low_confidence_static", "sequential")
        self.known_rows: int | None = None  # this step's active row count, where the rule knows it on the host
        self.read_backs = 0

    def start(self, seq) -> None:
        am, answer = seq["am"], seq["answer"]
        dev = am.device
        P = (am & ~answer).sum(1)  # prompt tokens
        pad = (~am).sum(1)  # left padding
        self.L = am.shape[1]
        bidx = (torch.arange(self.L, device=dev)[None] - pad[:, None]).div(self.B, rounding_mode="floor")
        blk = P // self.B  # the first block to decode: the one holding the prompt's tail
        prompt_blocks = (bidx >= 0) & (bidx < blk[:, None])
        served = (seq["frozen"] | ~prompt_blocks).all(1)  # every prompt block came from a prefix store
        seq["rule.pad"], seq["rule.bidx"], seq["rule.blk"] = pad, bidx, blk
        seq["rule.pinned"] = (torch.arange(self.L, device=dev) >= self.answer_from)[None] & ~answer  # constraints
        seq["rule.blocks"] = -(-(P + self.p.gen_length) // self.B)
        seq["rule.step"] = torch.zeros_like(P)
        seq["rule.carry"] = torch.zeros_like(P, dtype=torch.bool)  # the previous block is stored this step
        host = torch.zeros(len(P), 3, dtype=torch.long)  # phase, step, masks left, as the host predicts them
        host[:, 0] = PREFILL  # unknown until the first read-back
        seq["rule.host"] = host
        seq["rule.phase"] = torch.where((blk > 0) & ~served, PREFILL, DENOISE)
        self.max_steps = int((1 + seq["rule.blocks"] * (self.p.denoising_steps + 2)).max())
        self._shares = torch.tensor(self.transfer, device=dev)
        self._stops = None if not self.p.stopping_criteria_idx else \
            torch.tensor(self.p.stopping_criteria_idx, device=dev)

    def _in_block(self, seq) -> Tensor:
        return seq["rule.bidx"] == seq["rule.blk"][:, None]

    def scope(self, i: int, seq) -> Tensor:
        phase, bidx = seq["rule.phase"][:, None], seq["rule.bidx"]
        prefill = (phase == PREFILL) & (bidx >= 0) & (bidx < seq["rule.blk"][:, None])
        carried = seq["rule.carry"][:, None] & (bidx == seq["rule.blk"][:, None] - 1)
        return prefill | carried | (((phase == DENOISE) | (phase == STORE)) & self._in_block(seq))

    def running(self, mask_index: Tensor, seq) -> Tensor:
        return seq["rule.phase"] != DONE

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
        """Every row of the current block of the sequences that denoise this step. A block with no mask left is
        stored instead (upstream's check at the top of its step loop), in a pass of its own or, fused, in the
        next block's first pass; a fused sequence stops here on a stop id or after its last block."""
        in_block = self._in_block(seq)
        phase = seq["rule.phase"]
        den = phase == DENOISE
        ended = den & ~(mask_index & in_block).any(1)
        if self.fuse_store:
            nxt = seq["rule.blk"] + 1
            advance = ended & ~self._stopped(seq["x"], seq) & (nxt < seq["rule.blocks"])
            seq["rule.phase"] = phase = torch.where(ended & ~advance, DONE, phase)
            seq["rule.blk"] = torch.where(advance, nxt, seq["rule.blk"])
            seq["rule.step"] = torch.where(advance, 0, seq["rule.step"])
            seq["rule.carry"] = advance
            in_block = self._in_block(seq)
            den = phase == DENOISE  # a new block is all masks
        else:
            seq["rule.phase"] = torch.where(ended, STORE, phase)
            den = den & ~ended
        self._plan_host(seq, mask_index & in_block)
        return den[:, None] & in_block

    def _plan_host(self, seq, masked_in_block: Tensor) -> None:
        """This step's host decisions (draw or not, the row count), predicted or read back, and the host copy of
        the schedule after the step's commit."""
        h = seq["rule.host"]
        phase, step, masks = h[:, 0], h[:, 1], h[:, 2]
        unsure = (phase == PREFILL) | (phase == STORE) | ((phase == DENOISE) & (masks == 0))
        if self.predicts and not bool(unsure.any()):
            self.known_rows = self.B if self.scoped else None
        else:
            self.read_backs += 1
            h = torch.stack([seq["rule.phase"], seq["rule.step"], masked_in_block.sum(1)], 1).cpu()
            phase, step, masks = h[:, 0], h[:, 1], h[:, 2]
            self.known_rows = None
        den = (phase == DENOISE) & (masks > 0)
        if bool((den & (step >= self.p.denoising_steps)).any()):
            raise UsageError("a block still has masks after its denoising steps (a sampled token was the mask "
                             "id); SDAR's generation fails here too", field="denoising_steps")
        self._denoising = bool(den.any())
        share = self._host_shares[step.clamp(0, len(self.transfer) - 1)]
        seq["rule.host"] = torch.stack([torch.where(phase == PREFILL, DENOISE, phase), step + den.long(),
                                        torch.where(den, (masks - share).clamp_min(0), masks)], 1)

    def quota(self, i: int, needed: Tensor, seq=None) -> Tensor:
        return needed.sum(1)

    def commit(self, i: int, x: Tensor, preds, rows: Tensor, seq) -> Tensor:
        phase, blk, step = seq["rule.phase"], seq["rule.blk"], seq["rule.step"]
        if self._denoising:  # no draw at a step that only prefills or stores, as upstream
            den = phase == DENOISE
            idx = ((seq["rule.pad"] + blk * self.B)[:, None] + torch.arange(self.B, device=x.device)
                   ).clamp_max(self.L - 1)
            cur = x.gather(1, idx)
            new = self._denoise(cur, preds.logits[:, :self.B], step, seq["rule.pinned"].gather(1, idx))
            x = x.scatter(1, idx, torch.where(den[:, None], new, cur))
            step = step + den.long()
        store = phase == STORE
        stopped = store & self._stopped(x, seq)
        advance = store & ~stopped  # after a block's store pass: stop on a stop id, else the next block
        blk = blk + advance.long()
        phase = torch.where(phase == PREFILL, DENOISE, phase)
        phase = torch.where(stopped, DONE, phase)
        phase = torch.where(advance, torch.where(blk >= seq["rule.blocks"], DONE, DENOISE), phase)
        seq["rule.phase"], seq["rule.blk"] = phase, blk
        seq["rule.step"] = torch.where(advance, 0, step)
        return x

    def _stopped(self, x: Tensor, seq) -> Tensor:
        """[B] whether a stop id is in the answer (upstream's check after each stored block)."""
        if self._stops is None:
            return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        return (torch.isin(x, self._stops) & seq["answer"]).any(1)

    def _denoise(self, cur: Tensor, logits: Tensor, step: Tensor, pinned: Tensor) -> Tensor:
        """One of upstream's denoising steps on each sequence's block ([n, block] tokens, [n, block, V] logits):
        sample every row, commit by the strategy the step's share of the block. A share larger than the block's
        masks also rewrites unmasked tokens, as upstream does in the block that holds the prompt's tail; a
        constraint (`pinned`) is never rewritten."""
        n, B = cur.shape
        x0, x0_p = sample(logits.reshape(n * B, -1), self.p.temperature, self.p.top_k, self.p.top_p)
        x0, x0_p = x0.view(n, B), x0_p.view(n, B)
        mask = cur == self.mask_token_id
        k = self._shares[step.clamp_max(len(self.transfer) - 1)]
        if self.p.remasking_strategy == "sequential":
            first = mask.int().argmax(1, keepdim=True)  # the first mask
            j = torch.arange(B, device=cur.device)[None]
            take = (j >= first) & (j < first + k[:, None])
        else:
            conf = torch.where(mask, x0_p, -torch.inf)
            take = torch.zeros_like(mask)
            for share in sorted(set(self.transfer)):
                top = torch.zeros_like(mask).scatter(1, torch.topk(conf, share, dim=1).indices, True)
                take = torch.where((k == share)[:, None], top, take)
            if self.p.remasking_strategy == "low_confidence_dynamic":
                high = conf > self.p.confidence_threshold
                take = torch.where((high.sum(1) >= k)[:, None], high, take)
        return torch.where(take & ~pinned, x0, cur)


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
