"""The ONNX Runtime backend runs an export directory alone and decodes exactly like the torch backend."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from dlmtrt import cli
from dlmtrt.runtime.params import greedy_params
from dlmtrt.evals.tasks import get_task
from dlmtrt.runtime.backends import describe_model, make_backend
from dlmtrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.contract import StepInputs
from dlmtrt.export.checks import random_step_inputs

POLICIES = ["none", "decode", "delayed", "block", "dual+parallel", "adaptive", "decode+early", "decode:cache_steps=1"]


def _prompts(family: str) -> tuple[list[str], dict]:
    """Countdown prompts differ in length, so the batch is left-padded."""
    task = get_task("countdown")
    probs = task.problems(4, seed=7, numbers=(3, 4))
    params = greedy_params(family, task.answer_tokens, blocks=None if family == "dream" else 2)
    return [p.prompt for p in probs], params


@pytest.fixture(scope="module")
def torch_backends():
    return {f: make_backend("torch", f"tiny-{f}-tasks")[:2] for f in ("dream", "llada")}


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("policy", POLICIES)
def test_token_identical_to_torch(exported, torch_backends, family, policy):
    ort_be, ort_tok, src = make_backend("onnxruntime", str(exported(family)))
    t_be, t_tok = torch_backends[family]
    prompts, params = _prompts(family)
    assert len({len(t_tok(p)["input_ids"]) for p in prompts}) > 1  # left padding is exercised
    ref = generate_text(t_be, t_tok, prompts, policy=policy, **params)
    got = generate_text(ort_be, ort_tok, prompts, policy=policy, **params)
    assert torch.equal(got.sequences, ref.sequences)
    assert got.texts == ref.texts
    assert got.stats.rows_computed == ref.stats.rows_computed and got.stats.steps == ref.stats.steps


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_step_matches_torch_and_writes_into_torch_tensors(exported, torch_backends, family):
    be = OnnxRuntimeBackend(exported(family))
    t_be = torch_backends[family][0]
    a = be.args
    ids, pos, stable, am, *past = random_step_inputs(a, (2, 6, 20, 0.5, 4), torch.float32, torch.Generator().manual_seed(1))
    s = StepInputs(ids, pos, list(past[0::2]), list(past[1::2]), stable, am)
    got, ref = be.step(s), t_be.step(s)

    def rel(g, r):
        return float((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-6))
    assert rel(got.logits, ref.logits) < 5e-5
    for g, r in zip(got.present_keys + got.present_values, ref.present_keys + ref.present_values):
        assert isinstance(g, torch.Tensor) and g.is_contiguous()
        assert rel(g, r) < 5e-5
    assert torch.equal(got.present_valid, ref.present_valid)
    assert rel(got.kv_drift, ref.kv_drift) < 5e-5
    again = be.step(StepInputs(ids, pos, got.present_keys, got.present_values, got.present_valid, am))
    assert again.present_keys[0].data_ptr() != got.present_keys[0].data_ptr()  # never written in place of its input


def test_describe_reads_only_the_metadata(exported):
    d = exported("dream")
    src = describe_model("onnxruntime", str(d))
    assert src.family == "dream" and src.args.logits_shift and src.dtype == "float32"


def test_fp16_export_decodes_on_cpu(exported):
    be, tok, src = make_backend("onnxruntime", str(exported("llada", dtype="float16")))
    assert be.info.dtype == torch.float16 and src.dtype == "float16"
    task = get_task("sudoku4")
    probs = task.problems(8, seed=3, clues=(8, 12))
    g = generate_text(be, tok, [p.prompt for p in probs], **greedy_params("llada", task.answer_tokens))
    assert sum(task.check(p, t) for p, t in zip(probs, g.texts)) >= 7


def test_cli_generate_onnxruntime_equals_torch(exported):
    args = ["generate", "--prompt", "sudoku\n0120\n4231\n2000\n0040\n", "-n", "20", "--steps", "20",
            "--block-length", "20", "--policy", "decode", "--json"]
    r1 = CliRunner().invoke(cli.main, [*args, "-m", "tiny-llada-tasks"])
    r2 = CliRunner().invoke(cli.main, [*args, "-m", str(exported("llada")), "--backend", "onnxruntime"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r2.output
    a1, a2 = json.loads(r1.stdout)["answers"], json.loads(r2.stdout)["answers"]
    assert a1 == a2 == ["3124\n4231\n2413\n1342"]


def test_cli_eval_onnxruntime(exported, tmp_path):
    r = CliRunner().invoke(cli.main, ["eval", "-m", str(exported("dream")), "--backend", "onnxruntime", "--task",
                                      "sudoku4:clues=8-12", "--n", "6", "--policy", "decode", "--out",
                                      str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["backend"] == "onnxruntime" and res["results"][0]["accuracy"] >= 5 / 6


def test_errors_name_the_problem_and_the_fix(exported, tmp_path):
    with pytest.raises(ValueError, match="no exported model at .*run the export first"):
        make_backend("onnxruntime", "tiny-dream-tasks")
    with pytest.raises(ValueError, match="only the TensorRT plugin implements; export with --attention standard"):
        make_backend("onnxruntime", str(exported("dream", attention="plugin")))
    with pytest.raises(ValueError, match="bfloat16 graph.*Export with --dtype float32 or float16"):
        make_backend("onnxruntime", str(exported("dream", dtype="bfloat16")))
    with pytest.raises(ValueError, match="was exported as float32, not float16: pass --dtype float32"):
        make_backend("onnxruntime", str(exported("dream")), dtype="float16")
    with pytest.raises(ValueError, match="execution provider.*not available"):
        OnnxRuntimeBackend(exported("dream"), device="cuda")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(exported("dream") / "model.onnx", bare / "model.onnx")
    with pytest.raises(ValueError, match="tokenizer.json missing next to"):
        make_backend("onnxruntime", str(bare))
    import onnx
    m = onnx.load(str(bare / "model.onnx"))
    del m.metadata_props[:]
    onnx.save(m, str(bare / "model.onnx"))
    with pytest.raises(ValueError, match="has no dlmtrt metadata.*dlmtrt export"):
        make_backend("onnxruntime", str(bare))
    r = CliRunner().invoke(cli.main, ["generate", "-m", str(bare), "--backend", "onnxruntime", "-p", "x"])
    assert r.exit_code != 0 and "no dlmtrt metadata" in r.output and "Traceback" not in r.output
