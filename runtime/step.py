"""The step contract between the decode loop and every backend (shared/DESIGN.md).

A backend runs one denoising step over an explicit K/V cache; the loop decides which rows are active
and which cached rows are stable. Adding a backend means implementing `StepBackend` in one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class StepInputs:
    input_ids: Tensor  # [B, A] int64
    position_ids: Tensor  # [B, A] int64, canvas slots 0..L-1
    past_keys: list[Tensor]  # per layer [B, Hkv, L, D]
    past_values: list[Tensor]
    stable_mask: Tensor  # [B, L] bool
    attention_mask: Tensor  # [B, L] bool


@dataclass
class StepOutputs:
    logits: Tensor  # [B, A, V]
    present_keys: list[Tensor]
    present_values: list[Tensor]
    present_valid: Tensor  # [B, L] bool
    kv_drift: Tensor  # [B, A] float


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model, whatever runs it."""

    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    logits_shift: bool
    dtype: torch.dtype
    device: torch.device


class StepBackend(Protocol):
    info: ModelInfo
    name: str

    def new_cache(self, batch: int, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed past K/V for a canvas of `length` rows."""
        ...

    def step(self, inputs: StepInputs) -> StepOutputs:
        ...
