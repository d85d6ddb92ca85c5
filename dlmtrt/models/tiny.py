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
from .loading import _ST_DTYPES
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
SINGLE_FILE = "model.safetensors"  # an unsharded checkpoint's weights
_ST_TAG = {dtype: tag for tag, dtype in _ST_DTYPES.items()}  # the float dtypes stream_weights writes
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


def token_ids(family: str, tok) -> dict[str, int]:
    """The special ids (mask, eos, pad and, where the family has one, bos) of a `build_tokenizer` tokenizer."""
    return {k.removesuffix("_token"): tok.token_to_id(v) for k, v in TOKEN_ROLES[family].items() if v is not None}


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
    fam = FAMILIES[args.family]
    named = {fam.ours_to_checkpoint(k): v.contiguous() for k, v in state_dict.items()}
    return _save_atomic(out, args, tokenizer, lambda d: save_weights(d, named, max_shard_bytes))


def stream_checkpoint(out: Path, args: ModelArgs, chunks, dtype: torch.dtype = torch.bfloat16, tokenizer=None,
                      max_shard_bytes: int | None = None) -> Path:
    """`save_checkpoint` of a model too large to hold (a 7B-shaped random checkpoint on a small machine):
    every parameter of `args`'s model is written in `dtype`, its values taken from `chunks(name, shape)`
    (our parameter names, as `random_state_dict` keys them), which yields them in order as contiguous
    `dtype` tensors of any sizes (row blocks); each is written as it comes (`stream_weights`), so the
    writer holds none of them."""
    fam = FAMILIES[args.family]
    with torch.device("meta"):
        shapes = {fam.ours_to_checkpoint(n): (n, tuple(p.shape)) for n, p in DiffusionLM(args).named_parameters()}
    tensors = {k: (shape, dtype) for k, (_, shape) in shapes.items()}
    return _save_atomic(out, args, tokenizer, lambda d: stream_weights(d, tensors, lambda k: chunks(*shapes[k]),
                                                                       max_shard_bytes))


def _save_atomic(out: Path, args: ModelArgs, tokenizer, write_weights) -> Path:
    """A checkpoint directory written in a temp dir beside `out`, then renamed: `write_weights(dir)`, the
    config, the generation config and the tokenizer (if any)."""
    fam = FAMILIES[args.family]
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
    ids = token_ids(family, tok)
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
