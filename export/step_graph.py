"""The step contract as a module with flat, named tensor inputs and outputs: what `torch.onnx.export` traces.

Names follow the Hugging Face / Optimum convention (`past_key_values.{i}.key`, `present.{i}.value`), so ONNX
Runtime IO binding, Polygraphy and other tools recognise them; the order below is the graph's order.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models.transformer import DiffusionLM, ModelArgs
from runtime.step import StepInputs

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


class StepGraph(nn.Module):
    """`DiffusionLM.forward` with the per-layer caches as separate positional tensors (key, value, key, ...)."""

    def __init__(self, model: DiffusionLM):
        super().__init__()
        self.m = model

    def forward(self, input_ids: Tensor, position_ids: Tensor, stable_mask: Tensor, attention_mask: Tensor,
                *past: Tensor) -> tuple[Tensor, ...]:
        logits, keys, values, valid, drift = self.m(input_ids, position_ids, list(past[0::2]), list(past[1::2]),
                                                    stable_mask, attention_mask)
        kv = [t for pair in zip(keys, values) for t in pair]
        return (logits, *kv, valid, drift)


def example_inputs(a: ModelArgs, dtype: torch.dtype, device: str | torch.device = "cpu", batch: int = 2,
                   active: int = 3, length: int = 8) -> tuple[Tensor, ...]:
    """Tracing inputs. Every cache tensor is its own allocation: aliased example inputs make torch.export
    treat them as one tensor, which silently wires every layer's key input to its value input."""
    z = dict(device=device)
    shape = (batch, a.num_kv_heads, length, a.head_dim)
    past = [torch.zeros(shape, dtype=dtype, **z) for _ in range(2 * a.num_layers)]
    return (torch.zeros(batch, active, dtype=torch.long, **z), torch.zeros(batch, active, dtype=torch.long, **z),
            torch.zeros(batch, length, dtype=torch.bool, **z), torch.ones(batch, length, dtype=torch.bool, **z), *past)


def dynamic_shapes(num_layers: int) -> dict:
    """Batch, active rows and canvas length are free; heads, head size and vocabulary are fixed."""
    B, A, L = torch.export.Dim("batch"), torch.export.Dim("active"), torch.export.Dim("canvas")
    return {"input_ids": {0: B, 1: A}, "position_ids": {0: B, 1: A}, "stable_mask": {0: B, 1: L},
            "attention_mask": {0: B, 1: L}, "past": tuple({0: B, 2: L} for _ in range(2 * num_layers))}
