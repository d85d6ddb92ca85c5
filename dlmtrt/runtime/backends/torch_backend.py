"""PyTorch eager backend: runs `models.transformer.DiffusionLM` on CPU or CUDA."""
from __future__ import annotations

import torch

from dlmtrt.models.attention_kinds import AttentionKind
from dlmtrt.models.transformer import DiffusionLM

from ..contract import ModelInfo, StepInputs, StepOutputs
from . import CheckpointBackend


class TorchBackend(CheckpointBackend):
    name = "torch"
    polygraphy_runner = "torch"

    def __init__(self, model: DiffusionLM):
        self.model = model.eval()
        w = model.model.embed_tokens.weight
        self.info = ModelInfo.of(model.args, w.dtype, w.device)
        if w.is_cuda:
            from dlmtrt.plugins import fp8_linear  # noqa: F401  registers the few-row fp8 kernel with QuantLinear

    def new_cache(self, batch: int, length: int):
        return self.model.empty_cache(batch, length)

    @torch.inference_mode()
    def step(self, s: StepInputs) -> StepOutputs:
        kind = AttentionKind.parse(s.attention) if s.attention else None
        logits, pk, pv, valid, drift = self.model(s.input_ids, s.position_ids, s.past_keys, s.past_values,
                                                  s.stable_mask, s.attention_mask, attention=kind)
        return StepOutputs(logits, pk, pv, valid, drift)


BACKEND = TorchBackend
