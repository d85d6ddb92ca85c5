"""Tiny, real-layout checkpoints for tests, the demo and shape-only scale runs.

A tiny checkpoint is a faithful miniature of the real one: config.json and generation_config.json with
the real keys and special-token ids of its own vocabulary, safetensors weights under the real names
(single file or sharded with an index), and a byte-level `tokenizers` tokenizer with the family's chat
template and mask token. Everything that loads a 7B checkpoint loads these unchanged.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from dlmtrt.errors import UsageError
from dlmtrt.paths import check_output_dir

from .families import FAMILIES
from .transformer import DiffusionLM, ModelArgs

# Special tokens per family, after the 256 byte-level symbols, in the order of the real vocabularies.
SPECIALS = {
    "dream": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"],
    "llada": ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
              "<|mdm_mask|>"],
}
CHAT_TEMPLATES = {
    "dream": ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
              "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
              "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "llada": ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
              "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}
TOKEN_ROLES = {  # tokenizer_config.json fields
    "dream": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>"},
    "llada": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "mask_token": "<|mdm_mask|>"},
}
DEFAULT_SIZES = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16)


def build_tokenizer(family: str):
    """A byte-level BPE tokenizer with no merges (every byte is a token) plus the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS[family])
    return tok


def tiny_args(family: str, vocab_size: int, ids: dict[str, int], **sizes) -> ModelArgs:
    s = {**DEFAULT_SIZES, **sizes}
    heads = s["num_heads"]
    kv = s.get("num_kv_heads", heads // 2 if family == "dream" else heads)
    return ModelArgs(
        family=family, vocab_size=vocab_size, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_layers=s["num_layers"], num_heads=heads, num_kv_heads=kv, head_dim=s["head_dim"],
        rms_norm_eps=1e-6 if family == "dream" else 1e-5, rope_theta=10000.0, qkv_bias=family == "dream",
        tie_word_embeddings=False, logits_shift=family == "dream", mask_token_id=ids["mask"],
        eos_token_id=ids["eos"], pad_token_id=ids["pad"], bos_token_id=ids.get("bos"),
        max_position_embeddings=s.get("max_position_embeddings", 2048))


def random_state_dict(args: ModelArgs, seed: int, dtype: torch.dtype, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Weights initialised like HF models (normal(0, std), norms near 1), with a larger std on the output head
    so that random models have peaked, tie-free logits (deterministic greedy tests) while the residual stream
    stays well conditioned (bf16 errors are not amplified layer after layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in DiffusionLM(args).named_parameters()}
    sd = {}
    for n, shape in shapes.items():
        if n.endswith("layernorm.weight") or n == "model.norm.weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif n.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif n == "lm_head.weight":
            t = torch.randn(shape, generator=g) * 0.5 / args.hidden_size ** 0.5 * 8
        else:
            t = torch.randn(shape, generator=g) * std
        sd[n] = t.to(dtype)
    return sd


def save_checkpoint(out: Path, args: ModelArgs, state_dict: dict[str, torch.Tensor], tokenizer=None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write an HF-layout checkpoint atomically (temp dir, then rename)."""
    fam = FAMILIES[args.family]
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        named = {fam.ours_to_checkpoint(k): v.contiguous() for k, v in state_dict.items()}
        save_weights(tmp, named, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(fam.make_config(args), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(fam.make_generation_config(args), indent=2) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tmp, args.family, tokenizer)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_weights(d: Path, named: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    total = sum(t.numel() * t.element_size() for t in named.values())
    if not max_shard_bytes or total <= max_shard_bytes:
        save_file(named, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in named.items():
        nb = t.numel() * t.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nb
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _save_tokenizer(d: Path, family: str, tok) -> None:
    tok.save(str(d / "tokenizer.json"))
    roles = TOKEN_ROLES[family]
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, "padding_side": "left",
           "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATES[family],
           **{k: v for k, v in roles.items() if v is not None}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (d / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in roles.items() if v is not None}, indent=2) + "\n")


def make_tiny(family: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int | None = None, **sizes) -> Path:
    """Write a tiny random checkpoint of `family` to `out` and return its path."""
    if family not in FAMILIES:
        raise UsageError(f"unknown family '{family}'; choose from {', '.join(FAMILIES)}")
    tok = build_tokenizer(family)
    roles = TOKEN_ROLES[family]
    ids = {k.removesuffix("_token"): tok.token_to_id(v) for k, v in roles.items() if v is not None}
    vocab = int(math.ceil(tok.get_vocab_size() / 8) * 8)  # padded like real embeddings
    args = tiny_args(family, vocab, ids, **sizes)
    return save_checkpoint(Path(out), args, random_state_dict(args, seed, dtype), tok, max_shard_bytes)


def shaped_like(family: str, **overrides) -> ModelArgs:
    """ModelArgs with the real 7B/8B shapes (and special ids) for scale tests with random weights."""
    real = {
        "dream": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                      num_kv_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, mask_token_id=151666,
                      eos_token_id=151643, pad_token_id=151643, bos_token_id=151643, max_position_embeddings=131072),
        "llada": dict(vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_layers=32, num_heads=32,
                      num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5, mask_token_id=126336,
                      eos_token_id=126081, pad_token_id=126081, bos_token_id=126080, max_position_embeddings=4096),
    }[family]
    base = ModelArgs(family=family, qkv_bias=family == "dream", tie_word_embeddings=False,
                     logits_shift=family == "dream", **real)
    return replace(base, **overrides)
