"""models/tiny.py's checkpoint writers: `stream_checkpoint` (tensors written chunk by chunk, never held whole;
bench/export_memory.py writes its 7B-shaped checkpoint with it) writes the same checkpoint as `save_checkpoint`
of the whole state dict, shards split by `shard_files` for both."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dlmtrt.models.families import FAMILIES
from dlmtrt.models.loading import load_weights, open_checkpoint
from dlmtrt.models.tiny import (build_tokenizer, random_state_dict, save_checkpoint, shard_files, stream_checkpoint,
                                stream_weights, tiny_args, token_ids)


def tensors_of(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def row_chunks(sd, rows=3):
    """chunks(name, shape) over a held state dict: a few rows at a time, like the benchmark's fp32 blocks."""
    def chunks(name, shape):
        assert tuple(sd[name].shape) == tuple(shape)
        flat = sd[name].reshape(shape[0], -1) if len(shape) > 1 else sd[name].reshape(-1, 1)
        for i in range(0, flat.shape[0], rows):
            yield flat[i:i + rows].contiguous()
    return chunks


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("shard", [None, 40_000])
def test_streamed_checkpoint_equals_the_saved_one(family, shard, tmp_path):
    tok = build_tokenizer(family)
    args = tiny_args(family, 264, token_ids(family, tok))
    sd = random_state_dict(args, seed=3, dtype=torch.bfloat16)
    a = save_checkpoint(tmp_path / "saved", args, sd, tok, max_shard_bytes=shard)
    b = stream_checkpoint(tmp_path / "streamed", args, row_chunks(sd), torch.bfloat16, tok, max_shard_bytes=shard)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert (len(list(b.glob("*.safetensors"))) > 1) == (shard is not None)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"):
        if (a / name).exists():
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    ta, tb = tensors_of(a), tensors_of(b)
    assert list(ta) != [] and sorted(ta) == sorted(tb)
    assert all(tb[k].dtype == torch.bfloat16 and torch.equal(ta[k], tb[k]) for k in ta)
    fam = FAMILIES[family]
    assert set(tb) == {fam.ours_to_checkpoint(n) for n in sd}
    model = load_weights(open_checkpoint(str(b)), torch.bfloat16, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == args.param_count
    assert not list(tmp_path.glob(".streamed.*")), "temp dir left behind"


def test_shard_files_split_greedily_in_order():
    sizes = {"a": 40, "b": 30, "c": 50, "d": 10}
    assert shard_files(sizes, None) == {"model.safetensors": ["a", "b", "c", "d"]}
    assert shard_files(sizes, 130) == {"model.safetensors": ["a", "b", "c", "d"]}
    assert shard_files(sizes, 60) == {"model-00001-of-00003.safetensors": ["a"],
                                      "model-00002-of-00003.safetensors": ["b"],
                                      "model-00003-of-00003.safetensors": ["c", "d"]}
    assert shard_files({"big": 100}, 60) == {"model-00001-of-00001.safetensors": ["big"]}  # a tensor is never split


def test_stream_weights_refuses_chunks_that_do_not_match(tmp_path):
    tensors = {"w": ((4, 2), torch.bfloat16)}
    with pytest.raises(ValueError, match="must be a contiguous CPU"):
        stream_weights(tmp_path, tensors, lambda k: iter([torch.zeros(4, 2)]))  # fp32, not bf16
    with pytest.raises(ValueError, match="hold 8 bytes"):
        stream_weights(tmp_path, tensors, lambda k: iter([torch.zeros(2, 2, dtype=torch.bfloat16)]))
    with pytest.raises(ValueError, match="dtype torch.int8"):
        stream_weights(tmp_path, {"q": ((2,), torch.int8)}, lambda k: iter([]))


def test_failed_stream_leaves_no_checkpoint(tmp_path):
    tok = build_tokenizer("dream")
    args = tiny_args("dream", 264, token_ids("dream", tok))

    def chunks(name, shape):
        raise RuntimeError("boom")
        yield

    with pytest.raises(RuntimeError, match="boom"):
        stream_checkpoint(tmp_path / "ck", args, chunks, tokenizer=tok)
    assert list(tmp_path.iterdir()) == []


def test_token_ids_are_the_tokenizers():
    for family in ("dream", "llada"):
        tok = build_tokenizer(family)
        ids = token_ids(family, tok)
        assert ids["mask"] == tok.token_to_id({"dream": "<|mask|>", "llada": "<|mdm_mask|>"}[family])
        assert ("bos" in ids) == (family == "llada")
