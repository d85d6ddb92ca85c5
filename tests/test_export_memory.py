"""bench/export_memory.py at its tiny preset: the checkpoint it streams is loadable, the export in a child
process succeeds (numeric check included, weights forced into model.onnx.data), peak RSS is measured, the
written initializers read back bit-identical to the checkpoint, and the result JSON has its fields. No timing
assertions: this runs on shared 2-core CI machines."""
from __future__ import annotations

import json

import pytest

from bench import export_memory as em


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    d = tmp_path_factory.mktemp("export_memory")
    out = d / "result.json"
    r = em.run_benchmark("tiny", "bfloat16", workdir=d, keep=False, numeric_check="auto", out_json=out)
    return r, out, d


def test_export_succeeds_and_is_verified(tiny_result):
    r, _, _ = tiny_result
    assert r["numeric_check"] is True and r["export"]["numeric_check"]["ok"]
    assert r["export"]["structure_check"] == "passed"
    assert r["export"]["external_data"]
    v = r["verify"]
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "config.json"} <= set(v["files"])
    assert v["data_file"] and v["data_matches_records"] and v["data_close_to_weights"]
    names = [s["name"] for s in v["spot_checks"]]
    assert "model.embed_tokens.weight" in names and len(names) >= 3
    assert all(s["found"] and s["equal"] for s in v["spot_checks"]), v["spot_checks"]
    assert v["spot_checks_ok"]


def test_memory_measured(tiny_result):
    r, _, _ = tiny_result
    m = r["memory"]
    assert m["peak_rss_mib"] > 0 and m["baseline_rss_mib"] > 0
    assert m["peak_rss_mib"] >= m["baseline_rss_mib"]
    assert m["ratio_peak_to_weights"] > 0
    assert {"trace", "write", "structure_check", "numeric_check"} <= set(m["stages"])
    head_dim = r["checkpoint"]["config"]["head_dim"]
    assert r["weight_bytes"] == r["checkpoint"]["params"] * 2 + head_dim // 2 * 4  # bf16 weights + fp32 inv_freq


def test_json_fields_and_cleanup(tiny_result):
    r, out, d = tiny_result
    saved = json.loads(out.read_text())
    for key in ("preset", "dtype", "weight_bytes", "weight_mib", "times", "memory", "verify", "machine", "checkpoint"):
        assert key in saved, key
    for key in ("checkpoint_s", "export_process_s", "export_step_s", "export_stages_s"):
        assert key in saved["times"], key
    assert {"trace", "write", "structure_check"} <= set(saved["times"]["export_stages_s"])
    for key in ("peak_rss_mib", "baseline_rss_mib", "ratio_peak_to_weights", "ratio_peak_minus_baseline_to_weights"):
        assert key in saved["memory"], key
    for key in ("cpus", "ram_bytes", "torch", "onnx"):
        assert key in saved["machine"], key
    assert saved["checkpoint"]["config"]["hidden_size"] == 64
    assert not list(d.glob("export_memory-tiny.*")), "temp checkpoint/export not deleted"


def test_streamed_checkpoint_loads(tmp_path):
    """The streaming writer produces a checkpoint the project's own loader accepts, with the real Dream
    layout's sharding (index) and a tokenizer whose ids match the config."""
    import torch

    from dlmtrt.models.loading import load_tokenizer, load_weights, open_checkpoint
    made = em.write_checkpoint(tmp_path / "ck", "tiny")
    ck = open_checkpoint(str(tmp_path / "ck"))
    assert made["shards"] > 1 and (tmp_path / "ck" / "model.safetensors.index.json").exists()
    assert load_tokenizer(ck).mask_token == "<|mask|>"
    model = load_weights(ck, torch.bfloat16, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == made["params"]
    assert float(model.model.norm.weight.float().mean()) == pytest.approx(1.0, abs=0.05)
