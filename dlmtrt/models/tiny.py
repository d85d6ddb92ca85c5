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

from .families import get, shapes
from .args import ModelArgs
from .transformer import DiffusionLM

DEFAULT_SIZES = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16)


def build_tokenizer(family: str):
    """A byte-level BPE tokenizer with no merges (every byte is a token) plus the family's special tokens."""
    specials = get(family).SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def tiny_args(family: str, vocab_size: int, ids: dict[str, int], **sizes) -> ModelArgs:
    """The family's tiny architecture (its `tiny_args`) at `sizes` over DEFAULT_SIZES."""
    return get(family).tiny_args(vocab_size, ids, {**DEFAULT_SIZES, **sizes})


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
    fam = get(args.family)
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
    roles = get(family).TOKEN_ROLES
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048, "padding_side": "left",
           "clean_up_tokenization_spaces": False, "chat_template": get(family).CHAT_TEMPLATE,
           **{k: v for k, v in roles.items() if v is not None}}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (d / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in roles.items() if v is not None}, indent=2) + "\n")


def tiny_vocabulary(family: str, tok=None) -> tuple[int, dict[str, int]]:
    """(vocabulary rows, {bos/eos/pad/mask: id}) of the family's tiny tokenizer: the embedding is padded to a
    multiple of 8 rows like real ones."""
    tok = tok or build_tokenizer(family)
    ids = {k.removesuffix("_token"): tok.token_to_id(v) for k, v in get(family).TOKEN_ROLES.items() if v is not None}
    return int(math.ceil(tok.get_vocab_size() / 8) * 8), ids


def make_tiny(family: str, out: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_shard_bytes: int | None = None, **sizes) -> Path:
    """Write a tiny random checkpoint of `family` to `out` and return its path."""
    get(family)  # an unknown family is one line, before anything is written
    tok = build_tokenizer(family)
    vocab, ids = tiny_vocabulary(family, tok)
    args = tiny_args(family, vocab, ids, **sizes)
    return save_checkpoint(Path(out), args, random_state_dict(args, seed, dtype), tok, max_shard_bytes)


def shaped_like(shape: str, **overrides) -> ModelArgs:
    """ModelArgs of a released size (a family's SHAPES: dream-7b, llada-8b, ...) for scale runs with random weights."""
    table = shapes()
    if shape not in table or not table[shape][1]:
        from dlmtrt.errors import UsageError
        raise UsageError(f"unknown shape '{shape}'; choose from {', '.join(k for k, v in table.items() if v[1])}",
                         field="shape")
    fam, fields = table[shape]
    return replace(ModelArgs(family=fam.FAMILY, **fields), **overrides)