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
from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend, buckets_for
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
    assert buckets_for(768) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768]
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
