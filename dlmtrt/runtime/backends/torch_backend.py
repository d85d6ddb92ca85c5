"""PyTorch eager backend: runs `models.transformer.DiffusionLM` on CPU or CUDA."""
from __future__ import annotations

import torch

from dlmtrt.models.transformer import DiffusionLM

from ..contract import ModelInfo, StepInputs, StepOutputs


class TorchBackend:
    name = "torch"
    takes = "checkpoint"
    default_device = "cpu"
    selects_logit_rows = False
    shares_cache = False  # a fresh cache per session
    polygraphy_runner = "torch"
    step_options = ()

    def __init__(self, model: DiffusionLM):
        self.model = model.eval()
        w = model.model.embed_tokens.weight
        self.info = ModelInfo.of(model.args, w.dtype, w.device)
        if w.is_cuda:
            from dlmtrt.plugins import fp8_linear  # noqa: F401  registers the few-row fp8 kernel with QuantLinear

    @classmethod
    def describe(cls, model: str):
        from . import checkpoint_source
        return checkpoint_source(cls.name, model)

    @classmethod
    def open(cls, model: str, dtype: str | None = None, device: str | None = None, progress=None):
        from . import open_checkpoint_backend
        return open_checkpoint_backend(cls, model, dtype, device, progress)

    def new_cache(self, batch: int, length: int):
        return self.model.empty_cache(batch, length)

    @torch.inference_mode()
    def step(self, s: StepInputs) -> StepOutputs:
        logits, pk, pv, valid, drift = self.model(s.input_ids, s.position_ids, s.past_keys, s.past_values,
                                                  s.stable_mask, s.attention_mask)
        return StepOutputs(logits, pk, pv, valid, drift)


BACKEND = TorchBackend
