"""calibration/ and the 8-bit formats: trajectory canvases stratified by mask ratio, activation statistics,
QuantLinear's arithmetic, SmoothQuant's folding, `dlmtrt calibrate` end to end (the checkpoint loads, decodes
close to the float model, carries its statistics), the Q/DQ ONNX export (numerically checked against the
checkpoint by ONNX Runtime, and built by TensorRT where installed), and the refusals."""
from __future__ import annotations

import importlib.util
import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from dlmtrt.calibration import canvases as cv
from dlmtrt.calibration.quantize import smooth
from dlmtrt.calibration.statistics import collect
from dlmtrt.cli import main
from dlmtrt.evals.tasks import get_task
from dlmtrt.models.loading import CheckpointError, load, open_checkpoint
from dlmtrt.models.quantized import FP8, QuantLinear, fp8_supported, quantize_input, quantize_weight
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.backends.torch_backend import TorchBackend

PROMPTS = [p.prompt for p in get_task("sudoku4").problems(6, 99)] + [p.prompt for p in get_task("countdown").problems(6, 99)]


@pytest.fixture(scope="module")
def dream():
    return make_backend("torch", "tiny-dream-tasks")


@pytest.fixture(scope="module")
def recorded(dream):
    be, tok, _ = dream
    return cv.record(be, tok, PROMPTS, new_tokens=32, batch=6)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """calibrated(fmt) -> checkpoint directory written by the CLI (small calibration set)."""
    cache = {}

    def get(fmt: str, family: str = "dream"):
        if (fmt, family) not in cache:
            out = tmp_path_factory.mktemp(f"q_{family}_{fmt}") / "ckpt"
            r = CliRunner().invoke(main, ["calibrate", "-m", f"tiny-{family}-tasks", "--format", fmt, "--task",
                                          "sudoku4", "--task", "countdown", "--samples", "8", "--per-stratum", "4",
                                          "--batch", "16", "--out", str(out)])
            assert r.exit_code == 0, r.output
            cache[fmt, family] = out
        return cache[fmt, family]
    return get


def test_trajectories_cover_every_noise_level(recorded):
    assert len(recorded) == len(PROMPTS) * 32  # one canvas per step per prompt
    ratios = [c.ratio for c in recorded]
    assert max(ratios) == 1.0 and min(ratios) < 0.1  # down to the last step before the canvas is clean
    # recorded batch by batch (6 prompts), each batch step-major: prompt r of batch b at b*6*32 + step*6 + r
    per_prompt = [ratios[b * 192 + r:(b + 1) * 192:6] for b in range(2) for r in range(6)]
    assert all(r[0] == 1.0 and all(a >= b for a, b in zip(r, r[1:])) for r in per_prompt)


def test_stratified_draw(recorded):
    picked = cv.stratify(recorded, strata=4, per_stratum=5)
    counts = {}
    for c in picked:
        counts[cv.stratum_of(c.ratio, 4)] = counts.get(cv.stratum_of(c.ratio, 4), 0) + 1
    assert counts == {0: 5, 1: 5, 2: 5, 3: 5}
    assert all(c.ratio == 1.0 for c in cv.stratify(recorded, strata=4, per_stratum=2, masked_only=True))
    assert len(cv.stratify(recorded, strata=4, per_stratum=2, masked_only=True)) == 8
    assert cv.stratum_of(1.0, 4) == 3 and cv.stratum_of(0.25, 4) == 0 and cv.stratum_of(0.26, 4) == 1


def test_statistics_are_the_inputs_maxima(dream, recorded):
    be, tok, _ = dream
    model = be.model
    chosen = cv.stratify(recorded, strata=4, per_stratum=3)
    stats = collect(model, chosen, strata=4, pad_id=model.args.pad_token_id, batch=4)
    seen = []
    name = "model.layers.2.mlp.down_proj"
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        for ids, am, _ in cv.batches(chosen, 4, model.args.pad_token_id, "cpu"):
            with torch.no_grad():
                model.full_logits(ids, am)
            seen[-1] = seen[-1][am]
    finally:
        h.remove()
    x = torch.cat(seen).abs()
    assert stats[name].amax == pytest.approx(float(x.max()), rel=1e-6)
    assert torch.allclose(stats[name].channel_amax, x.amax(0))
    assert stats[name].percentiles["p99.9"] <= stats[name].percentiles["p99.99"] <= stats[name].amax
    assert set(stats[name].by_stratum) == {0, 1, 2, 3} and max(stats[name].by_stratum.values()) == stats[name].amax


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_weight_quantization_error_is_bounded(fmt):
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # channels of very different ranges
    q, s = quantize_weight(w, fmt)
    assert q.dtype == (FP8 if fmt == "fp8" else torch.int8)
    err = (q.float() * s[:, None] - w).abs() / w.abs().amax(1, keepdim=True)
    assert float(err.max()) <= (2 ** -4 if fmt == "fp8" else 0.5 / 127 + 1e-6)  # per-channel scales: every row fits


@pytest.mark.parametrize("fmt", ["fp8", "int8-wo", "w8a8"])
@torch.no_grad()
def test_quant_linear_arithmetic(fmt):
    lin = torch.nn.Linear(48, 40, bias=True)
    x = torch.randn(3, 5, 48)
    s = float(x.abs().max()) / (448 if fmt == "fp8" else 127)
    q = QuantLinear.from_linear(lin, fmt, s if fmt != "int8-wo" else None)
    w = q.weight.float() * q.weight_scale[:, None]
    xin = x if fmt == "int8-wo" else quantize_input(x, q.input_scale, "fp8" if fmt == "fp8" else "w8a8").float() * s
    assert torch.allclose(q(x), F.linear(xin, w, lin.bias), atol=1e-5, rtol=1e-5)
    rel = float((q(x) - lin(x)).norm() / lin(x).norm())
    assert rel < (0.06 if fmt == "fp8" else 0.02)
    fused = QuantLinear.concat([q, q])
    assert torch.equal(fused(x), torch.cat([q(x), q(x)], -1))
    assert not fp8_supported(torch.device("cpu"))  # the CPU always runs the emulation


def test_smoothquant_folding_keeps_the_float_function(dream, recorded):
    model, _, _ = load("tiny-dream-tasks")
    chosen = cv.stratify(recorded, strata=2, per_stratum=4)
    stats = collect(model, chosen, strata=2, pad_id=model.args.pad_token_id, batch=4)
    ids, am, _ = cv.batches(chosen, 8, model.args.pad_token_id, "cpu")[0]
    with torch.no_grad():
        before = model.full_logits(ids, am)
        new_amax = smooth(model, stats, 0.5)
        after = model.full_logits(ids, am)
    assert float((after - before).norm() / before.norm()) < 1e-5
    name = "model.layers.0.self_attn.q_proj"
    assert new_amax[name] < stats[name].amax  # the outliers moved into the weights


@pytest.mark.parametrize("fmt,bound", [("fp8", 0.15), ("int8-wo", 0.03), ("w8a8", 0.15)])
def test_calibrated_checkpoint_loads_and_decodes_close_to_float(calibrated, dream, fmt, bound):
    path = calibrated(fmt)
    report = json.loads((path / "quantization.json").read_text())
    assert report["format"] == fmt and report["calibration"]["canvases_per_stratum"] == {str(k): 4 for k in range(8)}
    assert len(report["layers"]) == 6 * 7 and "lm_head" in report["excluded"]
    assert json.loads((path / "config.json").read_text())["quantization_config"] == {"quant_method": "dlmtrt",
                                                                                      "format": fmt}
    qbe, tok, _ = make_backend("torch", str(path))
    lin = qbe.model.model.layers[0].mlp.down_proj
    assert isinstance(lin, QuantLinear) and lin.fmt == fmt
    be = dream[0]
    ids = tok(PROMPTS[:4], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        ref = be.model.full_logits(ids["input_ids"], ids["attention_mask"].bool())
        got = qbe.model.full_logits(ids["input_ids"], ids["attention_mask"].bool())
    assert float((got - ref).norm() / ref.norm()) < bound
    agree = (got.argmax(-1) == ref.argmax(-1))[ids["attention_mask"].bool()].float().mean()
    assert agree > 0.9
    TorchBackend(qbe.model)  # the torch backend takes it as it is; the graph backend fuses q|k|v of QuantLinears:
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    fast = TorchGraphBackend(load(str(path))[0])
    assert isinstance(fast.model.model.layers[0].self_attn.qkv_proj, QuantLinear)


def test_llada_calibrates_too(calibrated):
    path = calibrated("fp8", "llada")
    be, tok, _ = make_backend("torch", str(path))
    from dlmtrt.runtime.generate import generate_text
    out = generate_text(be, tok, PROMPTS[:2], gen_length=16, steps=16, block_length=16)
    assert len(out.texts) == 2


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, calibrated):
    run = CliRunner().invoke
    r = run(main, ["calibrate", "-m", "tiny-dream-tasks", "--format", "int4", "--task", "sudoku4", "--out",
                   str(tmp_path / "a")])
    assert r.exit_code == 2 and "'int4' is not one of" in r.output and not (tmp_path / "a").exists()
    r = run(main, ["calibrate", "-m", "tiny-dream-tasks", "--format", "fp8", "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "no calibration data" in r.output and "--prompts FILE" in r.output
    assert not (tmp_path / "b").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep")
    r = run(main, ["calibrate", "-m", "tiny-dream-tasks", "--format", "fp8", "--task", "sudoku4", "--out",
                   str(tmp_path / "c")])
    assert r.exit_code == 2 and "not empty" in r.output and (tmp_path / "c" / "x").read_text() == "keep"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    r = run(main, ["calibrate", "-m", "tiny-dream-tasks", "--format", "fp8", "--prompts", str(empty), "--out",
                   str(tmp_path / "d")])
    assert r.exit_code == 2 and "has no prompt" in r.output and not (tmp_path / "d").exists()
    r = run(main, ["calibrate", "-m", str(calibrated("fp8")), "--format", "w8a8", "--task", "sudoku4", "--out",
                   str(tmp_path / "e")])
    assert r.exit_code == 2 and "already quantised" in r.output and not (tmp_path / "e").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    from dlmtrt.calibration import quantize as qmod
    from dlmtrt.calibration.pipeline import calibrate

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(qmod, "save_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        calibrate("tiny-dream-tasks", "fp8", tmp_path / "out", PROMPTS[:2], new_tokens=8, per_stratum=1)
    assert list(tmp_path.iterdir()) == []


def test_foreign_quantized_checkpoints_are_refused(tmp_path, calibrated):
    import shutil
    d = tmp_path / "ck"
    shutil.copytree(calibrated("int8-wo"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not read.*dlmtrt calibrate"):
        load(str(d))
    assert open_checkpoint(str(d)).config["quantization_config"]["quant_method"] == "gptq"


@pytest.fixture(scope="module")
def qdq(calibrated, tmp_path_factory):
    from dlmtrt.export.onnx_export import export_step
    cache = {}

    def get(fmt: str):
        if fmt not in cache:
            out = tmp_path_factory.mktemp(f"qdq_{fmt}") / "export"
            res = export_step(str(calibrated(fmt)), out, log=lambda m: None)
            cache[fmt] = (out, res)
        return cache[fmt]
    return get


@pytest.mark.parametrize("fmt", ["fp8", "int8-wo"])
def test_qdq_export_matches_the_checkpoint(qdq, fmt):
    out, res = qdq(fmt)
    assert res.checks.ok, res.checks.render_text()
    assert res.opset == (19 if fmt == "fp8" else 18)
    m = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in m.graph.node]
    inits = {i.name: i for i in m.graph.initializer}
    w = inits["model.layers.0.mlp.down_proj.weight"]
    assert w.data_type == (onnx.TensorProto.FLOAT8E4M3FN if fmt == "fp8" else onnx.TensorProto.INT8)
    assert ops.count("DequantizeLinear") >= 42  # every projection's weight
    if fmt == "int8-wo":
        assert "QuantizeLinear" not in ops
        worst = max(r.rel_err for r in res.checks.rows if r.output != "present_valid")
        assert worst < 1e-4  # no activation rounding: the dequantised weights are the checkpoint's
    else:
        assert ops.count("QuantizeLinear") >= 24  # one per distinct projection input (q|k|v and gate|up share)
    assert "lm_head.weight" in inits and inits["lm_head.weight"].data_type == onnx.TensorProto.FLOAT


def test_fp8_export_needs_opset_19(calibrated, tmp_path):
    r = CliRunner().invoke(main, ["export", "-m", str(calibrated("fp8")), "-o", str(tmp_path / "x"), "--opset", "18"])
    assert r.exit_code == 1 and "opset 19" in r.output and not (tmp_path / "x").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None,
                    reason="neither tensorrt nor tensorrt_rtx is installed")
def test_qdq_export_builds_an_engine(qdq, tmp_path):
    out, _ = qdq("fp8")
    r = CliRunner().invoke(main, ["build-engine", "--onnx", str(out), "--out", str(tmp_path / "q.engine"),
                                  "--profile", "batch=1:1:2,active=1:8:32,canvas=1:32:64"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "q.engine.json").read_text())
    assert manifest["layers"]["network_types"]["QUANTIZE"] >= 24
    assert manifest["layers"]["network_types"]["DEQUANTIZE"] >= 42
    assert (tmp_path / "q.engine").stat().st_size > 0


def test_keep_blocks_leaves_the_most_sensitive_blocks_unquantised(tmp_path, dream):
    src = open_checkpoint("tiny-dream-tasks")
    out = tmp_path / "kept"
    r = CliRunner().invoke(main, ["calibrate", "-m", "tiny-dream-tasks", "--format", "fp8", "--task", "sudoku4",
                                  "--samples", "8", "--per-stratum", "4", "--keep-blocks", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "block sensitivity" in r.output
    report = json.loads((out / "quantization.json").read_text())
    kl = report["block_sensitivity"]
    assert len(kl) == 6 and all(v > 0 for v in kl)
    worst = sorted(sorted(range(6), key=lambda i: -kl[i])[:2])
    kept = [f"model.layers.{i}.{sub}.{p}" for i in worst for sub, ps in
            (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
            for p in ps]
    assert sorted(report["unquantized"]) == sorted(kept)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["unquantized"] == report["unquantized"]
    assert len(report["layers"]) == 6 * 7 - 14
    model, ref = load(str(out))[0], load("tiny-dream-tasks")[0]
    for i in range(6):
        lin = model.model.layers[i].mlp.down_proj
        if i in worst:
            assert not isinstance(lin, QuantLinear)
            assert torch.equal(lin.weight, ref.model.layers[i].mlp.down_proj.weight)  # untouched source weights
        else:
            assert isinstance(lin, QuantLinear)
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    fast = TorchGraphBackend(load(str(out))[0])
    assert not isinstance(fast.model.model.layers[worst[0]].self_attn.qkv_proj, QuantLinear)
    from dlmtrt.export.onnx_export import export_step
    res = export_step(str(out), tmp_path / "onnx", log=lambda m: None)
    assert res.checks.ok, res.checks.render_text()
    inits = {i.name: i for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    assert inits[f"model.layers.{worst[0]}.mlp.down_proj.weight"].data_type == onnx.TensorProto.FLOAT
    other = next(i for i in range(6) if i not in worst)
    assert inits[f"model.layers.{other}.mlp.down_proj.weight"].data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert src.args.num_layers == 6


def test_block_sensitivity_is_the_kl_of_quantising_that_block_alone(dream, recorded):
    from dlmtrt.calibration.quantize import quantize
    from dlmtrt.calibration.sensitivity import block_names, block_sensitivity, predicts_mask
    be = dream[0]
    chosen = cv.stratify(recorded, strata=4, per_stratum=2)
    stats = collect(be.model, chosen, strata=4, pad_id=be.info.pad_token_id, batch=8)
    ids, am, _ = cv.batches(chosen, 64, be.info.pad_token_id, torch.device("cpu"))[0]
    with torch.no_grad():
        before = be.model.full_logits(ids, am)
    kl = block_sensitivity(be.model, chosen, "fp8", stats, mask_id=be.info.mask_token_id,
                           pad_id=be.info.pad_token_id, batch=64)
    with torch.no_grad():
        assert torch.equal(be.model.full_logits(ids, am), before)  # the model is left as it was
    m2 = load("tiny-dream-tasks")[0]
    others = frozenset(n for i in range(6) if i != 3 for n in block_names(m2, i))
    quantize(m2, "fp8", stats, keep=others)
    with torch.no_grad():
        lp, q = F.log_softmax(before.float(), -1), F.log_softmax(m2.full_logits(ids, am).float(), -1)
    sel = predicts_mask(ids, am, be.info.mask_token_id, shift=True)
    assert sel.sum() > 0 and not torch.equal(sel, (ids == be.info.mask_token_id) & am)  # Dream: row j-1
    expect = float((lp.exp() * (lp - q)).sum(-1)[sel].mean())
    assert kl[3] == pytest.approx(expect, rel=1e-5)


def test_keep_blocks_out_of_range_and_bad_unquantized_names_are_refused(tmp_path, calibrated):
    r = CliRunner().invoke(main, ["calibrate", "-m", "tiny-dream-tasks", "--format", "fp8", "--task", "sudoku4",
                                  "--keep-blocks", "6", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "between 0 and 5" in r.output and not (tmp_path / "a").exists()
    import shutil
    d = tmp_path / "ck"
    shutil.copytree(calibrated("fp8"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["unquantized"] = ["model.layers.9.mlp.down_proj"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="does not have.*calibrate again"):
        load(str(d))


def test_quantize_head_quantises_the_output_head_too(tmp_path):
    """LLaDA: the head is stored under its own checkpoint name (ff_out) with its scales, loads as a QuantLinear
    (the backends read the model dtype from the embedding, not the fp8 head), decodes close to the float
    model, and exports as Q/DQ."""
    out = tmp_path / "head"
    r = CliRunner().invoke(main, ["calibrate", "-m", "tiny-llada-tasks", "--format", "fp8", "--task", "sudoku4",
                                  "--samples", "8", "--per-stratum", "4", "--quantize-head", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "quantization.json").read_text())
    assert report["head"] is True and report["excluded"] == ["model.embed_tokens"] and "lm_head" in report["layers"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["head"] is True
    ck = open_checkpoint(str(out))
    from safetensors import safe_open
    names = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            names |= set(fh.keys())
            if "model.transformer.ff_out.weight" in fh.keys():
                assert fh.get_tensor("model.transformer.ff_out.weight").dtype == torch.float8_e4m3fn
    assert {"model.transformer.ff_out.weight", "model.transformer.ff_out.weight_scale",
            "model.transformer.ff_out.input_scale"} <= names and not any(n.startswith("lm_head") for n in names)
    be, tok, src = make_backend("torch", str(out))
    assert isinstance(be.model.lm_head, QuantLinear) and be.info.dtype == torch.float32 and src.dtype == "float32"
    ref = load("tiny-llada-tasks")[0]
    ids = tok(PROMPTS[:4], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        a = ref.full_logits(ids["input_ids"], ids["attention_mask"].bool())
        b = be.model.full_logits(ids["input_ids"], ids["attention_mask"].bool())
    assert float((b - a).norm() / a.norm()) < 0.15
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    fast = TorchGraphBackend(load(str(out))[0])
    assert fast.info.dtype == torch.float32 and isinstance(fast.model.lm_head, QuantLinear)
    from dlmtrt.export.onnx_export import export_step
    res = export_step(str(out), tmp_path / "onnx", log=lambda m: None)
    assert res.checks.ok, res.checks.render_text()
    inits = {i.name: i for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    assert inits["lm_head.weight"].data_type == onnx.TensorProto.FLOAT8E4M3FN
    assert ck.args.num_layers == len(ref.model.layers)
    if importlib.util.find_spec("tensorrt") or importlib.util.find_spec("tensorrt_rtx"):
        r = CliRunner().invoke(main, ["build-engine", "--onnx", str(tmp_path / "onnx"), "--out",
                                      str(tmp_path / "h.engine"), "--profile", "batch=1:1:2,active=1:8:32,canvas=1:32:64"])
        assert r.exit_code == 0, r.output
        manifest = json.loads((tmp_path / "h.engine.json").read_text())
        n_lin = len(report["layers"])  # every quantised linear's weight, the head's included
        assert manifest["layers"]["network_types"]["DEQUANTIZE"] >= n_lin


def test_quantize_head_is_refused_for_tied_embeddings_and_bad_configs(tmp_path, calibrated):
    import shutil
    src = open_checkpoint("tiny-dream-tasks").path
    tied = tmp_path / "tied"
    shutil.copytree(src, tied)
    cfg = json.loads((tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["calibrate", "-m", str(tied), "--format", "fp8", "--task", "sudoku4",
                                  "--quantize-head", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "tied embeddings" in r.output and "--quantize-head" in r.output
    assert not (tmp_path / "a").exists()
    d = tmp_path / "ck"
    shutil.copytree(calibrated("fp8"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["head"] = "yes"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="head must be true or false"):
        load(str(d))
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny-dream", "--quantize-head", "--out", str(tmp_path / "b.json")])
    assert r.exit_code != 0 and "--quant" in r.output


def test_bench_quantises_the_head_and_keeps_blocks_on_request(tmp_path):
    from dlmtrt.errors import UsageError
    from dlmtrt.evals.speed import bench
    kw = dict(prompt=16, answer=8, policies=("none",), log=lambda m: None)
    plain, head, kept = (bench("tiny-dream", quant="fp8", **kw), bench("tiny-dream", quant="fp8", quantize_head=True, **kw),
                         bench("tiny-dream", quant="fp8", keep_blocks=1, **kw))
    assert head.backend.endswith("+fp8+head") and kept.backend.endswith("+fp8+keep1")
    from dlmtrt.evals.speed import shape_args
    a = shape_args("tiny-dream")
    assert plain.weight_bytes - head.weight_bytes == a.vocab_size * a.hidden_size * 3 - a.vocab_size * 4 - 4
    assert kept.weight_bytes > plain.weight_bytes
    with pytest.raises(UsageError, match="between 0 and"):
        bench("tiny-dream", quant="fp8", keep_blocks=a.num_layers, **kw)
