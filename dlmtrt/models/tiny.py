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

from .args import ModelArgs
from .families import get, shapes
from .loading import _ST_DTYPES
from .transformer import DiffusionLM

SINGLE_FILE = "model.safetensors"  # an unsharded checkpoint's weights
_ST_TAG = {dtype: tag for tag, dtype in _ST_DTYPES.items()}  # the float dtypes stream_weights writes
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


def token_ids(family: str, tok) -> dict[str, int]:
    """The special ids (mask, eos, pad and, where the family has one, bos) of a `build_tokenizer` tokenizer."""
    return {k.removesuffix("_token"): tok.token_to_id(v) for k, v in get(family).TOKEN_ROLES.items() if v is not None}


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
    return {n: init_random_(n, torch.randn(shape, generator=g), args, std).to(dtype) for n, shape in shapes.items()}


def init_random_(name: str, t: torch.Tensor, args: ModelArgs, std: float = 0.02) -> torch.Tensor:
    """Turn standard-normal draws `t` for (part of) the parameter `name` into `random_state_dict`'s
    initialisation, in place; also for a checkpoint drawn chunk by chunk (`stream_checkpoint`)."""
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return t.mul_(0.1).add_(1.0)
    if name.endswith(".bias"):
        return t.mul_(0.1)
    if name == "lm_head.weight":
        return t.mul_(0.5).div_(args.hidden_size ** 0.5).mul_(8)
    return t.mul_(std)


def save_checkpoint(out: Path, args: ModelArgs, state_dict: dict[str, torch.Tensor], tokenizer=None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write an HF-layout checkpoint atomically (temp dir, then rename)."""
    fam = get(args.family)
    named = {fam.ours_to_checkpoint(k): v.contiguous() for k, v in state_dict.items()}
    return _save_atomic(out, args, tokenizer, lambda d: save_weights(d, named, max_shard_bytes))


def stream_checkpoint(out: Path, args: ModelArgs, chunks, dtype: torch.dtype = torch.bfloat16, tokenizer=None,
                      max_shard_bytes: int | None = None) -> Path:
    """`save_checkpoint` of a model too large to hold (a 7B-shaped random checkpoint on a small machine):
    every parameter of `args`'s model is written in `dtype`, its values taken from `chunks(name, shape)`
    (our parameter names, as `random_state_dict` keys them), which yields them in order as contiguous
    `dtype` tensors of any sizes (row blocks); each is written as it comes (`stream_weights`), so the
    writer holds none of them."""
    fam = get(args.family)
    with torch.device("meta"):
        shapes = {fam.ours_to_checkpoint(n): (n, tuple(p.shape)) for n, p in DiffusionLM(args).named_parameters()}
    tensors = {k: (shape, dtype) for k, (_, shape) in shapes.items()}
    return _save_atomic(out, args, tokenizer, lambda d: stream_weights(d, tensors, lambda k: chunks(*shapes[k]),
                                                                       max_shard_bytes))


def _save_atomic(out: Path, args: ModelArgs, tokenizer, write_weights) -> Path:
    """A checkpoint directory written in a temp dir beside `out`, then renamed: `write_weights(dir)`, the
    config, the generation config and the tokenizer (if any)."""
    fam = get(args.family)
    out = check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_weights(tmp)
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


def shard_files(sizes: dict[str, int], max_shard_bytes: int | None) -> dict[str, list[str]]:
    """File name -> the tensors it holds, for tensors of `sizes` bytes in order: one model.safetensors where
    they fit in `max_shard_bytes` (or it is None), else HF's model-0000i-of-0000n.safetensors, filled greedily."""
    if not max_shard_bytes or sum(sizes.values()) <= max_shard_bytes:
        return {SINGLE_FILE: list(sizes)}
    shards: list[list[str]] = [[]]
    size = 0
    for k, nb in sizes.items():
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nb
    return {f"model-{i:05d}-of-{len(shards):05d}.safetensors": keys for i, keys in enumerate(shards, 1)}


def _write_index(d: Path, sizes: dict[str, int], files: dict[str, list[str]]) -> None:
    """model.safetensors.index.json of a sharded checkpoint (none for a single file)."""
    if list(files) == [SINGLE_FILE]:
        return
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {k: fname for fname, keys in files.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_weights(d: Path, named: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    sizes = {k: t.numel() * t.element_size() for k, t in named.items()}
    files = shard_files(sizes, max_shard_bytes)
    for fname, keys in files.items():
        save_file({k: named[k] for k in keys}, str(d / fname), metadata={"format": "pt"})
    _write_index(d, sizes, files)


def stream_weights(d: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], chunks,
                   max_shard_bytes: int | None = None) -> None:
    """`save_weights` without the tensors in memory: `tensors` gives each tensor's shape and dtype, in order;
    `chunks(name)` yields its values in order as contiguous tensors of that dtype (any split). The header of
    each file is written first, then every chunk as it comes; the files, sharding and index are those of
    `save_weights` (safetensors' own writer orders the tensors of a file by dtype and name, this one keeps
    the given order, which any safetensors reader accepts)."""
    sizes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in tensors.items()}
    files = shard_files(sizes, max_shard_bytes)
    for fname, keys in files.items():
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for k in keys:
            shape, dtype = tensors[k]
            if dtype not in _ST_TAG:
                raise ValueError(f"stream_weights: {k} has dtype {dtype}; it writes {', '.join(map(str, _ST_TAG))}")
            header[k] = {"dtype": _ST_TAG[dtype], "shape": list(shape), "data_offsets": [off, off + sizes[k]]}
            off += sizes[k]
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(d / fname, "wb") as f:
            f.write(len(hb).to_bytes(8, "little") + hb)
            for k in keys:
                shape, dtype = tensors[k]
                written = 0
                for c in chunks(k):
                    if c.dtype != dtype or not c.is_contiguous() or c.device.type != "cpu":
                        raise ValueError(f"stream_weights: a chunk of {k} must be a contiguous CPU {dtype} tensor, "
                                         f"got {c.dtype} on {c.device}")
                    f.write(memoryview(c.reshape(-1).view(torch.uint8).numpy()))
                    written += c.numel() * c.element_size()
                if written != sizes[k]:
                    raise ValueError(f"stream_weights: the chunks of {k} hold {written} bytes; its shape "
                                     f"{list(shape)} needs {sizes[k]}")
    _write_index(d, sizes, files)


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
    return int(math.ceil(tok.get_vocab_size() / 8) * 8), token_ids(family, tok)


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