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
    deep_rows = True  # takes StepInputs.deep (BiCache)

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
                                                  s.stable_mask, s.attention_mask, attention=kind, deep=s.deep)
        return StepOutputs(logits, pk, pv, valid, drift)

    @torch.inference_mode()
    def prefix_states(self, input_ids):
        """Per layer K, V and the hidden states (embeddings first) of a prefix computed alone (BiCache's store)."""
        return self.model.layer_states(input_ids, torch.ones_like(input_ids, dtype=torch.bool))


BACKEND = TorchBackend
