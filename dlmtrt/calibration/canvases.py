"""Calibration inputs: the canvases a model actually sees while it denoises.

A step's input ranges depend on the noise level: a fully masked answer and a nearly clean one give different
activations. So the inputs are recorded from real trajectories (greedy generations of the model on a prompt set,
every step's canvas before the step) and then stratified: the mask ratio of the answer (masked / answer
positions) is binned into `strata` equal bins over (0, 1] and the same number of canvases is drawn from each.
`masked_only` keeps the fully masked canvases only (what a calibration on step-0 inputs sees), for comparison.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmtrt.errors import UsageError
from dlmtrt.runtime.families import get as get_family
from dlmtrt.runtime.params import greedy_params
from dlmtrt.runtime.policies import parse_policy


@dataclass
class Canvas:
    ids: list[int]  # prompt + answer (masked where not yet decoded), no padding
    ratio: float  # masked fraction of the answer


def record(backend, tokenizer, prompts: list[str], *, new_tokens: int, steps: int | None = None, batch: int = 16,
           progress=None) -> list[Canvas]:
    """Every step's canvas of a greedy generation of each prompt (`new_tokens` answer positions)."""
    if not prompts:
        raise UsageError("no calibration prompts; pass a prompt file or a task")
    info = backend.info
    family = info.family
    params = greedy_params(family, new_tokens, steps=steps)
    out: list[Canvas] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        ids, am = enc["input_ids"].to(info.device), enc["attention_mask"].to(info.device)
        if (ids == info.mask_token_id).any():
            raise UsageError("a calibration prompt contains the mask token; remove it")
        s = get_family(family).session(backend, ids, am, params, parse_policy("none"))
        P = ids.shape[1]
        lengths = am.sum(1).tolist()
        with torch.inference_mode():
            while not s.done:
                x = s.x.cpu()
                masked = (x[:, P:] == info.mask_token_id).sum(1)
                answer = x.shape[1] - P
                for r in range(x.shape[0]):
                    out.append(Canvas(x[r, P - lengths[r]:].tolist(), float(masked[r]) / answer))
                s.step()
        if progress is not None:
            progress(len(chunk))
    return out


def stratify(canvases: list[Canvas], *, strata: int, per_stratum: int, masked_only: bool = False,
             seed: int = 0) -> list[Canvas]:
    """`per_stratum` canvases from each of `strata` equal mask-ratio bins over (0, 1] (fewer where a bin has
    fewer), or, with `masked_only`, `strata * per_stratum` fully masked ones."""
    if strata < 1 or per_stratum < 1:
        raise UsageError(f"strata and per-stratum must be >= 1, got {strata} and {per_stratum}")
    rng = random.Random(seed)
    if masked_only:
        full = [c for c in canvases if c.ratio == 1.0]
        return rng.sample(full, min(len(full), strata * per_stratum))
    bins: dict[int, list[Canvas]] = {}
    for c in canvases:
        if c.ratio > 0:
            bins.setdefault(stratum_of(c.ratio, strata), []).append(c)
    out = []
    for k in sorted(bins):
        out += rng.sample(bins[k], min(len(bins[k]), per_stratum))
    return out


def stratum_of(ratio: float, strata: int) -> int:
    return min(strata - 1, max(0, int(ratio * strata - 1e-9)))


def batches(canvases: list[Canvas], batch: int, pad_id: int, device) -> list[tuple[Tensor, Tensor, list[Canvas]]]:
    """Left-padded (ids, attention mask, canvases) batches, similar lengths together."""
    order = sorted(canvases, key=lambda c: len(c.ids))
    out = []
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        L = max(len(c.ids) for c in chunk)
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        am = torch.zeros((len(chunk), L), dtype=torch.bool)
        for r, c in enumerate(chunk):
            ids[r, L - len(c.ids):] = torch.tensor(c.ids)
            am[r, L - len(c.ids):] = True
        out.append((ids.to(device), am.to(device), chunk))
    return out
