"""SDAR family (JetAstra/SDAR, arXiv 2510.06303): block-diffusion models in Qwen3's layout, SDAR-1.7B/4B/8B-Chat.

Qwen3 layout: RMSNorm on each query and key head before RoPE (q_norm, k_norm), no attention bias, grouped-query
heads, an untied output head on 4B/8B, no logits shift (the logit at position p scores the token at p).
Attention is block-causal with the config's `block_size`: bidirectional inside a block, causal across blocks,
so committed blocks' K/V are exact. Weight names are already those of `transformer.DiffusionLM`.
"""
from __future__ import annotations

from dlmtrt.errors import UsageError

from ..args import ModelArgs, sized

FAMILY = "sdar"
ARCHITECTURES = ("SDARForCausalLM",)
MODEL_TYPES = ("sdar",)
ALIASES = {"sdar-1.7b": "JetLM/SDAR-1.7B-Chat", "sdar-4b": "JetLM/SDAR-4B-Chat", "sdar-8b": "JetLM/SDAR-8B-Chat"}
_QWEN3 = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
              mask_token_id=151669, eos_token_id=151643, pad_token_id=151643, bos_token_id=151643, qkv_bias=False,
              logits_shift=False, qk_norm=True, attention="block_causal:4")
SHAPES = {  # the SDAR-*-Chat configs (Qwen3-1.7B/4B/8B sizes); block 4 as released
    "sdar-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_layers=28, num_heads=16, num_kv_heads=8,
                      tie_word_embeddings=True, **_QWEN3),
    "sdar-4b": dict(hidden_size=2560, intermediate_size=9728, num_layers=36, num_heads=32, num_kv_heads=8,
                    tie_word_embeddings=False, **_QWEN3),
    "sdar-8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
                    tie_word_embeddings=False, **_QWEN3),
}

# Tiny checkpoints (models/tiny.py): special tokens after the 256 byte symbols, in the real vocabulary's order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|MASK|>"]
TOKEN_ROLES = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|MASK|>"}
CHAT_TEMPLATE = ("{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + "
                 "'<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == 'user') or "
                 "(message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
                 "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}"
                 "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
TINY_BLOCK = 4


def _ids(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def args_from_config(cfg: dict, gen: dict | None = None) -> ModelArgs:
    gen = gen or {}
    rs = cfg.get("rope_scaling")
    if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        raise UsageError(f"rope_scaling {rs!r} is not supported for SDAR checkpoints (only plain RoPE)")
    if cfg.get("attention_bias"):
        raise UsageError("attention_bias is not part of SDAR's layout; use an unmodified SDAR checkpoint")
    block = cfg.get("block_size")
    if not isinstance(block, int) or block < 1:
        raise UsageError(f"config.json has no valid block_size ({block!r}); SDAR checkpoints carry one")
    heads = cfg["num_attention_heads"]
    stops = _ids(gen.get("eos_token_id", cfg.get("eos_token_id")))
    return ModelArgs(
        family=FAMILY, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"], num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads), head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(cfg.get("rope_theta", 10000.0)),
        qkv_bias=False, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), logits_shift=False,
        mask_token_id=cfg["mask_token_id"], eos_token_id=stops[0],
        pad_token_id=gen.get("pad_token_id", cfg.get("pad_token_id", stops[-1])) or stops[-1],
        bos_token_id=cfg.get("bos_token_id"), max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        attention=f"block_causal:{block}", qk_norm=True, stop_token_ids=tuple(stops))


def checkpoint_to_ours(name: str) -> str:
    return name


def ours_to_checkpoint(name: str) -> str:
    return name


def make_config(a: ModelArgs) -> dict:
    """config.json with the keys of JetLM/SDAR-4B-Chat."""
    return {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar", "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": a.bos_token_id, "eos_token_id": a.eos_token_id, "mask_token_id": a.mask_token_id,
        "block_size": a.attention_kind.block, "head_dim": a.head_dim, "hidden_act": "silu",
        "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
        "max_position_embeddings": a.max_position_embeddings, "num_attention_heads": a.num_heads,
        "num_hidden_layers": a.num_layers, "num_key_value_heads": a.num_kv_heads, "rms_norm_eps": a.rms_norm_eps,
        "rope_scaling": None, "rope_theta": a.rope_theta, "sliding_window": None,
        "tie_word_embeddings": a.tie_word_embeddings, "torch_dtype": "bfloat16", "use_cache": False,
        "vocab_size": a.vocab_size,
    }


def make_generation_config(a: ModelArgs) -> dict:
    """SDAR's generation_config.json: it samples (temperature 0.6, top-k 20, top-p 0.95)."""
    return {"bos_token_id": a.bos_token_id, "eos_token_id": list(a.stop_token_ids or (a.eos_token_id,)),
            "pad_token_id": a.pad_token_id, "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def tiny_args(vocab_size: int, ids: dict[str, int], s: dict) -> ModelArgs:
    """A tiny SDAR: grouped-query heads (half as many K/V heads), q/k norms, blocks of 4; it stops on
    <|im_end|> (the id after <|im_start|>) and <|endoftext|>, as SDAR's generation config does."""
    im_end = ids["eos"] + 2
    return sized(FAMILY, vocab_size, ids, s, num_kv_heads=s["num_heads"] // 2, rms_norm_eps=1e-6, qkv_bias=False,
                 logits_shift=False, qk_norm=True, attention=f"block_causal:{TINY_BLOCK}",
                 stop_token_ids=(im_end, ids["eos"]))
