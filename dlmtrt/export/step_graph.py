"""The step contract as a module with flat, positional tensor inputs and outputs: what `torch.onnx.export`
traces. The graph's names and their order are the contract's (`dlmtrt.runtime.contract.input_names`)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dlmtrt.models.args import ModelArgs
from dlmtrt.models.transformer import DiffusionLM

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
