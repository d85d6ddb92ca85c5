"""The step contract: the hub every stage meets at (docs/ARCHITECTURE.md).

A backend runs one denoising step over an explicit K/V cache; the loop decides which rows are active and
which cached rows are stable. The same tensors are the ONNX graph's inputs and outputs (their names, in
graph order, are below; how an artifact describes itself is runtime/artifacts.py), so the exporter, every
backend and the comparison tools share one definition. Adding a backend means
implementing `StepBackend` in one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dlmtrt.models.args import ModelArgs


@dataclass
class StepInputs:
    input_ids: Tensor  # [B, A] int64
    position_ids: Tensor  # [B, A] int64, canvas slots 0..L-1
    past_keys: list[Tensor]  # per layer [B, Hkv, L, D]
    past_values: list[Tensor]
    stable_mask: Tensor  # [B, L] bool
    attention_mask: Tensor  # [B, L] bool
    # Optional, for backends that declare `selects_logit_rows`: the active rows [B, R] whose logits the rule
    # needs (the output head then runs on R rows, not A), and whether kv_drift is read at all.
    logit_rows: Tensor | None = None
    need_drift: bool = True
    # The attention kind of this step when it is not the model's own (models/attention_kinds.py spec): a
    # block-causal model generating with another block length. Backends whose kind is fixed (an export, an
    # engine) refuse a different one.
    attention: str | None = None
    # Rows that join from a deeper layer on (`models.transformer.DeepRows`: BiCache's recomputed prefix); only
    # backends that declare `deep_rows` take them.
    deep: object | None = None


@dataclass
class StepOutputs:
    logits: Tensor  # [B, A, V], or [B, R, V] in `logit_rows` order when the backend selected them
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
    attention: str = "bidirectional"  # the attention kind's spec (models/attention_kinds.py)
    stop_ids: tuple[int, ...] = ()  # every id that ends an answer, eos first (ModelArgs.stop_ids)

    @classmethod
    def of(cls, a: ModelArgs, dtype: torch.dtype, device: torch.device) -> "ModelInfo":
        """What a backend of a model with `a` reports (the one place this is built)."""
        return cls(family=a.family, num_layers=a.num_layers, num_kv_heads=a.num_kv_heads, head_dim=a.head_dim,
                   vocab_size=a.vocab_size, mask_token_id=a.mask_token_id, eos_token_id=a.eos_token_id,
                   pad_token_id=a.pad_token_id, logits_shift=a.logits_shift, dtype=dtype, device=torch.device(device),
                   attention=a.attention, stop_ids=a.stop_ids)


class StepBackend(Protocol):
    """What the decode loop uses of a backend; the registry's capabilities are in runtime/backends/."""

    info: ModelInfo
    name: str
    selects_logit_rows: bool  # honours StepInputs.logit_rows / need_drift (see TorchGraphBackend)
    shares_cache: bool  # new_cache hands out the backend's own buffers again (KVCache owner "backend")
    deep_rows: bool  # takes StepInputs.deep and has prefix_states (BiCache)

    def new_cache(self, batch: int, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed past K/V for a canvas of `length` rows."""
        ...

    def step(self, inputs: StepInputs) -> StepOutputs:
        ...


def fixed_attention(s: StepInputs, info: ModelInfo, what: str) -> None:
    """A backend whose attention kind is fixed (`what`: an export, an engine) refuses a step that asks for
    another one."""
    if s.attention and s.attention != info.attention:
        from dlmtrt.errors import UsageError
        from dlmtrt.models.attention_kinds import AttentionKind
        kind = AttentionKind.parse(info.attention)
        raise UsageError(f"this {what} computes attention {info.attention}, the generation asks for {s.attention}: "
                         f"generate with block_length {kind.block} (the model's), or run the checkpoint with a torch "
                         "backend", field="block_length")


# ---- the graph's names (Hugging Face / Optimum convention, so ONNX Runtime IO binding and Polygraphy
# recognise them); the order is the graph's order

STEP_INPUTS = ("input_ids", "position_ids", "stable_mask", "attention_mask")
STEP_OUTPUTS_TAIL = ("present_valid", "kv_drift")


def input_names(num_layers: int) -> list[str]:
    return [*STEP_INPUTS] + [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")] + [
        *STEP_OUTPUTS_TAIL]


def output_kind(name: str) -> str:
    """logits, present (any present.{i}.key/.value), present_valid or kv_drift: what tolerances are keyed by."""
    return "present" if name.startswith("present.") else name


def named_inputs(s: StepInputs) -> dict[str, Tensor]:
    """A `StepInputs` keyed by graph input name, in the graph's order."""
    feeds = {"input_ids": s.input_ids, "position_ids": s.position_ids, "stable_mask": s.stable_mask,
             "attention_mask": s.attention_mask}
    for i, (k, v) in enumerate(zip(s.past_keys, s.past_values)):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
    return feeds
