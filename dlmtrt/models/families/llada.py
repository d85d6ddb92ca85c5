"""LLaDA family (LLaMA-style, OLMo code base): LLaDA-8B-Base/Instruct and their fine-tunes.

LLaMA layout without biases, multi-head attention, no logits shift (row i predicts token i).
The checkpoints use OLMo weight names (`model.transformer.blocks.{i}.ff_proj`, ...), renamed here.
"""
from __future__ import annotations

import re

from dlmtrt.errors import UsageError

from ..args import ModelArgs, sized

FAMILY = "llada"
ARCHITECTURES = ("LLaDAModelLM",)
MODEL_TYPES = ("llada", "LLaDA")
ALIASES = {"llada-8b": "GSAI-ML/LLaDA-8B-Instruct", "llada-8b-base": "GSAI-ML/LLaDA-8B-Base"}
SHAPES = {  # LLaDA-8B-Instruct's config
    "llada-8b": dict(vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32, num_heads=32,
                     num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5, max_position_embeddings=4096,
                     mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, bos_token_id=126080,
                     qkv_bias=False, tie_word_embeddings=False, logits_shift=False)}

# Tiny checkpoints (models/tiny.py): special tokens after the 256 byte symbols, in the real vocabulary's order.
SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|mdm_mask|>"]
TOKEN_ROLES = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "mask_token": "<|mdm_mask|>"}
CHAT_TEMPLATE = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
                 "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
                 "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def tiny_args(vocab_size: int, ids: dict[str, int], s: dict) -> ModelArgs:
    """A tiny LLaDA: multi-head attention, no biases, no logits shift."""
    return sized(FAMILY, vocab_size, ids, s, rms_norm_eps=1e-5, qkv_bias=False, logits_shift=False)

_BLOCK = {
    "attn_norm": "input_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_norm": "post_attention_layernorm",
    "ff_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}
_TOP = {
    "model.transformer.wte.weight": "model.embed_tokens.weight",
    "model.transformer.ln_f.weight": "model.norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
    "model.transformer.ff_out.weight_scale": "lm_head.weight_scale",  # calibrate --quantize-head
    "model.transformer.ff_out.input_scale": "lm_head.input_scale",
}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
_UNSUPPORTED = {  # config key -> value our forward implements
    "alibi": False, "scale_logits": False, "attention_layer_norm": False, "block_type": "llama",
    "layer_norm_type": "rms", "activation_type": "silu", "include_bias": False, "input_emb_norm": False,
}


def args_from_config(cfg: dict, gen: dict | None = None) -> ModelArgs:
    gen = gen or {}
    for key, ok in _UNSUPPORTED.items():
        if key in cfg and cfg[key] != ok:
            raise UsageError(f"LLaDA config has {key}={cfg[key]!r}; only {key}={ok!r} is supported")
    heads = cfg["n_heads"]
    hidden = cfg["d_model"]
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return ModelArgs(
        family=FAMILY,
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * hidden,
        num_layers=cfg["n_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("n_kv_heads") or heads,
        head_dim=hidden // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        qkv_bias=bool(cfg.get("include_qkv_bias", False)),
        tie_word_embeddings=bool(cfg.get("weight_tying", False)),
        logits_shift=False,
        mask_token_id=gen.get("mask_token_id", cfg.get("mask_token_id", 126336)),
        eos_token_id=eos,
        pad_token_id=gen.get("pad_token_id", cfg.get("pad_token_id", eos)),
        bos_token_id=cfg.get("bos_token_id"),
        max_position_embeddings=cfg.get("max_sequence_length", 4096),
    )


_TENSOR = r"(weight|bias|weight_scale|input_scale)"  # the last two: calibrated 8-bit checkpoints (dlmtrt calibrate)
_THEIRS = (r"model\.transformer\.blocks\.(\d+)\.(\w+)\." + _TENSOR, "model.transformer.blocks.{}.{}.{}")
_OURS = (r"model\.layers\.(\d+)\.(.+)\." + _TENSOR, "model.layers.{}.{}.{}")


def _rename(name: str, top: dict, block: dict, src: tuple[str, str], dst: tuple[str, str]) -> str:
    """One weight name from one layout to the other; names neither table knows pass through."""
    if name in top:
        return top[name]
    m = re.fullmatch(src[0], name)
    if m and m.group(2) in block:
        return dst[1].format(m.group(1), block[m.group(2)], m.group(3))
    return name


def checkpoint_to_ours(name: str) -> str:
    return _rename(name, _TOP, _BLOCK, _THEIRS, _OURS)


def ours_to_checkpoint(name: str) -> str:
    return _rename(name, _TOP_INV, _BLOCK_INV, _OURS, _THEIRS)


def make_config(a: ModelArgs) -> dict:
    """config.json with the keys of GSAI-ML/LLaDA-8B-Instruct."""
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": a.hidden_size,
        "embedding_dropout": 0.0,
        "embedding_size": a.vocab_size,
        "eos_token_id": a.eos_token_id,
        "pad_token_id": a.pad_token_id,
        "mask_token_id": a.mask_token_id,
        "include_bias": False,
        "include_qkv_bias": a.qkv_bias,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "max_sequence_length": a.max_position_embeddings,
        "mlp_hidden_size": a.intermediate_size,
        "mlp_ratio": max(1, a.intermediate_size // a.hidden_size),
        "n_heads": a.num_heads,
        "n_kv_heads": a.num_kv_heads,
        "n_layers": a.num_layers,
        "rms_norm_eps": a.rms_norm_eps,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": a.rope_theta,
        "scale_logits": False,
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "vocab_size": a.vocab_size,
        "weight_tying": a.tie_word_embeddings,
    }


def make_generation_config(a: ModelArgs) -> dict:
    return {
        **a.token_ids(),
        "steps": 128,
        "gen_length": 128,
        "block_length": 32,
        "temperature": 0.0,
        "remasking": "low_confidence",
    }
