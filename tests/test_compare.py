"""`cli.py compare` and the Polygraphy data loader: PyTorch vs ONNX Runtime on real denoising trajectories.

One export per shipped task checkpoint (shared with tests/test_export.py when its session fixture exists)
and one recording `compare` per family; the other tests replay the step inputs that run saved.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from dlmtrt.cli import main
from dlmtrt.evals.compare import TOLERANCES, parse_tolerances
from dlmtrt.evals.polygraphy_data import feeds_from_env, split_policies
from dlmtrt.runtime.contract import input_names, output_names
from dlmtrt.evals.trajectory import describe, load_feeds, spread

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("dream", "llada")
LAYERS = {"dream": 6, "llada": 6}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny models' matmuls are far faster on one thread than on two contended ones (CI shares 2 cores)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def export_dir(request, tmp_path_factory):
    """export_dir('dream') -> directory of the fp32 standard export of tiny-dream-tasks."""
    try:
        shared = request.getfixturevalue("exported")  # conftest's session-wide exports, when present
    except pytest.FixtureLookupError:
        shared = None
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            if shared is not None:
                cache[family] = shared(family)
            else:
                from dlmtrt.export.onnx_export import export_step
                out = tmp_path_factory.mktemp(f"compare_onnx_{family}") / "export"
                export_step(f"tiny-{family}-tasks", out, numeric_check=False, log=lambda m: None)
                cache[family] = out
        return cache[family]
    return get


@pytest.fixture(scope="module")
def compare_run(export_dir, tmp_path_factory):
    """compare_run('dream') -> (click result, directory with feeds.json and torch_outputs.json) of one real
    `compare` that records its own trajectories. Dream runs the default backends (tensorrt included, which is
    skipped here with its reason) and policies; LLaDA torch,onnxruntime on two policies."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            d = tmp_path_factory.mktemp(f"compare_{family}")
            args = ["compare", "-m", f"tiny-{family}-tasks", "--onnx", str(export_dir(family)),
                    "--save-inputs", str(d / "feeds.json"), "--save-outputs", str(d / "torch_outputs.json")]
            if family == "llada":
                args += ["--backends", "torch,onnxruntime", "--policy", "decode", "--policy", "dual+parallel",
                         "--steps-per-policy", "4"]
            cache[family] = (CliRunner().invoke(main, args), d)
        return cache[family]
    return get


def _row(stdout: str, output: str) -> str:
    rows = [line for line in stdout.splitlines() if f" {output} " in line]
    assert rows, f"no summary row for {output}:\n{stdout}"
    return rows[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_compare_torch_vs_onnxruntime_passes(compare_run, family):
    r, d = compare_run(family)
    assert r.exit_code == 0, r.output
    for name in output_names(LAYERS[family]):
        assert "yes" in _row(r.stdout, name)
    assert "within tolerance" in r.stdout and "Traceback" not in r.output
    assert (d / "feeds.json").exists() and (d / "torch_outputs.json").exists()
    assert "PASSED" not in r.output and len(r.output.splitlines()) < 60  # our table, not a verdict per step
    assert "building a TensorRT engine" not in r.output or "tensorrt skipped" not in r.output
    assert not re.search(r"\w+\.py:\d+", r.output)  # no source locations in the log lines
    if family == "dream":
        if importlib.util.find_spec("tensorrt") is None and importlib.util.find_spec("tensorrt_rtx") is None:
            assert "tensorrt skipped: neither the tensorrt nor the tensorrt_rtx" in " ".join(r.output.split())
        assert "polygraphy run" in r.output  # the equivalent command line is printed


@pytest.mark.parametrize("family", FAMILIES)
def test_trajectory_feeds_cover_partial_rows_and_stable_masks(compare_run, family):
    r, d = compare_run(family)
    assert r.exit_code == 0, r.output
    feeds = load_feeds(d / "feeds.json")
    cov = describe(feeds)
    assert cov["partial_active"] > 0 and cov["with_stable_rows"] > 0 and cov["padded"] > 0, cov
    n = LAYERS[family]
    assert any(f["input_ids"].shape[1] == f["stable_mask"].shape[1] for f in feeds)  # full steps too
    for f in feeds:
        assert list(f) == input_names(n)
        B, A = f["input_ids"].shape
        L = f["stable_mask"].shape[1]
        assert f["input_ids"].dtype == np.int64 and f["position_ids"].dtype == np.int64
        assert f["stable_mask"].dtype == np.bool_ and f["attention_mask"].dtype == np.bool_
        assert f["past_key_values.0.key"].dtype == np.float32 and f["past_key_values.0.key"].shape[::2] == (B, L)
        pos = f["position_ids"]
        # ascending canvas slots; a sequence with fewer active rows repeats its last one (decode.pack_rows)
        assert (pos >= 0).all() and (pos < L).all() and (np.diff(pos, axis=1) >= 0).all() and pos.shape == (B, A)


def _perturbed_copy(src: Path, dst: Path, name: str, factor: float) -> Path:
    m = onnx.load(str(src / "model.onnx"))
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
            break
    else:
        raise AssertionError(f"no initializer {name}")
    dst.mkdir()
    onnx.save(m, str(dst / "model.onnx"))
    return dst


def test_compare_fails_on_a_perturbed_weight(compare_run, export_dir, tmp_path):
    """A 1% error in the last layer's V projection: earlier layers still match, that layer's values and the
    logits do not, and the command exits non-zero."""
    r0, d = compare_run("dream")
    last = LAYERS["dream"] - 1
    bad = _perturbed_copy(export_dir("dream"), tmp_path / "bad", f"model.layers.{last}.self_attn.v_proj.weight", 1.01)
    r = CliRunner().invoke(main, ["compare", "-m", "tiny-dream-tasks", "--onnx", str(bad), "--backends",
                                  "torch,onnxruntime", "--load-inputs", str(d / "feeds.json"), "--max-feeds", "4"])
    assert r.exit_code == 1, r.output
    assert "out of tolerance" in r.output and "Traceback" not in r.output
    assert "NO" in _row(r.stdout, f"present.{last}.value") and "NO" in _row(r.stdout, "logits")
    assert "yes" in _row(r.stdout, "present.0.key") and "yes" in _row(r.stdout, "present_valid")


def test_compare_fails_on_zero_tolerance(compare_run, export_dir):
    """ONNX Runtime's float arithmetic differs from PyTorch's in the last bits: zero tolerance fails every
    float output, while the boolean present_valid still matches exactly."""
    r0, d = compare_run("dream")
    r = CliRunner().invoke(main, ["compare", "-m", "tiny-dream-tasks", "--onnx", str(export_dir("dream")),
                                  "--backends", "torch,onnxruntime", "--load-inputs", str(d / "feeds.json"),
                                  "--max-feeds", "2", "--rtol", "0", "--atol", "0"])
    assert r.exit_code == 1, r.output
    assert "NO" in _row(r.stdout, "logits") and "yes" in _row(r.stdout, "present_valid")


def test_compare_refuses_a_graph_of_another_model(export_dir):
    r = CliRunner().invoke(main, ["compare", "-m", "tiny-llada-tasks", "--onnx", str(export_dir("dream")),
                                  "--backends", "torch,onnxruntime"])
    assert r.exit_code == 1 and "architecture differs" in r.output and "Traceback" not in r.output


def test_compare_option_errors():
    r = CliRunner().invoke(main, ["compare", "-m", "tiny-dream-tasks", "--backends", "torch,tflite"])
    assert r.exit_code == 2 and "--backends" in r.output
    r = CliRunner().invoke(main, ["compare", "-m", "tiny-dream-tasks", "--backends", "torch"])
    assert r.exit_code == 2 and "at least two" in r.output


def test_polygraphy_run_with_the_shipped_data_loader(compare_run, export_dir, tmp_path):
    """The documented `polygraphy run` command line, from a directory that is not the repository: ONNX Runtime
    on the step inputs the data loader script recomputes from the checkpoint, against the PyTorch outputs
    `compare --save-outputs` wrote; the script's path comes from `dlmtrt compare --data-loader-path`."""
    exe = Path(sys.executable).parent / "polygraphy"
    if not exe.exists():
        pytest.skip(f"no polygraphy executable beside {sys.executable}")
    r0, d = compare_run("dream")
    assert r0.exit_code == 0, r0.output
    n_feeds = len(load_feeds(d / "feeds.json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLMTRT_MODEL": "tiny-dream-tasks",
           "DLMTRT_POLICIES": "none;decode;dual+parallel"}
    loader = CliRunner().invoke(main, ["compare", "--data-loader-path"]).output.strip()
    assert Path(loader.rpartition(":")[0]).is_absolute() and Path(loader.rpartition(":")[0]).is_file()
    cmd = [str(exe), "run", str(export_dir("dream") / "model.onnx"), "--onnxrt",
           "--data-loader-script", loader,
           "--load-outputs", str(d / "torch_outputs.json"),
           "--rtol", "1e-3", "present_valid:0", "--atol", "1e-4", "logits:1e-3", "present_valid:0"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert f"Passed: {n_feeds}/{n_feeds} iterations" in log and "PASSED | Runtime" in log


def test_tolerance_parsing():
    rt = parse_tolerances(["1e-2", "logits:5e-1", "present.1.key:0"], 2, "float32", "rtol")
    assert rt["logits"] == 0.5 and rt["present.1.key"] == 0 and rt["present.0.value"] == 1e-2
    at = parse_tolerances([], 2, "float16", "atol")
    assert at["logits"] == TOLERANCES["float16"]["logits"][1] and at["present_valid"] == 0
    assert at["present.1.value"] == TOLERANCES["float16"]["present"][1]
    for bad in (["foo:1"], ["logits:x"], ["-1"]):
        with pytest.raises(ValueError):
            parse_tolerances(bad, 2, "float32", "atol")


def test_data_loader_environment(compare_run):
    assert split_policies(None) == ["none", "decode", "dual+parallel"]
    assert split_policies("decode:cache_steps=2; dual+parallel") == ["decode:cache_steps=2", "dual+parallel"]
    with pytest.raises(ValueError, match="DLMTRT_MODEL"):
        feeds_from_env({})
    r0, d = compare_run("dream")
    feeds = feeds_from_env({"DLMTRT_FEEDS": str(d / "feeds.json"), "DLMTRT_MAX_FEEDS": "3"})
    assert len(feeds) == 3 and list(feeds[0]) == input_names(LAYERS["dream"])
    assert spread(list(range(20)), 4) == [0, 6, 13, 19] and spread([1, 2], 5) == [1, 2]
