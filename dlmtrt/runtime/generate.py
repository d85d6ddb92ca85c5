"""Generation entry points: each family's upstream one (Dream's `diffusion_generate` as `dream_generate`,
LLaDA's `generate` as `llada_generate`, from runtime/families/), plus text in / text out for any family.

Every family runs through the one denoising loop in `decode.py` and therefore through any backend and cache
policy.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dlmtrt.errors import UsageError

from .contract import StepBackend
from .decode import GenerationStats
from .families import get as family
from .families import span_options
from .families.dream import dream_generate  # noqa: F401  (the public API)
from .families.llada import llada_generate  # noqa: F401
from .families.sdar import sdar_generate  # noqa: F401
from .policies import DecodePlan


@dataclass
class Generation:
    texts: list[str]
    sequences: Tensor  # full canvases
    prompt_length: int
    stats: GenerationStats


def generate_text(backend: StepBackend, tokenizer, prompts: list[str], *, chat: bool = False,
                  policy: str | DecodePlan | None = None, on_step=None, max_positions: int | None = None,
                  prefix_store=None, constraints: dict[int, int] | None = None, answer_start: int | None = None,
                  **params) -> Generation:
    """Tokenize (left padding, optional chat template), generate, and decode each answer up to its EOS.

    `params` are the family's own (its params dataclass: Dream's max_new_tokens/steps/eps/alg/..., LLaDA's
    gen_length/steps/block_length/...). `constraints` ({answer position: token id}, runtime/constraints.py)
    are pinned in every answer; `answer_start` places +prophet's span, in answer positions (Prophet's
    eval_llada.py `answer_start`; by default 2 after the last constraint).
    """
    if not prompts:
        raise UsageError("no prompt given")
    fam = _family_of(backend, params)
    if chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False) for p in prompts]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return _generate(backend, tokenizer, fam, enc["input_ids"], enc["attention_mask"], policy, on_step,
                     max_positions, prefix_store, params, constraints, answer_start)


def generate_ids(backend: StepBackend, tokenizer, prompts: list[list[int]], *, policy: str | DecodePlan | None = None,
                 on_step=None, max_positions: int | None = None, prefix_store=None,
                 constraints: dict[int, int] | None = None, answer_start: int | None = None, **params) -> Generation:
    """As `generate_text`, from token ids (left-padded here): prompts whose split matters, a chat tokenized by
    `runtime.bicache.chat_prefix`, which re-tokenizing its rendered text need not reproduce."""
    import torch
    if not prompts or not all(prompts):
        raise UsageError("no prompt given (or an empty one)")
    fam = _family_of(backend, params)
    L = max(len(p) for p in prompts)
    pad = backend.info.pad_token_id
    ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts])
    am = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    return _generate(backend, tokenizer, fam, ids, am, policy, on_step, max_positions, prefix_store, params,
                     constraints, answer_start)


def _family_of(backend, params: dict):
    """The backend's family, refusing parameters it does not take."""
    fam = family(backend.info.family)
    unknown = sorted(set(params) - set(fam.param_names))
    if unknown:
        raise UsageError(f"{fam.name} generation does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(fam.param_names)}", field=unknown[0])
    return fam


def _generate(backend, tokenizer, fam, ids: Tensor, am: Tensor, policy, on_step, max_positions, prefix_store,
              params: dict, constraints=None, answer_start=None) -> Generation:
    ids, am = ids.to(backend.info.device), am.to(backend.info.device)
    if (ids == backend.info.mask_token_id).any():
        raise UsageError("a prompt contains the mask token; remove it (the canvas uses it for unknown positions)")
    x, stats = fam.generate(backend, ids, am, policy=policy, on_step=on_step, max_positions=max_positions,
                            prefix_store=prefix_store, **span_options(ids.shape[1], constraints, answer_start),
                            **params)
    P = ids.shape[1]
    stops = backend.info.stop_ids or (backend.info.eos_token_id,)
    return Generation([decode_answer(tokenizer, row[P:], stops) for row in x], x, P, stats)


def answer_end(tokens: list[int], stop_ids) -> int:
    """Where an answer ends: at its first stop id (EOS, and the family's others), else its length."""
    stops = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    return next((k for k, t in enumerate(tokens) if t in stops), len(tokens))


def decode_answer(tokenizer, tokens: Tensor, stop_ids) -> str:
    """Text of the generated tokens up to (not including) the first stop id, special tokens skipped."""
    t = tokens.tolist()
    return tokenizer.decode(t[:answer_end(t, stop_ids)], skip_special_tokens=True)
