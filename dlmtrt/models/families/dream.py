"""Dream family (Qwen2-style): Dream-v0-Base/Instruct-7B, Dream-Coder, DiffuCoder and other Qwen2-based DLMs.

Qwen2 layout with q/k/v biases and grouped-query attention; row i's logits predict token i+1 (the
"logits shift" inherited from the autoregressive initialisation), which the runtime undoes.
Weight names are already those of `transformer.DiffusionLM`.
"""
from __future__ import annotations

from dlmtrt.errors import UsageError

from ..args import ModelArgs, sized

FAMILY = "dream"
ARCHITECTURES = ("DreamModel", "DreamForCausalLM")
MODEL_TYPES = ("Dream", "dream")
ALIASES = {"dream-7b": "Dream-org/Dream-v0-Instruct-7B", "dream-7b-base": "Dream-org/Dream-v0-Base-7B"}
SHAPES = {  # Dream-v0-Instruct-7B's config
    "dream-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                     num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=131072,
                     mask_token_id=151666, eos_token_id=151643, pad_token_id=151643, bos_token_id=151643,
                     qkv_bias=True, tie_word_embeddings=False, logits_shift=True)}

# Tiny checkpoints (models/tiny.py): special tokens after the 256 byte symbols, in the real vocabulary's order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
TOKEN_ROLES = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"}
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_args(vocab_size: int, ids: dict[str, int], s: dict) -> ModelArgs:
    """A tiny Dream: grouped-query heads (half as many K/V heads), q/k/v biases, the logits shift."""
    return sized(FAMILY, vocab_size, ids, s, num_kv_heads=s["num_heads"] // 2, rms_norm_eps=1e-6, qkv_bias=True,
                 logits_shift=True)


def _first_id(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def args_from_config(cfg: dict, gen: dict | None = None) -> ModelArgs:
    gen = gen or {}
    rs = cfg.get("rope_scaling")
    if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        raise UsageError(f"rope_scaling {rs!r} is not supported for Dream checkpoints (only plain RoPE)")
    heads = cfg["num_attention_heads"]
    eos = _first_id(gen.get("eos_token_id", cfg.get("eos_token_id")))
    return ModelArgs(
        family=FAMILY,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        qkv_bias=True,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        logits_shift=True,
        mask_token_id=gen.get("mask_token_id", cfg["mask_token_id"]),
        eos_token_id=eos,
        pad_token_id=gen.get("pad_token_id", cfg.get("pad_token_id", eos)),
        bos_token_id=cfg.get("bos_token_id"),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
    )


def checkpoint_to_ours(name: str) -> str:
    return name


def ours_to_checkpoint(name: str) -> str:
    return name


def make_config(a: ModelArgs) -> dict:
    """config.json with the keys of Dream-org/Dream-v0-Instruct-7B."""
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "attention_dropout": 0.0,
        "bos_token_id": a.bos_token_id,
        "eos_token_id": a.eos_token_id,
        "pad_token_id": a.pad_token_id,
        "mask_token_id": a.mask_token_id,
        "hidden_act": "silu",
        "hidden_size": a.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": a.intermediate_size,
        "max_position_embeddings": a.max_position_embeddings,
        "max_window_layers": a.num_layers,
        "num_attention_heads": a.num_heads,
        "num_hidden_layers": a.num_layers,
        "num_key_value_heads": a.num_kv_heads,
        "rms_norm_eps": a.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": a.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": a.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": False,
        "use_sliding_window": False,
        "vocab_size": a.vocab_size,
    }


def make_generation_config(a: ModelArgs) -> dict:
    return {
        **a.token_ids(),
        "alg": "entropy",
        "alg_temp": 0.0,
        "steps": 128,
        "max_new_tokens": 128,
        "temperature": 0.0,
        "top_p": 0.95,
        "eps": 1e-3,
    }
