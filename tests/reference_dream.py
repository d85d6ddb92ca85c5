"""Test oracle: a literal re-implementation of Dream's reference decoder.

Mirrors `generation_utils.py` shipped with Dream-org/Dream-v0-Instruct-7B (same file in DreamLM/Dream),
Copyright 2024 The Dream team, HKUNLP Group and the HuggingFace Inc. team, Apache-2.0:

* `top_p_logits`, `top_k_logits`, `sample_tokens`      -> `_top_p`, `_top_k`, `dream_sample_tokens`
* `DreamGenerationMixin._prepare_generated_length` /
  `_validate_generated_length` (max_new_tokens path)    -> the length handling in `dream_reference_generate`
* `DreamGenerationMixin._sample`                         -> `dream_reference_generate`

Rewritten here in our own words, but operation for operation the same: same tensor ops in the same order,
same dtypes (float32 `linspace` timesteps, `logits.dtype` confidences), and the same draws from the global
torch RNG (`torch.rand` for `origin`, `Categorical.sample` when temperature > 0, `torch.multinomial` when
`alg_temp` is set). Upstream quirks are kept on purpose, notably:

* the logits are shifted right by one position (`cat([logits[:, :1], logits[:, :-1]])`);
* the transfer budget uses the *batch-average* mask count `mask_index.sum() / B`, truncated with `int()`,
  and `topk` / `multinomial` run over the whole row (prompt positions carry -inf confidence);
* `sample_tokens` falls back to argmax when `Categorical` refuses the probabilities;
* there is no early exit: exactly `steps` forward calls are made.

`forward(x, attention_mask, tok_idx)` stands in for `self(x, attention_mask, tok_idx).logits`; it receives
either the string "full" and `None`, or a bool mask [B, 1, N, N] and position ids [B, N] (padded batches).
The upstream generation hooks (`generation_tokens_hook_func` / `generation_logits_hook_func`) are identities
by default and are not modelled; neither are `num_return_sequences` nor `output_history`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributions as dists
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dream_reference_generate", "dream_sample_tokens", "prepare_dream_masks"]

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def _top_p(logits: Tensor, top_p: float) -> Tensor:
    """Upstream `top_p_logits`: nucleus filter; removed entries get finfo(dtype).min."""
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = cum > top_p
    # shift right so the token that crosses the threshold is kept; the top token is always kept
    drop_sorted[..., 1:] = drop_sorted[..., :-1].clone()
    drop_sorted[..., 0] = 0
    drop = torch.zeros_like(logits, dtype=torch.bool, device=logits.device)
    drop = drop.scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def _top_k(logits: Tensor, top_k: int) -> Tensor:
    """Upstream `top_k_logits`: keep entries >= the k-th largest (ties at the k-th value survive)."""
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_sample_tokens(logits: Tensor, temperature: float = 0.0, top_p: float | None = None,
                        top_k: int | None = None, margin_confidence: bool = False,
                        neg_entropy: bool = False) -> tuple[Tensor, Tensor]:
    """Upstream `sample_tokens` on logits [M, V] -> (confidence [M], token [M])."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = _top_p(logits, top_p)
    if top_k is not None:
        logits = _top_k(logits, top_k)
    probs = torch.softmax(logits, dim=-1)

    if temperature > 0:
        try:
            x0 = dists.Categorical(probs=probs).sample()
            confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
        except Exception:  # upstream: bare `except:` -> greedy fallback (e.g. empty or invalid probs)
            confidence, x0 = probs.max(dim=-1)
    else:
        confidence, x0 = probs.max(dim=-1)

    if margin_confidence:
        ranked, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = ranked[:, 0] - ranked[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def prepare_dream_masks(attention_mask: Tensor | None, max_length: int) -> tuple[object, Tensor | None]:
    """The mask / position-id preparation at the top of upstream `_sample`.

    Only when the 2-D mask has a zero: pad it with ones to `max_length`, tok_idx = cumsum - 1 with padded
    positions set to 1, and a bool [B, 1, N, N] mask = row-valid AND column-valid. Otherwise ("full", None).
    """
    if attention_mask is not None and torch.any(attention_mask == 0.0):
        am = F.pad(attention_mask, (0, max_length - attention_mask.shape[1]), value=1.0)
        tok_idx = am.long().cumsum(-1) - 1
        tok_idx.masked_fill_(am == 0, 1)
        mask4d = torch.logical_and(am.unsqueeze(1).unsqueeze(-2), am.unsqueeze(1).unsqueeze(-1))
        return mask4d, tok_idx
    return "full", None


@torch.no_grad()
def dream_reference_generate(forward: Callable[[Tensor, object, Tensor | None], Tensor], input_ids: Tensor,
                             attention_mask: Tensor | None = None, *, max_new_tokens: int, steps: int,
                             eps: float = 1e-3, alg: str = "origin", alg_temp: float | None = None,
                             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                             mask_token_id: int) -> Tensor:
    """Upstream `diffusion_generate(..., max_new_tokens=...)` -> `_sample`; returns x [B, P + max_new_tokens]."""
    # _prepare_generated_length: max_new_tokens takes precedence -> max_length = max_new_tokens + prompt length
    prompt_len = input_ids.shape[-1]
    max_length = max_new_tokens + prompt_len
    # _validate_generated_length
    if prompt_len >= max_length:
        raise ValueError(f"Input length of input_ids is {prompt_len}, but `max_length` is set to {max_length}.")

    x = F.pad(input_ids, (0, max_length - input_ids.shape[1]), value=mask_token_id)
    attn, tok_idx = prepare_dream_masks(attention_mask, max_length)

    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)

    for i in range(steps):
        mask_index = x == mask_token_id
        logits = forward(x, attn, tok_idx)
        # position n is predicted from the hidden state at n - 1 (position 0 reuses its own)
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

        mask_logits = logits[mask_index]
        t = timesteps[i]
        s = timesteps[i + 1]

        if alg == "origin":
            p_transfer = 1 - s / t if i < steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index], device=x.device, dtype=torch.long) + mask_token_id
            chosen = torch.rand(*x0.shape, device=x.device) < p_transfer
            _, x0[chosen] = dream_sample_tokens(mask_logits[chosen], temperature=temperature,
                                                top_p=top_p, top_k=top_k)
            x[mask_index] = x0.clone()
            continue

        if alg not in DREAM_ALGS:
            raise RuntimeError(f"Unknown alg: {alg}")
        confidence, x0 = dream_sample_tokens(mask_logits, temperature, top_p=top_p, top_k=top_k,
                                             margin_confidence=(alg == "topk_margin"),
                                             neg_entropy=(alg == "entropy"))
        # batch-average number of masks (float tensor), truncated by int()
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        n_transfer = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_conf = torch.full_like(x, -torch.inf, device=x.device, dtype=logits.dtype)
        full_conf[mask_index] = confidence
        if n_transfer > 0:
            if alg_temp is None or alg_temp == 0:
                _, transfer_index = torch.topk(full_conf, n_transfer)
            else:
                full_conf = F.softmax(full_conf / alg_temp, dim=-1)
                transfer_index = torch.multinomial(full_conf, num_samples=n_transfer)
            proposal = torch.zeros_like(x, device=x.device, dtype=torch.long) + mask_token_id
            proposal[mask_index] = x0.clone()
            rows = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer_index)
            x[rows, transfer_index] = proposal[rows, transfer_index]

    return x
