"""ONNX export of the step contract: graph, metadata, weights, plugin node, dtypes, checks and bad input."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from dlmtrt import cli
from dlmtrt.errors import OutputExistsError, UsageError
from dlmtrt.export import attention as attn
from dlmtrt.export.checks import CASES, numeric_check, random_step_inputs
from dlmtrt.runtime.artifacts import onnx_metadata, read_metadata
from dlmtrt.export.onnx_export import ExportError, checkpoint_sha256, export_step
from dlmtrt.runtime.contract import input_names, output_names
from dlmtrt.models.loading import load, open_checkpoint, read_tensor, tensor_index


def _dims(v):
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_graph_is_the_step_contract(exported, family):
    d = exported(family)
    ck = open_checkpoint(f"tiny-{family}-tasks")
    a = ck.args
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in d.iterdir()}
    assert not (d / "model.onnx.data").exists()  # 20 MB: one file
    m = onnx.load(str(d / "model.onnx"))
    assert [i.name for i in m.graph.input] == input_names(a.num_layers)
    assert [o.name for o in m.graph.output] == output_names(a.num_layers)
    io = {v.name: _dims(v) for v in [*m.graph.input, *m.graph.output]}
    assert io["input_ids"] == ["batch", "active"]
    assert io["stable_mask"] == ["batch", "canvas"]
    assert io["past_key_values.0.key"] == ["batch", a.num_kv_heads, "canvas", a.head_dim]
    assert io["logits"] == ["batch", "active", a.vocab_size]
    assert io["present.3.value"] == ["batch", a.num_kv_heads, "canvas", a.head_dim]
    assert io["kv_drift"] == ["batch", "active"]
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    assert types["present_valid"] == onnx.TensorProto.BOOL and types["stable_mask"] == onnx.TensorProto.BOOL
    assert types["input_ids"] == onnx.TensorProto.INT64


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_metadata_is_all_a_runtime_needs(exported, family):
    d = exported(family)
    ck = open_checkpoint(f"tiny-{family}-tasks")
    props = onnx_metadata(d / "model.onnx")
    args, meta = read_metadata(props, d)
    assert args == ck.args
    assert meta["family"] == family
    assert meta["logits_shift"] == ("true" if family == "dream" else "false")
    assert int(meta["mask_token_id"]) == ck.args.mask_token_id
    assert int(meta["num_kv_heads"]) == ck.args.num_kv_heads and int(meta["head_dim"]) == ck.args.head_dim
    assert meta["dtype"] == "float32" and meta["attention"] == "standard"
    assert meta["source_sha256"] == checkpoint_sha256(ck)
    assert torch.__version__ in meta["exporter"] and onnx.__version__ in meta["exporter"]


def test_initializers_are_the_checkpoint_weights_by_name(exported):
    d = exported("dream")
    ck = open_checkpoint("tiny-dream-tasks")
    index = tensor_index(ck)
    m = onnx.load(str(d / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    assert set(index) <= set(inits), sorted(set(index) - set(inits))[:5]
    for name in ["model.embed_tokens.weight", "model.layers.2.self_attn.k_proj.bias", "lm_head.weight",
                 "model.layers.5.mlp.down_proj.weight"]:
        np.testing.assert_array_equal(numpy_helper.to_array(inits[name]), read_tensor(index[name], torch.float32).numpy())


def test_changing_the_weights_changes_the_hash(tmp_path, tiny_dir):
    import shutil
    src = tiny_dir("dream")
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    h0 = checkpoint_sha256(open_checkpoint(str(dst)))
    w = next(dst.glob("*.safetensors"))
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 1
    w.write_bytes(bytes(raw))
    assert checkpoint_sha256(open_checkpoint(str(dst))) != h0


def test_numeric_check_covers_every_output_and_detects_a_wrong_weight(exported, tmp_path):
    d = exported("llada")
    ck = open_checkpoint("tiny-llada-tasks")
    rep = numeric_check(d / "model.onnx", ck, "float32", "standard")
    assert rep.ok
    assert len(rep.rows) == len(CASES) * len(output_names(ck.args.num_layers))
    assert rep.worst()["logits"].rel_err < 1e-5
    m = onnx.load(str(d / "model.onnx"))
    t = next(t for t in m.graph.initializer if t.name == "model.layers.1.self_attn.v_proj.weight")
    arr = numpy_helper.to_array(t).copy()
    arr[0, 0] += 0.5
    t.CopyFrom(numpy_helper.from_array(arr, t.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    rep = numeric_check(bad, ck, "float32", "standard")
    failed = {r.output for r in rep.rows if not r.ok}
    assert not rep.ok and "logits" in failed and "present.1.value" in failed and "present.0.value" not in failed


def _ort_outputs(model: onnx.ModelProto | str, feeds):
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_plugin_node_has_the_semantics_of_the_standard_graph(exported):
    d_std, d_plug = exported("dream"), exported("dream", attention="plugin")
    ck = open_checkpoint("tiny-dream-tasks")
    a = ck.args
    m = onnx.load(str(d_plug / "model.onnx"))
    nodes = attn.plugin_nodes(m)
    assert len(nodes) == a.num_layers
    at = {x.name: onnx.helper.get_attribute_value(x) for x in nodes[0].attribute}
    assert at["num_heads"] == a.num_heads and at["num_kv_heads"] == a.num_kv_heads and at["head_dim"] == a.head_dim
    assert math.isclose(at["scale"], 1 / math.sqrt(a.head_dim), rel_tol=1e-6)
    assert [n.op_type for n in m.graph.node].count("Softmax") == 0  # attention lives only in the plugin nodes
    assert any(o.domain == attn.DOMAIN and o.version == attn.VERSION for o in m.opset_import)
    assert read_metadata(onnx_metadata(d_plug / "model.onnx"), d_plug)[1]["attention"] == "plugin"
    with pytest.raises(Exception):
        ort.InferenceSession(str(d_plug / "model.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(3)
    for case in [(2, 5, 24, 0.6, 3), (1, 9, 9, 0.0, 0)]:
        feeds = {n: t.numpy() for n, t in zip(input_names(a.num_layers), random_step_inputs(a, case, torch.float32, gen))}
        ref = _ort_outputs(str(d_std / "model.onnx"), feeds)
        got = _ort_outputs(attn.with_reference(m), feeds)
        for r, g in zip(ref, got):
            r, g = r.astype(np.float64), g.astype(np.float64)
            assert np.linalg.norm(g - r) <= 1e-5 * max(np.linalg.norm(r), 1e-6)


def test_plugin_attention_is_the_model_attention_in_eager_mode():
    from dlmtrt.models.attention_kinds import AttentionKind
    from dlmtrt.models.transformer import cached_attention
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    valid = torch.rand(2, 7) < 0.6
    valid[:, 0] = True
    k_pos = torch.arange(7).expand(2, 7)
    q_pos = k_pos[:, 4:]
    for kind in (AttentionKind(), AttentionKind("block_causal", 2)):
        torch.testing.assert_close(attn.plugin_attention(q, k, v, valid, q_pos, k_pos, kind),
                                   cached_attention(q, k, v, valid, q_pos, k_pos, kind))


@pytest.mark.parametrize("family,dtype,onnx_type", [("llada", "float16", onnx.TensorProto.FLOAT16),
                                                     ("dream", "bfloat16", onnx.TensorProto.BFLOAT16)])
def test_half_precision_exports(exported, family, dtype, onnx_type):
    d = exported(family, dtype=dtype)  # the fixture asserts the numeric check passed at this dtype's tolerance
    m = onnx.load(str(d / "model.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    assert types["past_key_values.0.key"] == onnx_type and types["present.0.value"] == onnx_type
    assert types["logits"] == onnx_type
    w = next(t for t in m.graph.initializer if t.name == "model.layers.0.mlp.up_proj.weight")
    assert w.data_type == onnx_type
    assert read_metadata(onnx_metadata(d / "model.onnx"), d)[1]["dtype"] == dtype


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("opset", [11, 17, 99])
def test_unknown_opset_is_refused_before_any_work(tmp_path, opset):
    with pytest.raises(ExportError, match=f"opset {opset} is not supported: choose one of 18..23"):
        export_step("tiny-dream-tasks", tmp_path / "out", opset=opset)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="--out: .*a_file is a file, not a directory; choose another path"):
        export_step("tiny-dream-tasks", blocker / "out", numeric_check=False)
    with pytest.raises(UsageError, match="exists and is not a directory"):
        export_step("tiny-dream-tasks", blocker, numeric_check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_non_empty_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty; choose a new path or pass --overwrite"):
        export_step("tiny-dream-tasks", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").exists()


def test_model_that_does_not_load(tmp_path, tiny_dir):
    from dlmtrt.models.loading import CheckpointError
    with pytest.raises(CheckpointError, match="tiny-gpt-none"):
        export_step("tiny-gpt-none", tmp_path / "out")
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir("llada"), bad)
    w = next(bad.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors|re-download"):
        export_step(str(bad), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_mismatched_tokenizer(tmp_path):
    from dlmtrt.models.loading import SHIPPED_ALIASES
    with pytest.raises(ExportError, match="does not match .*mask token .*--tokenizer"):
        export_step("tiny-llada-tasks", tmp_path / "out", tokenizer=str(SHIPPED_ALIASES["tiny-dream-tasks"]))
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_step("tiny-llada-tasks", tmp_path / "out", tokenizer=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_the_old_export_and_no_partial_files(tmp_path, monkeypatch):
    import dlmtrt.export.checks as checks
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    monkeypatch.setitem(checks.TOLERANCES, "float32", {"logits": 0.0, "present": 0.0, "kv_drift": 0.0})
    with pytest.raises(ExportError, match="disagrees with PyTorch beyond tolerance") as e:
        export_step("tiny-llada-tasks", out, overwrite=True, log=lambda m: None)
    assert e.value.report is not None and not e.value.report.ok
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert _no_leftovers(tmp_path) == []


def test_cli_export_prints_checks_and_files(tmp_path):
    r = CliRunner().invoke(cli.main, ["export", "-m", "tiny-llada-tasks", "-o", str(tmp_path / "x"), "--attention",
                                      "plugin"])
    assert r.exit_code == 0, r.output
    for word in ("logits", "present_valid", "kv_drift", "model.onnx", "tokenizer.json", "plugin attention"):
        assert word in r.output
    m = onnx.load(str(tmp_path / "x" / "model.onnx"), load_external_data=False)
    assert len(attn.plugin_nodes(m)) == open_checkpoint("tiny-llada-tasks").args.num_layers


def test_cli_export_bad_opset_is_one_line(tmp_path):
    r = CliRunner().invoke(cli.main, ["export", "-m", "tiny-llada-tasks", "-o", str(tmp_path / "x"), "--opset", "7"])
    assert r.exit_code != 0
    assert "opset 7 is not supported" in r.output and "Traceback" not in r.output
