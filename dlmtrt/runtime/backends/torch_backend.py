"""PyTorch eager backend: runs `models.transformer.DiffusionLM` on CPU or CUDA."""
from __future__ import annotations

import torch

from dlmtrt.models.transformer import DiffusionLM

from ..contract import ModelInfo, StepInputs, StepOutputs


class TorchBackend:
    name = "torch"

    def __init__(self, model: DiffusionLM):
        self.model = model.eval()
        a = model.args
        w = model.model.embed_tokens.weight
        self.info = ModelInfo(family=a.family, num_layers=a.num_layers, num_kv_heads=a.num_kv_heads,
                              head_dim=a.head_dim, vocab_size=a.vocab_size, mask_token_id=a.mask_token_id,
                              eos_token_id=a.eos_token_id, pad_token_id=a.pad_token_id, logits_shift=a.logits_shift,
                              dtype=w.dtype, device=w.device)
        if w.is_cuda:
            from dlmtrt.plugins import fp8_linear  # noqa: F401  registers the few-row fp8 kernel with QuantLinear

    def new_cache(self, batch: int, length: int):
        return self.model.empty_cache(batch, length)

    @torch.inference_mode()
    def step(self, s: StepInputs) -> StepOutputs:
        logits, pk, pv, valid, drift = self.model(s.input_ids, s.position_ids, s.past_keys, s.past_values,
                                                  s.stable_mask, s.attention_mask)
        return StepOutputs(logits, pk, pv, valid, drift)
