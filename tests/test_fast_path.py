"""The fast path on the CPU: the torch-graph backend (one in-place cache buffer, rows padded to buckets, static
buffers; CUDA graphs only on a GPU, bench/gpu_graph_check.py) decodes exactly what the eager backend decodes,
for every policy, and `dlmtrt bench` runs at tiny shape."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dlmtrt.cli import main
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
from dlmtrt.runtime.buckets import row_buckets as buckets_for
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.params import greedy_params

PROMPTS = ["sudoku\n0120\n4231\n2000\n0040\n", "countdown 3 4 5 -> 17\n", "hi"]
POLICIES = {"dream": ["none", "decode", "decode:shift=right", "prefill", "pd", "adaptive", "delayed",
                      "none+early", "decode+early"],
            "llada": ["none", "decode", "block", "dual", "adaptive", "delayed", "dual+parallel", "decode+early"]}


@pytest.fixture(scope="module")
def pairs():
    out = {}
    for fam in ("dream", "llada"):
        ref, tok, _ = make_backend("torch", f"tiny-{fam}-tasks")
        fast, _, _ = make_backend("torch-graph", f"tiny-{fam}-tasks")
        out[fam] = (ref, fast, tok)
    return out


@pytest.mark.parametrize("family,policy,blocks", [(f, p, b) for f in ("dream", "llada") for p in POLICIES[f]
                                                  for b in ((None, 2) if f == "dream" else (2,))
                                                  if b is None or p in ("none", "decode", "none+early")])
def test_graph_backend_decodes_what_the_eager_one_does(pairs, family, policy, blocks):
    ref, fast, tok = pairs[family]
    p = greedy_params(family, 20, blocks=blocks)
    a = generate_text(ref, tok, PROMPTS, policy=policy, **p)
    b = generate_text(fast, tok, PROMPTS, policy=policy, **p)
    assert torch.equal(a.sequences, b.sequences)
    assert a.stats.rows_computed == b.stats.rows_computed and a.stats.steps == b.stats.steps


def test_llada_greedy_and_sampling_paths_too(pairs):
    ref, fast, tok = pairs["llada"]
    for kw in (dict(remasking="random", policy="greedy"), dict(remasking="random", policy="decode"),
               dict(temperature=0.7, policy="dual")):
        p = {**greedy_params("llada", 16, blocks=2), **{k: v for k, v in kw.items() if k != "policy"}}
        torch.manual_seed(3)
        a = generate_text(ref, tok, PROMPTS, policy=kw["policy"], **p)
        torch.manual_seed(3)
        b = generate_text(fast, tok, PROMPTS, policy=kw["policy"], **p)
        assert torch.equal(a.sequences, b.sequences), kw


def test_buckets_and_in_place_cache(pairs):
    assert buckets_for(768) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768]
    assert buckets_for(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert buckets_for(768, 8)[0] == 8 and buckets_for(5) == [1, 2, 4, 5]
    _, fast, _ = pairs["dream"]
    keys, values = fast.new_cache(2, 24)
    assert all(k.data_ptr() == fast.kv[i, 0].data_ptr() for i, k in enumerate(keys))
    assert fast._bucket(1, 24) == 1 and fast._bucket(9, 24) == 16 and fast._bucket(17, 24) == 24
    with pytest.raises(ValueError, match="its own new_cache"):
        from dlmtrt.runtime.contract import StepInputs
        other = [torch.zeros_like(k) for k in keys]
        fast.step(StepInputs(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), other, other,
                             torch.zeros(2, 24, dtype=torch.bool), torch.ones(2, 24, dtype=torch.bool)))
    assert isinstance(fast, TorchGraphBackend) and not fast.graphs  # no capture on the CPU


@pytest.mark.parametrize("shape", ["tiny-dream", "tiny-llada"])
def test_bench_runs_at_tiny_shape(tmp_path, monkeypatch, shape):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["bench", "--shape", shape, "--prompt", "16", "--answer", "16", "--policy", "none",
                                  "--policy", "decode", "--policy", "dual", "--block-length", "8"])
    assert r.exit_code == 0, r.output
    rep = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    assert [run["policy"] for run in rep["runs"]] == ["none", "decode", "dual"]
    by = {run["policy"]: run for run in rep["runs"]}
    assert by["none"]["rows_per_step"] == 32 and by["decode"]["rows_per_step"] < 32 and by["dual"]["rows_per_step"] < 32
    assert all(run["steps"] == 16 and run["tokens_per_s"] > 0 for run in rep["runs"])
    assert rep["params"] > 0 and rep["weight_bytes"] > 0 and rep["single_row_step_ms"] > 0


def test_fused_projections_and_selected_logit_rows_match_the_plain_step():
    """q|k|v and gate|up fused, the head on chosen rows only, drift skipped: the same numbers as the plain
    model's step (fp32, 1e-5), and the fused model's weights are the unfused ones (no extra copy kept)."""
    from dlmtrt.evals.speed import random_model, shape_args
    from dlmtrt.runtime.contract import StepInputs
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    for shape in ("tiny-dream", "tiny-llada"):
        plain = random_model(shape_args(shape), "cpu", torch.float32, seed=1)
        fused = random_model(shape_args(shape), "cpu", torch.float32, seed=1)
        n_before = sum(p.numel() for p in fused.parameters())
        fast = TorchGraphBackend(fused)
        assert sum(p.numel() for p in fused.parameters()) == n_before
        assert fused.model.layers[0].self_attn.qkv_proj is not None and not hasattr(fused.model.layers[0].mlp, "up_proj")
        ref = TorchBackend(plain)
        B, L, A = 2, 20, 6
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 250, (B, A), generator=g)
        pos = torch.stack([torch.randperm(L, generator=g)[:A].sort().values for _ in range(B)])
        stable = torch.rand(B, L, generator=g) < 0.5
        am = torch.ones(B, L, dtype=torch.bool)
        am[1, :3] = False
        rows = torch.tensor([[5, 0, 2], [1, 1, 4]])
        kr, vr = ref.new_cache(B, L)
        kf, vf = fast.new_cache(B, L)
        for k, v, k2, v2 in zip(kr, vr, kf, vf):
            k.normal_(generator=g), v.normal_(generator=g)
            k2.copy_(k), v2.copy_(v)
        a = ref.step(StepInputs(ids, pos, kr, vr, stable, am))
        b = fast.step(StepInputs(ids, pos, kf, vf, stable, am, logit_rows=rows, need_drift=False))
        want = a.logits.gather(1, rows[..., None].expand(-1, -1, a.logits.shape[-1]))
        assert b.logits.shape == want.shape
        assert ((b.logits - want).norm() / want.norm()) < 1e-5
        for x, y in zip(a.present_keys + a.present_values, b.present_keys + b.present_values):
            assert ((x - y).norm() / x.norm()) < 1e-5
        assert torch.equal(a.present_valid, b.present_valid) and not b.kv_drift.any()
        for k, v, k2, v2 in zip(kr, vr, kf, vf):  # the in-place step overwrote the rows: restore the past
            k2.copy_(k), v2.copy_(v)
        c = fast.step(StepInputs(ids, pos, kf, vf, stable, am, logit_rows=rows, need_drift=True))
        assert torch.allclose(c.kv_drift, a.kv_drift, rtol=1e-5) and c.kv_drift[stable.gather(1, pos)].gt(0).all()


def test_graph_backend_with_classifier_free_guidance(pairs):
    ref, fast, tok = pairs["llada"]
    from dlmtrt.runtime.generate import llada_generate
    ids = torch.tensor([tok.encode("countdown 3 4 5 -> 17\n")])
    a, _ = llada_generate(ref, ids, steps=8, gen_length=8, block_length=4, cfg_scale=1.5, policy="none")
    b, _ = llada_generate(fast, ids, steps=8, gen_length=8, block_length=4, cfg_scale=1.5, policy="none")
    assert torch.equal(a, b)


def test_a_generation_captures_a_few_shapes_and_holds_one_logits_buffer(pairs):
    """Dream's candidates are every masked row, so their count changes at each step: padded to buckets, a
    64-step generation keys at most (row bucket, logit bucket) pairs, and every key's logits live in one
    shared buffer (a graph per step, each holding [B, R, V] logits, was 74 GiB at 7B and B=8)."""
    _, fast, tok = pairs["dream"]
    fast._drop_graphs()
    p = greedy_params("dream", 64)
    out = generate_text(fast, tok, PROMPTS, policy="decode", **p)
    assert out.stats.steps == 64
    keys = list(fast._static.entries)
    L = keys[0][2]
    n_buckets = len(buckets_for(L))
    assert len(keys) <= 2 * n_buckets, keys
    assert all(r is not None and r <= a and r in buckets_for(L) for _, a, _, r, _, _ in keys)
    ptrs = {st["logits"].data_ptr() for st in fast._static.entries.values()}
    assert ptrs == {fast._logits.data_ptr()}
    R = max(k[3] for k in keys)
    assert fast._logits.numel() == len(PROMPTS) * R * fast.info.vocab_size


def test_compiled_step_writes_the_cache_in_place_without_copying_it():
    """torch.compile (CPU inductor here; the GPU one lowers the same graph) of the graph backend's step: the
    fresh K/V are stored into the cache buffer by the kernel that computes them. No buffer spanning the canvas is
    allocated (a scatter into a graph input became a scatter into a full copy of each layer's K and V, plus a
    copy back), and the compiled steps decode what the eager backend decodes."""
    import re

    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    ref, tok, _ = make_backend("torch", "tiny-dream-tasks")
    from dlmtrt.models.loading import load
    fast = TorchGraphBackend(load("tiny-dream-tasks")[0], compile=True)
    p = greedy_params("dream", 12)
    _, codes = run_and_get_code(lambda: generate_text(fast, tok, PROMPTS[:2], policy="decode", **p))
    assert codes, "nothing was compiled"
    D = str(fast.model.args.head_dim)
    for code in codes:
        caches = {sh for sh in re.findall(r"assert_size_stride\(\w+, \(([^)]*)\), \([^)]*\), 'input'\)", code)
                  if len(sh.split(",")) == 4 and sh.split(",")[3].strip() == D}  # the K/V inputs [B, Hkv, L, D]
        allocated = set(re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code))
        assert caches and not caches & allocated, caches & allocated
        assert not re.search(r"(?<!_to)_copy__", code), "a copy_ kernel writes a cache back"
    a = generate_text(ref, tok, PROMPTS[:2], policy="decode", **p)
    b = generate_text(fast, tok, PROMPTS[:2], policy="decode", **p)
    assert torch.equal(a.sequences, b.sequences)
    torch._dynamo.reset()


def test_compiled_backends_in_one_process_do_not_run_out_of_dynamo_graphs(monkeypatch):
    """Every compiled backend's step is the same code object to dynamo, which allows 8 graphs per code object by
    default; each model and each drift setting is one more, and with fullgraph the 9th step raised instead of
    falling back (found on the GPU with the four tiny models of `COMPILE=1 bench/gpu_graph_check.py`). Dynamo's
    eager backend keeps the tracing and guards and skips inductor, so this stays quick."""
    import functools

    from dlmtrt.models.loading import load
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    runs = [(fam, dtype) for fam in ("dream", "llada") for dtype in ("float32", "bfloat16")] + [("dream", "float32")]
    for fam, dtype in runs:
        ref, tok, _ = make_backend("torch", f"tiny-{fam}-tasks", dtype=dtype)
        fast = TorchGraphBackend(load(f"tiny-{fam}-tasks", dtype=dtype)[0], compile=True)
        for policy in ("none", "adaptive"):  # adaptive reads the K/V drift: a second graph per model
            p = greedy_params(fam, 8, blocks=2)
            a = generate_text(ref, tok, PROMPTS[:2], policy=policy, **p)
            b = generate_text(fast, tok, PROMPTS[:2], policy=policy, **p)
            assert torch.equal(a.sequences, b.sequences), (fam, dtype, policy)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 8
    torch._dynamo.reset()
