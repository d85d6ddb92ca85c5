"""Independent references built from transformers' own Qwen2 / Llama modules with a full (non-causal) mask.

Our DiffusionLM is checked against these: same weights, a different implementation.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dlmtrt.models.transformer import DiffusionLM


def hf_model(model: DiffusionLM) -> torch.nn.Module:
    a = model.args
    common = dict(vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
                  num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                  head_dim=a.head_dim, rms_norm_eps=a.rms_norm_eps, rope_theta=a.rope_theta,
                  max_position_embeddings=a.max_position_embeddings, tie_word_embeddings=a.tie_word_embeddings,
                  attn_implementation="eager")
    if a.family == "dream":
        ref = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        ref = LlamaForCausalLM(LlamaConfig(attention_bias=a.qkv_bias, mlp_bias=False, **common))
    sd = {k: v for k, v in model.state_dict().items() if k != "inv_freq"}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all("rotary" in m for m in missing), missing
    return ref.to(model.lm_head.weight.dtype).eval()


@torch.no_grad()
def hf_logits(ref: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Full bidirectional pass. Keys are masked by `attention_mask` (padding); queries see every valid key."""
    B, L = input_ids.shape
    am = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    dtype = next(ref.parameters()).dtype
    mask4d = torch.zeros(B, 1, L, L, dtype=dtype)
    mask4d.masked_fill_(~am[:, None, None, :], torch.finfo(dtype).min)
    if position_ids is None:
        position_ids = (am.long().cumsum(-1) - 1).clamp_min(0)
    return ref(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids).logits
