"""`dlmtrt build-engine` and the CachedAttention TensorRT plugin, on the CPU with TensorRT-RTX's builder.

Both shipped tiny task models, exported with standard attention and with the plugin node, are built into
engines. Deserializing an engine needs a CUDA driver, which this machine and CI lack, so what the engine holds
is checked where the builder reports it: its layer report (captured from the build, recorded in the manifest)
must list one plugin layer per transformer layer, and the plan must carry the plugin's name and fields; the
manifest must describe the IO, profiles, TensorRT, the plugin library and the source export exactly. The
plugin's own methods (types, formats, shapes, serialization, enqueue's call of the kernel launcher) are driven
directly.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None:
    pytest.skip("neither tensorrt nor tensorrt_rtx is installed (pip install 'dlmtrt[trt]')", allow_module_level=True)

from dlmtrt.cli import main  # noqa: E402
from dlmtrt.engine.build import (AXES, EngineError, default_axes, engine_from_onnx, parse_profile,  # noqa: E402
                                 parser_can_import_plugins)
from dlmtrt.errors import UsageError  # noqa: E402
from dlmtrt.plugins import launcher  # noqa: E402
from dlmtrt.plugins.flavour import flavour, import_trt  # noqa: E402
from dlmtrt.runtime.artifacts import onnx_metadata  # noqa: E402
from dlmtrt.runtime.contract import input_names, output_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 6  # both tiny task models
CASES = [("dream", "standard"), ("dream", "plugin"), ("llada", "standard"), ("llada", "plugin")]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    """built(family, attention) -> (CliRunner result, engine path): one `build-engine` per export."""
    cache: dict[tuple, tuple] = {}

    def get(family: str, attention: str):
        key = (family, attention)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"engine_{family}_{attention}")
            out = d / "model.engine"
            r = CliRunner().invoke(main, ["build-engine", "--onnx", str(exported(family, attention=attention)),
                                          "--out", str(out), "--timing-cache", str(d / "timing.cache")])
            cache[key] = (r, out)
        return cache[key]
    return get


@pytest.mark.parametrize("family,attention", CASES)
def test_build_engine_writes_engine_and_manifest(built, exported, family, attention):
    r, engine = built(family, attention)
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "build-engine" in r.stdout and "manifest" in r.stdout
    trt = import_trt()
    data = engine.read_bytes()
    m = json.loads(engine.with_name("model.engine.json").read_text())
    export = exported(family, attention=attention)
    meta = onnx_metadata(export / "model.onnx")
    hkv, hd = int(meta["dlmtrt.num_kv_heads"]), int(meta["dlmtrt.head_dim"])

    assert m["engine"] == {"file": "model.engine", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert len(data) > 1_000_000  # the weights are in the plan
    assert m["tensorrt"]["flavour"] == flavour() == trt.__name__ and m["tensorrt"]["version"] == trt.__version__
    assert m["tensorrt"]["strongly_typed"] and m["precision"] == "float32"
    # IO: the step contract's names in graph order, the export's types and symbolic axes
    assert [t["name"] for t in m["inputs"]] == input_names(LAYERS)
    assert [t["name"] for t in m["outputs"]] == output_names(LAYERS)
    io = {t["name"]: t for t in m["inputs"] + m["outputs"]}
    assert io["input_ids"]["dtype"] == "int64" and io["input_ids"]["shape"] == ["batch", "active"]
    assert io["attention_mask"]["dtype"] == "bool" and io["stable_mask"]["shape"] == ["batch", "canvas"]
    assert io["past_key_values.0.key"]["dtype"] == "float32"
    assert io["past_key_values.0.key"]["shape"] == ["batch", hkv, "canvas", hd]
    assert io["logits"]["shape"][:2] == ["batch", "active"] and io["present_valid"]["dtype"] == "bool"
    # one default profile from the export's metadata (512 positions)
    (p,) = m["profiles"]
    assert p["axes"] == {"batch": [1, 1, 8], "active": [1, 32, 512], "canvas": [1, 512, 512]}
    assert p["shapes"]["input_ids"] == {"min": [1, 1], "opt": [1, 32], "max": [8, 512]}
    assert p["shapes"]["past_key_values.5.value"] == {"min": [1, hkv, 1, hd], "opt": [1, hkv, 512, hd],
                                                      "max": [8, hkv, 512, hd]}
    # the source export, and what the tensorrt backend reads from the manifest
    assert m["onnx"]["dir"] == str(export.absolute())
    assert m["onnx"]["sha256"] == {"model.onnx": _sha(export / "model.onnx")}
    assert m["onnx"]["metadata"] == meta and meta["dlmtrt.attention"] == attention
    from dlmtrt.runtime.artifacts import read_manifest
    _, _, args, rmeta = read_manifest(engine)
    assert args.family == family and args.num_layers == LAYERS and rmeta["dtype"] == "float32"
    # the timing cache was written (TensorRT-RTX accepts one and ignores it: the manifest says so)
    tc = m["timing_cache"]
    assert Path(tc["path"]).is_file() and not tc["reused"] and tc["bytes_after"] > 0
    assert ("note" in tc) == (flavour() == "tensorrt_rtx")

    layers = m["layers"]
    assert layers["network"] > 100 and layers["engine"] > 10
    if attention == "plugin":
        # every layer's attention is one plugin layer in the network and in the built engine's layer report
        pl = m["plugin"]
        assert pl["onnx_nodes"] == LAYERS and len(pl["network_layers"]) == LAYERS
        assert layers["network_types"]["PLUGIN_V3"] == LAYERS
        assert len(pl["engine_layers"]) == LAYERS
        assert all(n.startswith("node_cached_attention") for n in pl["engine_layers"])
        assert (pl["name"], pl["version"], pl["namespace"]) == ("CachedAttention", "1", "")
        assert m["plugin_library_sha256"] == pl["library_sha256"] == launcher.library_sha256()
        assert data.count(b"CachedAttention") >= LAYERS and b"num_kv_heads" in data  # serialized plugin fields
        if flavour() == "tensorrt_rtx" and not parser_can_import_plugins("tensorrt_rtx"):
            assert m["tensorrt"]["built"].startswith("in a child process")
        assert "CachedAttention: 6 nodes, 6 engine layers" in r.stdout
    else:
        assert m["plugin"] is None and m["plugin_library_sha256"] is None
        assert "PLUGIN_V3" not in layers["network_types"] and b"CachedAttention" not in data
        assert m["tensorrt"]["built"] == "in this process"
        assert "none (standard attention)" in r.stdout


def test_rebuild_with_overwrite_profiles_and_the_cached_timing_cache(built, exported, tmp_path):
    r0, engine = built("dream", "standard")
    assert r0.exit_code == 0, r0.output
    cache = engine.parent / "timing.cache"
    args = ["build-engine", "--onnx", str(exported("dream")), "--out", str(engine), "--timing-cache", str(cache),
            "--precision", "fp32", "--profile", "batch=2,canvas=16:64:128", "--profile", "active=1:1:1"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "exists" in r.output and "--overwrite" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["--overwrite"])
    assert r.exit_code == 0, r.output
    m = json.loads(engine.with_name("model.engine.json").read_text())
    assert [p["axes"] for p in m["profiles"]] == [
        {"batch": [2, 2, 2], "active": [1, 32, 512], "canvas": [16, 64, 128]},
        {"batch": [1, 1, 8], "active": [1, 1, 1], "canvas": [1, 512, 512]}]
    assert m["profiles"][0]["shapes"]["stable_mask"] == {"min": [2, 16], "opt": [2, 64], "max": [2, 128]}
    assert m["timing_cache"]["reused"] and m["engine"]["sha256"] == _sha(engine)
    assert not list(engine.parent.glob(".*tmp*"))  # nothing left of the atomic writes


def test_bad_inputs_are_one_line_errors(exported, tmp_path, monkeypatch):
    def run(*args):
        r = CliRunner().invoke(main, ["build-engine", *args])
        assert "Traceback" not in r.output, r.output
        return r
    out = str(tmp_path / "x.engine")
    r = run("--onnx", str(tmp_path / "missing"), "--out", out)
    assert r.exit_code == 1 and "no such directory" in r.output
    (tmp_path / "empty").mkdir()
    r = run("--onnx", str(tmp_path / "empty"), "--out", out)
    assert r.exit_code == 1 and "is not an export" in r.output and "dlmtrt export" in r.output
    import onnx
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    (tmp_path / "foreign").mkdir()
    onnx.save(helper.make_model(g), str(tmp_path / "foreign" / "model.onnx"))
    r = run("--onnx", str(tmp_path / "foreign"), "--out", out)
    assert r.exit_code == 1 and "no dlmtrt metadata" in r.output
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.onnx").write_bytes(b"\x00not onnx")
    r = run("--onnx", str(tmp_path / "junk"), "--out", out)
    assert r.exit_code == 1 and "not a readable ONNX model" in r.output
    d = str(exported("dream"))
    r = run("--onnx", d, "--out", out, "--precision", "bf16")
    assert r.exit_code == 2 and "does not match the export, which is float32" in r.output
    assert "--dtype bfloat16" in r.output
    r = run("--onnx", d, "--out", str(tmp_path))
    assert r.exit_code == 2  # click: --out must be a file
    for bad in ("batch=0:1:2", "width=1:2:3", "canvas=4:2:8", "batch=1:x:2", "batch=1:2"):
        r = run("--onnx", d, "--out", out, "--profile", bad)
        assert r.exit_code == 2 and "--profile" in r.output, (bad, r.output)
    import dlmtrt.plugins.flavour as fl
    monkeypatch.setattr(fl, "_installed", lambda name: False)
    r = run("--onnx", d, "--out", out)
    assert r.exit_code == 1 and "neither the tensorrt nor the tensorrt_rtx" in r.output
    assert not (tmp_path / "x.engine").exists()


def test_profiles():
    d = default_axes({"max_position_embeddings": "131072"})
    assert d == {"batch": (1, 1, 8), "active": (1, 32, 2048), "canvas": (1, 512, 2048)}
    assert default_axes({"max_position_embeddings": "16"})["canvas"] == (1, 16, 16)
    assert parse_profile("canvas=8, batch=1:2:4", d) == {**d, "canvas": (8, 8, 8), "batch": (1, 2, 4)}
    assert parse_profile("", d) == d and set(AXES) == set(d)
    for bad in ("canvas", "canvas=", "canvas=3:2:1", "x=1"):
        with pytest.raises(UsageError):
            parse_profile(bad, d)


def test_source_checkout_entry_point(exported, tmp_path):
    r = subprocess.run([sys.executable, "cli.py", "build-engine", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--timing-cache" in r.stdout and "--profile" in r.stdout


# ---- the plugin itself

def _plugin(trt, **fields):
    from dlmtrt.plugins.trt_plugin import register
    creator = register(trt)
    f = {"num_heads": 8, "num_kv_heads": 4, "head_dim": 32, "scale": 32 ** -0.5, "mask_type": 0, "block_size": 0,
         **fields}
    import numpy as np
    fc = trt.PluginFieldCollection(
        [trt.PluginField(n, np.array([f[n]], dtype=np.int32), trt.PluginFieldType.INT32)
         for n in ("num_heads", "num_kv_heads", "head_dim", "mask_type", "block_size")]
        + [trt.PluginField("scale", np.array([f["scale"]], dtype=np.float32), trt.PluginFieldType.FLOAT32)])
    return creator, creator.create_plugin("attn", fc, trt.TensorRTPhase.BUILD)


def test_plugin_is_registered_once_under_the_parsers_name():
    from dlmtrt.plugins.trt_plugin import register
    trt = import_trt()
    c = register(trt)
    assert register(trt) is c
    found = trt.get_plugin_registry().get_creator("CachedAttention", "1", "")
    assert found is not None and found.name == "CachedAttention"
    assert [f.name for f in c.field_names] == ["num_heads", "num_kv_heads", "head_dim", "mask_type", "block_size",
                                               "scale"]


def test_plugin_types_formats_and_serialization():
    trt = import_trt()
    creator, p = _plugin(trt)
    assert (p.plugin_name, p.plugin_version, p.plugin_namespace, p.num_outputs) == ("CachedAttention", "1", "", 1)
    F, H, B, I64 = trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BOOL, trt.DataType.INT64
    assert p.get_output_data_types([H, H, H, B, I64, I64]) == [H]

    def desc(t, fmt=trt.TensorFormat.LINEAR):
        return SimpleNamespace(desc=SimpleNamespace(type=t, format=fmt))
    ok = [desc(t) for t in (F, F, F, B, I64, I64, F)]  # q, k, v, valid, q_pos, k_pos -> o
    assert all(p.supports_format_combination(k, ok, 6) for k in range(7))
    assert p.supports_format_combination(0, [desc(trt.DataType.BF16)] * 7, 6)
    assert not p.supports_format_combination(0, [desc(I64)] + ok[1:], 6)
    assert not p.supports_format_combination(1, [ok[0], desc(H), *ok[2:]], 6)  # k must be q's type
    assert not p.supports_format_combination(3, [*ok[:3], desc(F), *ok[4:]], 6)  # valid must be bool
    assert not p.supports_format_combination(4, [*ok[:4], desc(F), *ok[5:]], 6)  # positions must be int64
    assert not p.supports_format_combination(6, [*ok[:6], desc(H)], 6)  # o must be q's type
    assert not p.supports_format_combination(0, [desc(F, trt.TensorFormat.CHW32)] + ok[1:], 6)
    # serialized fields recreate the same plugin at run time
    again = creator.create_plugin("attn", p.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.fields == p.fields and p.clone().fields == p.fields
    from dlmtrt.plugins.trt_plugin import PluginFieldError
    with pytest.raises(PluginFieldError, match="multiple of num_kv_heads"):
        _plugin(trt, num_kv_heads=3)
    with pytest.raises(PluginFieldError, match="block_causal attention needs a block size"):
        _plugin(trt, mask_type=1, block_size=0)
    with pytest.raises(PluginFieldError, match="unknown attention mask type 3"):
        _plugin(trt, mask_type=3)
    _, causal = _plugin(trt, mask_type=1, block_size=4)
    assert causal.metadata_string.endswith("block_causal:4")


def test_plugin_enqueue_calls_the_launcher(monkeypatch):
    trt = import_trt()
    _, p = _plugin(trt)
    calls = []
    monkeypatch.setattr(launcher, "launch_ptrs", lambda *a: calls.append(a))
    q = SimpleNamespace(dims=(2, 8, 5, 32), type=trt.DataType.BF16)
    kv = SimpleNamespace(dims=(2, 4, 40, 32), type=trt.DataType.BF16)
    valid = SimpleNamespace(dims=(2, 40), type=trt.DataType.BOOL)
    qpos = SimpleNamespace(dims=(2, 5), type=trt.DataType.INT64)
    kpos = SimpleNamespace(dims=(2, 40), type=trt.DataType.INT64)
    p.enqueue([q, kv, kv, valid, qpos, kpos], [q], [0x1000, 0x2000, 0x3000, 0x4000, 0x4100, 0x4200], [0x5000], 0x9000,
              0x77)
    (a,) = calls
    assert a[:7] == (0x1000, 0x2000, 0x3000, 0x4000, 0x4100, 0x4200, 0x5000)
    assert a[7:13] == (2, 8, 4, 5, 40, 32)
    assert a[13] == pytest.approx(32 ** -0.5) and a[14] == launcher.DTYPE_CODES["bfloat16"]
    assert a[15:] == (p.fields["mask_type"], p.fields["block_size"], 0x77, 0x9000, 0)  # head_dim 32: no splits


def test_plugin_reserves_the_kernels_workspace_bound():
    """The engine reserves the most any launch of the node's heads may use (the key splits of few-row steps),
    and enqueue hands TensorRT's workspace and that size to the launcher."""
    trt = import_trt()
    _, p = _plugin(trt, num_heads=28, num_kv_heads=4, head_dim=128)
    desc = SimpleNamespace(desc=SimpleNamespace(type=trt.DataType.BF16))
    bound = p.get_workspace_size([desc] * 6, [])
    assert bound == launcher.workspace_size(1, 28, 4, 0, 1, 128, launcher.DTYPE_CODES["bfloat16"]) > 0
    assert bound >= max(launcher.workspace_size(B, 28, 4, A, L, 128, 2)
                        for B in (1, 8, 32) for A in (1, 4, 32, 256) for L in (64, 768, 8192))
    assert p.get_workspace_size([SimpleNamespace(desc=SimpleNamespace(type=trt.DataType.FLOAT))] * 6, []) == 0


def test_polygraphy_build_of_a_plugin_graph_never_aborts(exported):
    """Where TensorRT-RTX's parser could not load its library for a plugin node (std::terminate), the
    Polygraphy build used by `compare` refuses with a message instead."""
    if flavour() != "tensorrt_rtx" or parser_can_import_plugins("tensorrt_rtx"):
        pytest.skip("only TensorRT-RTX without libtensorrt_rtx.so on the loader path needs the guard")
    with pytest.raises(EngineError, match="libtensorrt_rtx.so"):
        engine_from_onnx(exported("dream", attention="plugin") / "model.onnx", {})
