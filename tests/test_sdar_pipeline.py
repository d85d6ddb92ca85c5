"""The SDAR family through every stage on a tiny random checkpoint (`make-tiny --arch sdar`): generate, eval,
export and ONNX Runtime (token-identical in fp32), build-engine with standard attention and with the plugin in its
block-causal mode (TensorRT-RTX on the CPU; nothing executes an engine here), the TensorRT backend through an
emulated execution context, compare, calibrate, serve, bench;
and cross-request prefix reuse, exact for a block-causal family: answers identical with and without the store."""
from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from dlmtrt.cli import main
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.params import family_params

PROMPTS = ["sudoku\n0120\n4231\n2000\n0040\n", "hello", "countdown 3 4 5 -> 17\n"]
GREEDY = dict(max_new_tokens=16, top_k=1, remasking="low_confidence_static")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("sdar") / "ckpt"
    r = CliRunner().invoke(main, ["make-tiny", "--arch", "sdar", "--out", str(d), "--seed", "3"])
    assert r.exit_code == 0, r.output
    return d


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory):
    from dlmtrt.export.onnx_export import export_step
    out = tmp_path_factory.mktemp("sdar_onnx") / "export"
    res = export_step(str(ckpt), out, log=lambda m: None)
    assert res.checks is not None and res.checks.ok
    return out


def _greedy(ckpt) -> dict:
    return family_params("sdar", ckpt, **GREEDY)


def test_the_checkpoint_is_block_causal(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == "sdar" and cfg["block_size"] == 4
    be, _, src = make_backend("torch", str(ckpt))
    assert src.args.attention == "block_causal:4" and src.args.qk_norm and be.info.stop_ids == (258, 256)


def test_generate_and_eval(ckpt, tmp_path):
    r = CliRunner().invoke(main, ["generate", "-m", str(ckpt), "-p", "hello", "-n", "16", "--top-k", "1", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["policy"] == "append" and doc["params"]["block_length"] == 4 and doc["params"]["top_k"] == 1
    r = CliRunner().invoke(main, ["generate", "-m", str(ckpt), "-p", "hello", "--policy", "decode"])
    assert r.exit_code == 2 and "block-causal" in r.output
    r = CliRunner().invoke(main, ["generate", "-m", str(ckpt), "-p", "hello", "--remasking", "entropy_bounded"])
    assert r.exit_code == 2 and "entropy_bounded fails in the authors' code" in r.output
    out = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["eval", "-m", str(ckpt), "--task", "sudoku4", "--n", "2", "-o", str(out),
                                  "--policy", "none", "--policy", "append"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["results"]
    assert [x["policy"] for x in rows] == ["none", "append"] and rows[1]["rows_fraction"] < rows[0]["rows_fraction"]
    assert rows[0]["accuracy"] == rows[1]["accuracy"]  # the cache is exact: the same answers


def test_onnxruntime_is_token_identical(ckpt, export_dir):
    from dlmtrt.runtime.artifacts import onnx_metadata, read_metadata
    args, meta = read_metadata(onnx_metadata(export_dir / "model.onnx"), export_dir)
    assert meta["attention_kind"] == "block_causal:4" and args.qk_norm
    ref, tok, _ = make_backend("torch", str(ckpt))
    ort, ort_tok, _ = make_backend("onnxruntime", str(export_dir))
    p = _greedy(ckpt)
    a = generate_text(ref, tok, PROMPTS, policy="append", **p)
    b = generate_text(ort, ort_tok, PROMPTS, policy="append", **p)
    assert torch.equal(a.sequences, b.sequences)
    with pytest.raises(ValueError, match="computes attention block_causal:4, the generation asks for block_causal:8"):
        generate_text(ort, ort_tok, PROMPTS[:1], policy="append", **{**p, "block_length": 8, "denoising_steps": 8})


def test_torch_graph_is_token_identical(ckpt):
    """The fast path's in-place cache and row buckets (no CUDA graphs on the CPU): the block step computes the
    current block's rows over the cache, per step's attention kind, and decodes what eager torch does."""
    ref, tok, _ = make_backend("torch", str(ckpt))
    fast, _, _ = make_backend("torch-graph", str(ckpt))
    for p in (_greedy(ckpt), {**_greedy(ckpt), "block_length": 8, "denoising_steps": 4,
                              "remasking_strategy": "low_confidence_dynamic"}):
        for pol in ("append", "none"):
            a = generate_text(ref, tok, PROMPTS, policy=pol, **p)
            b = generate_text(fast, tok, PROMPTS, policy=pol, **p)
            assert torch.equal(a.sequences, b.sequences), (pol, p["block_length"])


def test_engines_build_with_standard_attention_and_the_block_causal_plugin(ckpt, export_dir, tmp_path):
    from dlmtrt.engine.build import build_engine
    from dlmtrt.export.onnx_export import export_step
    res = build_engine(export_dir, tmp_path / "std.engine")
    assert res.manifest["plugin"] is None and json.loads(res.manifest["onnx"]["metadata"]["dlmtrt.model_args"])[
        "attention"] == "block_causal:4"
    plug = export_step(str(ckpt), tmp_path / "plugin", attention="plugin", log=lambda m: None)
    nodes = [n for n in onnx.load(str(plug.onnx_path), load_external_data=False).graph.node
             if n.op_type == "CachedAttention"]
    attrs = {a.name: a.i for a in nodes[0].attribute if a.type == onnx.AttributeProto.INT}
    assert len(nodes) == 2 and attrs["mask_type"] == 1 and attrs["block_size"] == 4
    res = build_engine(tmp_path / "plugin", tmp_path / "plugin.engine")
    assert res.manifest["plugin"]["onnx_nodes"] == 2


def test_the_tensorrt_backend_through_its_bindings_is_token_identical(ckpt, export_dir, tmp_path):
    """The TensorRT backend's bindings, row buckets and the block-causal kind from the engine's manifest, driven by
    the emulated execution context (it runs the exported graph with ONNX Runtime on the bound tensors): the same
    tokens as torch, and a generation asking for another block length is refused."""
    from test_tensorrt_backend import EmulatedContext, write_manifest

    from dlmtrt.runtime.backends.tensorrt_backend import TensorRTBackend
    ref, tok, _ = make_backend("torch", str(ckpt))
    ctx = EmulatedContext(export_dir, ref.info.num_layers)
    be = TensorRTBackend(write_manifest(export_dir, tmp_path), device="cpu", context=ctx)
    ctx.backend = be
    assert be.info == ref.info and be.info.attention == "block_causal:4"
    p = _greedy(ckpt)
    a = generate_text(ref, tok, PROMPTS, policy="append", **p)
    b = generate_text(be, tok, PROMPTS, policy="append", **p)
    assert torch.equal(a.sequences, b.sequences) and be.enqueues == b.stats.steps
    with pytest.raises(ValueError, match="block_causal:8"):
        generate_text(be, tok, PROMPTS[:1], policy="append", **{**p, "block_length": 8, "denoising_steps": 8})


def test_compare_and_calibrate(ckpt, export_dir, tmp_path):
    r = CliRunner().invoke(main, ["compare", "-m", str(ckpt), "--onnx", str(export_dir), "--backends",
                                  "torch,onnxruntime", "--steps-per-policy", "2"])
    assert r.exit_code == 0 and "within tolerance" in r.output, r.output
    r = CliRunner().invoke(main, ["calibrate", "-m", str(ckpt), "--format", "fp8", "--task", "sudoku4", "--samples",
                                  "4", "--out", str(tmp_path / "fp8")])
    assert r.exit_code == 0, r.output
    be, tok, src = make_backend("torch", str(tmp_path / "fp8"))
    assert src.family == "sdar" and generate_text(be, tok, ["hi"], policy="append", **_greedy(ckpt)).texts


def test_prefix_reuse_is_exact(ckpt):
    """A shared instruction before different questions: with the store (the first request fills it) every
    answer is the one computed without it, and the later requests' prompt blocks came from the store."""
    from dlmtrt.runtime.prefix import PrefixStore
    be, tok, _ = make_backend("torch", str(ckpt))
    shared = "You solve puzzles. Answer with the digits only, nothing else. "
    prompts = [shared + q for q in ("sudoku 0120", "countdown 3 4 5", "shift 3 abc", "sudoku 4231")]
    p = _greedy(ckpt)
    plain = [generate_text(be, tok, [q], policy="append", **p) for q in prompts]
    store = PrefixStore(1 << 24)
    reused = [generate_text(be, tok, [q], policy="append", prefix_store=store, **p) for q in prompts]
    for a, b in zip(plain, reused):
        assert torch.equal(a.sequences, b.sequences)
    assert reused[0].stats.prefix_rows == 0 and all(r.stats.prefix_rows >= 48 for r in reused[1:])
    assert all(r.stats.rows_computed < a.stats.rows_computed for a, r in zip(plain[1:], reused[1:]))


def test_serve_answers_as_offline_with_the_store_on_by_default(ckpt):
    from fastapi.testclient import TestClient

    from dlmtrt.cli.serve import prefix_cache_bytes
    from dlmtrt.serve.app import ServeConfig, Served, create_app
    assert prefix_cache_bytes(None, "sdar") > 0 and prefix_cache_bytes(None, "llada") == 0
    be, tok, src = make_backend("torch", str(ckpt))
    served = Served(be, tok, src, ServeConfig(model_id="sdar", prefix_cache_bytes=prefix_cache_bytes(None, "sdar")))
    offline = generate_text(be, tok, PROMPTS[:2], policy="append", **_greedy(ckpt)).texts
    with TestClient(create_app(served)) as client:
        for _ in range(2):  # the second round finds the prompts' blocks in the store
            for prompt, want in zip(PROMPTS[:2], offline):
                r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 16, "top_k": 1,
                                                         "remasking": "low_confidence_static"})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want
        bad = client.post("/v1/completions", json={"prompt": "x", "policy": "dual"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "policy"
    assert served.scheduler.prefix_store.stats.hit_rows > 0


def test_bench_at_the_tiny_shape(tmp_path):
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny-sdar", "--prompt", "40", "--answer", "32", "-o", str(out)])
    assert r.exit_code == 0, r.output
    runs = json.loads(out.read_text())["runs"]
    assert [x["policy"] for x in runs] == ["none", "append"] and runs[1]["rows_per_step"] < runs[0]["rows_per_step"]
