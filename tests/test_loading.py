"""The offline loader: sharded checkpoints, HF-cache resolution, and one actionable error per bad input.

Every bad input must raise `CheckpointError` whose message names the problem *and* the fix, so each test
asserts on both halves of the message, not only on the exception type.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlmtrt.models.loading as loading
from dlmtrt.models.loading import ALIASES, CheckpointError, load, open_checkpoint, resolve_device, resolve_dtype
from dlmtrt.models.tiny import make_tiny

FAMILIES = ["dream", "llada"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------------------------- helpers
def copy_ckpt(src: Path, dst: Path) -> Path:
    """A private copy that a test may break without affecting the session-wide fixture."""
    return Path(shutil.copytree(src, dst))


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def logits_of(model, vocab: int, seed: int = 0) -> torch.Tensor:
    """Full pass over a random batch: the observable behaviour of loaded weights."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 13), generator=g)
    B, L = ids.shape
    K, V = model.empty_cache(B, L)
    pos = torch.arange(L).expand(B, L)
    return model(ids, pos, K, V, torch.zeros(B, L, dtype=torch.bool), torch.ones(B, L, dtype=torch.bool))[0]


def raises(match_all: list[str], fn, *a, **kw) -> str:
    """Call fn, require CheckpointError, and require every phrase (case-insensitive) in its message."""
    with pytest.raises(CheckpointError) as ei:
        fn(*a, **kw)
    msg = str(ei.value)
    missing = [p for p in match_all if p.lower() not in msg.lower()]
    assert not missing, f"message lacks {missing}: {msg}"
    return msg


@pytest.fixture
def dream(tiny_dir, tmp_path) -> Path:
    return copy_ckpt(tiny_dir("dream"), tmp_path / "dream")


@pytest.fixture
def llada(tiny_dir, tmp_path) -> Path:
    return copy_ckpt(tiny_dir("llada"), tmp_path / "llada")


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF hub cache that huggingface_hub will search.

    huggingface_hub reads HF_HUB_CACHE into `huggingface_hub.constants.HF_HUB_CACHE` at import time, so
    setting the environment variable alone has no effect in this (already importing) process: patch both.
    """
    import huggingface_hub.constants as hfc
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    return cache


def put_in_cache(cache: Path, repo: str, src: Path) -> Path:
    """The real cache layout: blobs/ holds the files, snapshots/<commit>/ links to them, refs/main names the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / COMMIT
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)  # no trailing newline, as huggingface_hub writes it
    for f in src.iterdir():
        blob = root / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


# ----------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_is_bit_identical_to_single_file(family, tmp_path):
    single = make_tiny(family, tmp_path / "single", seed=5)
    sharded = make_tiny(family, tmp_path / "sharded", seed=5, max_shard_bytes=20_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert not (sharded / "model.safetensors").exists()
    # A stray file that is not in the index must be ignored: only the shards the index lists are read.
    (sharded / "model-stray.safetensors").write_bytes(b"garbage")
    ck = open_checkpoint(str(sharded))
    assert len(ck.weight_files) > 2
    assert [f.name for f in ck.weight_files] == list(dict.fromkeys(index["weight_map"].values()))

    m1, _, _ = load(str(single))
    m2, _, _ = load(str(sharded))
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert sd1[k].dtype == sd2[k].dtype and torch.equal(sd1[k], sd2[k]), k
    assert torch.equal(logits_of(m1, ck.args.vocab_size), logits_of(m2, ck.args.vocab_size))


def test_sharded_checkpoint_uses_index_mapping(tmp_path):
    """Deleting the index makes the shards unreadable as a checkpoint: the loader goes through the index."""
    sharded = make_tiny("dream", tmp_path / "sharded", seed=5, max_shard_bytes=20_000)
    (sharded / "model.safetensors.index.json").unlink()
    raises(["no model.safetensors", "model.safetensors.index.json"], open_checkpoint, str(sharded))


# ----------------------------------------------------------------------------------------------- HF cache
@pytest.mark.parametrize("family", FAMILIES)
def test_repo_id_and_alias_resolve_through_hf_cache(family, tiny_dir, hf_cache, monkeypatch):
    src = tiny_dir(family)
    snap = put_in_cache(hf_cache, "Org/Name", src)
    direct, _, _ = load(str(src))
    model, tok, ck = load("Org/Name")
    assert ck.path.resolve() == snap.resolve() and ck.family == family
    assert tok.mask_token is not None
    assert torch.equal(logits_of(model, ck.args.vocab_size), logits_of(direct, ck.args.vocab_size))

    monkeypatch.setitem(ALIASES, "test-alias", "Org/Name")
    _, _, ck2 = load("test-alias")
    assert ck2.path.resolve() == snap.resolve() and ck2.source == "test-alias"


def test_alias_not_in_cache_names_repo_and_download_command(hf_cache, monkeypatch):
    monkeypatch.setitem(ALIASES, "test-alias", "Org/Missing")
    msg = raises(["Org/Missing", "test-alias", "hf download Org/Missing", "not in the local hugging face cache",
                  str(hf_cache)], load, "test-alias")
    assert "never downloads" in msg
    raises(["Org/Missing", "hf download Org/Missing"], load, "Org/Missing")


def test_partial_cache_entry_without_snapshot_is_not_found(hf_cache):
    root = hf_cache / "models--Org--Half"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)  # the ref exists but the snapshot folder does not
    raises(["Org/Half", "hf download Org/Half"], load, "Org/Half")


@pytest.mark.parametrize("name", ["no_such_dir", "./no/such/dir", "~/no_such_dir_xyz"])
def test_path_neither_dir_nor_alias(name, hf_cache):
    raises(["neither a directory nor a known alias", "dream-7b", "pass a checkpoint directory"], load, name)


@pytest.mark.parametrize("name", ["ckpts/no/such/dir", "bad name/with space"])
def test_missing_nested_path_is_not_mistaken_for_a_repo_id(name, hf_cache):
    """'a/b/c' is not a valid repo id; huggingface_hub's validation error must not leak out raw."""
    raises([name, "neither a directory nor a known alias", "pass a checkpoint directory"], load, name)


def test_file_instead_of_directory(dream):
    raises(["is a file", "checkpoint directory"], load, str(dream / "config.json"))


# ----------------------------------------------------------------------------------------------- config
def test_missing_config_json(dream):
    (dream / "config.json").unlink()
    raises(["config.json missing", "re-download"], load, str(dream))


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"])
def test_corrupt_config_json(dream, text):
    (dream / "config.json").write_text(text)
    raises(["config.json is corrupt", "re-download"], load, str(dream))


def test_config_missing_required_key(dream):
    cfg = json.loads((dream / "config.json").read_text())
    del cfg["hidden_size"]
    (dream / "config.json").write_text(json.dumps(cfg))
    raises(["lacks key 'hidden_size'", "re-download"], load, str(dream))


def test_unknown_architecture(dream):
    edit_json(dream / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    raises(["unknown architecture", "GPT2LMHeadModel", "Supported", "DreamModel", "LLaDAModelLM"], load, str(dream))


@pytest.mark.parametrize("key,value", [("alibi", True), ("block_type", "sequential"), ("activation_type", "gelu"),
                                       ("include_bias", True)])
def test_unsupported_llada_feature(llada, key, value):
    edit_json(llada / "config.json", **{key: value})
    raises([f"{key}={value!r}", f"only {key}=", "cannot run this checkpoint"], load, str(llada))


@pytest.mark.parametrize("rs", [{"type": "yarn", "factor": 4.0}, {"rope_type": "linear", "factor": 2.0}])
def test_unsupported_dream_rope_scaling(dream, rs):
    edit_json(dream / "config.json", rope_scaling=rs)
    raises(["rope_scaling", "not supported", "plain RoPE", "cannot run this checkpoint"], load, str(dream))


def test_default_rope_scaling_is_accepted(dream):
    edit_json(dream / "config.json", rope_scaling={"rope_type": "default"})
    assert load(str(dream))[2].family == "dream"


def test_mask_id_disagreement_between_config_files(dream):
    edit_json(dream / "config.json", mask_token_id=7)
    raises(["mask_token_id", "config.json", "generation_config.json", "7"], load, str(dream))


# ----------------------------------------------------------------------------------------------- weights
def test_missing_shard(tmp_path):
    sharded = make_tiny("dream", tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    raises([victim.name, "missing", "incomplete", "fetch the missing files"], load, str(sharded))


@pytest.mark.parametrize("how", ["truncate", "empty", "garbage_header"])
def test_corrupt_safetensors(dream, how):
    f = dream / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                   "garbage_header": (1 << 40).to_bytes(8, "little") + data[8:]}[how])
    raises(["corrupt safetensors file", "model.safetensors", "re-download"], load, str(dream))


def test_no_weights(dream):
    (dream / "model.safetensors").unlink()
    raises(["no model.safetensors", "re-download"], load, str(dream))


def test_pytorch_bin_weights_get_conversion_hint(dream):
    (dream / "model.safetensors").rename(dream / "pytorch_model.bin")
    raises(["pytorch_model.bin", "convert them to safetensors"], load, str(dream))


def test_shape_mismatch_hidden_size(dream):
    edit_json(dream / "config.json", hidden_size=128)
    raises(["tensor shape mismatch", "(264, 64)", "(264, 128)",
            "config.json that was shipped with these weights"], load, str(dream))


@pytest.mark.parametrize("family,key", [("dream", "vocab_size"), ("llada", "embedding_size")])
def test_shape_mismatch_vocab(tiny_dir, tmp_path, family, key):
    d = copy_ckpt(tiny_dir(family), tmp_path / "ck")
    edit_json(d / "config.json", **{key: 512})
    raises(["tensor shape mismatch", "512", "config.json that was shipped with these weights"], load, str(d))


def test_tensor_missing(dream):
    sd = load_file(dream / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, dream / "model.safetensors")
    raises(["lacks 1 tensor", "model.layers.1.mlp.up_proj.weight", "incomplete"], load, str(dream))


def test_unexpected_tensor(llada):
    sd = load_file(llada / "model.safetensors")
    sd["model.transformer.blocks.0.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(sd, llada / "model.safetensors")
    raises(["unexpected tensor", "model.transformer.blocks.0.extra_proj.weight", "config.json that was shipped"],
           load, str(llada))


# ----------------------------------------------------------------------------------------------- dtype/device
@pytest.mark.parametrize("dtype", ["float8", "int8", torch.float8_e4m3fn, torch.int32])
def test_unsupported_dtype(dream, dtype):
    raises(["unsupported dtype", "float32, float16, bfloat16"], load, str(dream), dtype=dtype)


def test_cuda_requested_without_gpu(dream, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raises(["no CUDA GPU", "--device cpu"], load, str(dream), device="cuda")
    assert resolve_device("auto").type == "cpu"


def test_cuda_index_out_of_range(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    raises(["cuda:3", "does not exist", "1 GPU"], resolve_device, "cuda:3")


def test_unknown_device():
    raises(["unknown device", "use cpu, cuda"], resolve_device, "tpu9")


def _fake_gpu(monkeypatch, name: str, cap: tuple[int, int]) -> None:
    """A visible GPU of a given compute capability. is_bf16_supported() says True as torch does on pre-Ampere
    GPUs by default (it counts bf16 emulation), so only a capability check can catch them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.bfloat16])
def test_bf16_on_gpu_without_bf16(monkeypatch, dtype):
    _fake_gpu(monkeypatch, "Tesla T4", (7, 5))
    dev = resolve_device("cuda")
    raises(["Tesla T4", "bfloat16", "--dtype float16"], resolve_dtype, dtype, dev)
    assert resolve_dtype("float16", dev) == torch.float16


def test_bf16_on_ampere_is_accepted(monkeypatch):
    _fake_gpu(monkeypatch, "NVIDIA A100", (8, 0))
    assert resolve_dtype("bfloat16", resolve_device("cuda:0")) == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_load_close_to_fp32(family, tiny_dir):
    """bf16 parameters are exactly the fp32 ones rounded; logits agree to bf16 accuracy (max abs error over
    max abs logit; about 0.6% for the tiny models, 3% is the bound)."""
    m32, _, ck = load(str(tiny_dir(family)), dtype="float32")
    m16, _, _ = load(str(tiny_dir(family)), dtype="bfloat16")
    p32 = dict(m32.named_parameters())
    for n, p in m16.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, p32[n].bfloat16()), n
    l32 = logits_of(m32, ck.args.vocab_size).double()
    l16 = logits_of(m16, ck.args.vocab_size)
    assert l16.dtype == torch.bfloat16
    err = ((l16.double() - l32).abs().max() / l32.abs().max()).item()
    assert 0 < err < 3e-2, err


def test_bf16_checkpoint_loads_exactly_into_fp32(tmp_path):
    """A bf16 checkpoint (as real ones ship) upcasts losslessly; a bf16 load of it is bit-identical to the file."""
    d = make_tiny("dream", tmp_path / "bf16", seed=2, dtype=torch.bfloat16, max_shard_bytes=30_000)
    stored = {k: v for f in sorted(d.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    m32, _, _ = load(str(d), dtype="float32")
    m16, _, _ = load(str(d), dtype="bfloat16")
    sd32, sd16 = m32.state_dict(), m16.state_dict()
    for k, v in stored.items():
        assert v.dtype == torch.bfloat16
        assert sd32[k].dtype == torch.float32 and torch.equal(sd32[k], v.float()), k
        assert torch.equal(sd16[k], v), k


def test_weights_are_read_not_mapped(tmp_path):
    """The loaded model must not be a view of the files: overwriting the weights on disk after loading (a
    re-download in place) must not change it. safetensors' default mmap tensors would see the new bytes."""
    d = make_tiny("dream", tmp_path / "c", dtype=torch.bfloat16)
    f = d / "model.safetensors"
    want = {k: v.clone() for k, v in load_file(f).items()}
    model, _, _ = load(str(d), dtype="bfloat16")
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    with open(f, "r+b") as fh:
        fh.seek(header)
        fh.write(bytes(f.stat().st_size - header))
    assert not any(load_file(f)[k].any() for k in want)  # the file really changed
    sd = model.state_dict()
    for k, v in want.items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("chunk", [1000, 1 << 30])
def test_chunked_conversion_is_exact(tmp_path, monkeypatch, chunk):
    """Conversions go through a bounded buffer (1000 bytes: many chunks and a ragged tail; 1 GiB: one chunk)."""
    d = make_tiny("llada", tmp_path / "c", seed=4, dtype=torch.bfloat16, max_shard_bytes=40_000)
    want = {k: v for f in sorted(d.glob("model-*.safetensors")) for k, v in load_file(f).items()}
    monkeypatch.setattr(loading, "_CHUNK_BYTES", chunk)
    from dlmtrt.models.families.llada import checkpoint_to_ours
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sd = load(str(d), dtype=dtype)[0].state_dict()
        for k, v in want.items():
            assert sd[checkpoint_to_ours(k)].dtype == dtype and torch.equal(sd[checkpoint_to_ours(k)], v.to(dtype)), k


def test_quantized_tensor_is_refused(dream):
    sd = load_file(dream / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int8)
    save_file(sd, dream / "model.safetensors")
    raises(["model.norm.weight", "stored as I8", "only unquantised", "use the original"], load, str(dream))


# ----------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_json_missing(dream):
    (dream / "tokenizer.json").unlink()
    raises(["tokenizer.json missing", "copy the tokenizer files"], load, str(dream))


def test_tokenizer_of_other_family(dream, llada):
    """LLaDA's tokenizer next to Dream's weights: its mask token is not the one the config names."""
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llada / f, dream / f)
    raises(["does not match the model", "<|mdm_mask|>", "mask_token_id=259", "use the tokenizer shipped"],
           load, str(dream))


@pytest.mark.parametrize("family", FAMILIES)
def test_config_mask_id_not_the_tokenizers(tiny_dir, tmp_path, family):
    d = copy_ckpt(tiny_dir(family), tmp_path / "ck")
    for f in ("config.json", "generation_config.json"):
        edit_json(d / f, mask_token_id=3)
    raises(["does not match the model", "mask token", "mask_token_id=3", "use the tokenizer shipped"], load, str(d))


def test_corrupt_tokenizer_json(dream):
    (dream / "tokenizer.json").write_text("{broken")
    raises(["cannot load the tokenizer", "re-download tokenizer.json"], load, str(dream))


def test_open_checkpoint_reads_no_weights(dream):
    """Config errors surface before any weight is touched: a corrupt weight file does not mask them."""
    (dream / "model.safetensors").write_bytes(b"")
    ck = open_checkpoint(str(dream))
    assert ck.family == "dream" and ck.weight_files == [dream / "model.safetensors"]
    raises(["corrupt safetensors file"], loading.load_weights, ck, torch.float32, torch.device("cpu"))
