"""Generation entry points: Dream's `diffusion_generate` and LLaDA's `generate`, plus text in / text out.

The two families keep their own parameters and schedules (`unmasking.DreamRule`, `unmasking.LLaDARule`);
both run through the one denoising loop in `decode.py` and therefore through any backend and cache policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmtrt.errors import UsageError

from .decode import DecodeSession, GenerationStats, drive
from .params import DreamParams, LLaDAParams, param_names
from .policies import DecodePlan, parse_policy
from .contract import StepBackend
from .unmasking import DreamBlockRule, DreamRule, LLaDARule


def _check_length(backend: StepBackend, total: int, max_positions: int | None) -> None:
    if max_positions is not None and total > max_positions:
        raise UsageError(f"prompt + new tokens = {total} exceeds the model's {max_positions} positions; "
                         "shorten the prompt or ask for fewer new tokens")


def _canvas(ids: Tensor, attention_mask: Tensor | None, new: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """The canvas (prompt, then `new` masks) and its attention mask (the prompt's, then ones)."""
    x = F.pad(ids, (0, new), value=mask_id)
    am = torch.ones_like(x, dtype=torch.bool)
    if attention_mask is not None:
        am[:, : ids.shape[1]] = attention_mask.bool()
    return x, am


def dream_session(backend: StepBackend, input_ids: Tensor, attention_mask: Tensor | None, p: DreamParams,
                  plan: DecodePlan, prefix_store=None) -> DecodeSession:
    """The `DecodeSession` of Dream's generation for validated `p`: what `dream_generate` drives, and what a
    server steps among others."""
    info = backend.info
    x, am = _canvas(input_ids, attention_mask, p.max_new_tokens, info.mask_token_id)
    threshold = plan.parallel.threshold if plan.parallel is not None else None
    if p.block_length is None:
        rule = DreamRule(info.mask_token_id, p, threshold)
    else:
        rule = DreamBlockRule(info.mask_token_id, p, input_ids.shape[1], threshold)
    return DecodeSession(backend, x, am, rule, plan, prefix_store=prefix_store)


def llada_session(backend: StepBackend, prompt: Tensor, attention_mask: Tensor | None, p: LLaDAParams,
                  plan: DecodePlan, prefix_store=None) -> DecodeSession:
    """The `DecodeSession` of LLaDA's generation for validated `p` (see `dream_session`)."""
    info = backend.info
    rule = LLaDARule(p, prompt.shape[1], parallel=plan.parallel.threshold if plan.parallel is not None else None,
                     order=getattr(plan.cache, "order", "step") if p.remasking == "random" else "step")
    x, am = _canvas(prompt, attention_mask, p.gen_length, info.mask_token_id)
    prompt_index = x != info.mask_token_id
    prompt_index[:, prompt.shape[1]:] = False
    return DecodeSession(backend, x, am, rule, plan, cfg_scale=p.cfg_scale, prompt_index=prompt_index,
                         prefix_store=prefix_store)


def dream_generate(backend: StepBackend, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                   max_new_tokens: int = 20, steps: int = 512, eps: float = 1e-3, alg: str = "origin",
                   alg_temp: float | None = None, temperature: float = 1.0, top_p: float | None = None,
                   top_k: int | None = 50, block_length: int | None = None, policy: str | DecodePlan | None = None,
                   on_step=None, max_positions: int | None = None, prefix_store=None) -> tuple[Tensor, GenerationStats]:
    """Dream's `diffusion_generate`; returns the full canvas [B, prompt + max_new_tokens].

    The defaults are upstream's effective ones (runtime/params.py): an unqualified call samples at
    temperature 1 from the top 50 logits with `alg='origin'`, exactly as `model.diffusion_generate(ids)` does;
    pass `top_k=None` for no top-k. `block_length` switches to Fast-dLLM's block decoding of Dream."""
    p = DreamParams(max_new_tokens, steps, eps, alg, alg_temp, temperature, top_p, top_k, block_length).validate()
    plan = parse_policy(policy)
    _check_length(backend, input_ids.shape[1] + max_new_tokens, max_positions)
    return drive(dream_session(backend, input_ids, attention_mask, p, plan, prefix_store), on_step)


def llada_generate(backend: StepBackend, prompt: Tensor, attention_mask: Tensor | None = None, *, steps: int = 128,
                   gen_length: int = 128, block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
                   remasking: str = "low_confidence", policy: str | DecodePlan | None = None, on_step=None,
                   max_positions: int | None = None, prefix_store=None) -> tuple[Tensor, GenerationStats]:
    """LLaDA's `generate` (blocks, low_confidence / random remasking, CFG); returns the canvas.

    LLaDA's published model code applies no attention mask, so upstream attends to left padding: pass
    `attention_mask=None` to reproduce that; with a mask, padding is never attended."""
    p = LLaDAParams(gen_length, steps, block_length, temperature, cfg_scale, remasking).validate()
    plan = parse_policy(policy)
    _check_length(backend, prompt.shape[1] + gen_length, max_positions)
    return drive(llada_session(backend, prompt, attention_mask, p, plan, prefix_store), on_step)


@dataclass
class Generation:
    texts: list[str]
    sequences: Tensor  # full canvases
    prompt_length: int
    stats: GenerationStats




def generate_text(backend: StepBackend, tokenizer, prompts: list[str], *, chat: bool = False,
                  policy: str | DecodePlan | None = None, on_step=None, max_positions: int | None = None,
                  prefix_store=None, **params) -> Generation:
    """Tokenize (left padding, optional chat template), generate, and decode each answer up to its EOS.

    `params` are the family's own: Dream's max_new_tokens/steps/eps/alg/alg_temp/temperature/top_p/top_k,
    LLaDA's gen_length/steps/block_length/temperature/cfg_scale/remasking.
    """
    if not prompts:
        raise UsageError("no prompt given")
    family = backend.info.family
    allowed = param_names(family)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UsageError(f"{family} generation does not take {', '.join(unknown)}; it takes {', '.join(allowed)}")
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids = enc["input_ids"].to(backend.info.device)
    am = enc["attention_mask"].to(backend.info.device)
    if (ids == backend.info.mask_token_id).any():
        raise UsageError("a prompt contains the mask token; remove it (the canvas uses it for unknown positions)")
    if family == "dream":
        x, stats = dream_generate(backend, ids, am, policy=policy, on_step=on_step, max_positions=max_positions,
                                  prefix_store=prefix_store, **params)
    else:
        x, stats = llada_generate(backend, ids, am, policy=policy, on_step=on_step, max_positions=max_positions,
                                  prefix_store=prefix_store, **params)
    P = ids.shape[1]
    return Generation([decode_answer(tokenizer, row[P:], backend.info.eos_token_id) for row in x], x, P, stats)


def decode_answer(tokenizer, tokens: Tensor, eos_token_id: int) -> str:
    """Text of the generated tokens up to (not including) the first EOS, special tokens skipped."""
    t = tokens.tolist()
    if eos_token_id in t:
        t = t[: t.index(eos_token_id)]
    return tokenizer.decode(t, skip_special_tokens=True)
