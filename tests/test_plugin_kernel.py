"""The cached-attention kernel library on a machine without a GPU: `make plugin` built it, it loads, exports the
C ABI the plugin and the torch op call, and refuses bad launches with a clear reason before touching the GPU.
Its numerics run on the GPU (bench/gpu_attention.py, figures in the README)."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from dlmtrt.plugins import launcher
from dlmtrt.plugins.fatbin import MAGIC, embedded_architectures
from dlmtrt.plugins.launcher import PluginError, launch_ptrs, library_path, library_sha256
from dlmtrt.plugins.torch_op import cached_attention_cuda


def test_the_library_is_built_with_the_c_abi_and_every_target_architecture():
    path = library_path()
    lib = ctypes.CDLL(str(path))
    for name in ("dlmtrt_cached_attention", "dlmtrt_cached_attention_error", "dlmtrt_cached_attention_abi_version"):
        assert hasattr(lib, name)
    assert len(library_sha256()) == 64
    archs = embedded_architectures(path)
    assert {a for kind, a in archs if kind == "sass"} == {80, 86, 87, 89, 90, 100, 110, 120}  # Orin 87, Thor 110
    assert {a for kind, a in archs if kind == "ptx"} == {120}  # JIT for newer GPUs
    if shutil.which("cuobjdump"):  # not in every CUDA install (the nvcc-only one here lacks it): cross-check
        listed = subprocess.run(["cuobjdump", "--list-elf", str(path)], capture_output=True, text=True, check=True)
        assert all(f"sm_{a}" in listed.stdout for kind, a in archs if kind == "sass")


def test_fatbin_reading_skips_stray_magic_and_reads_the_fp8_library(tmp_path):
    f = tmp_path / "plain.so"
    f.write_bytes(b"\x7fELF" + bytes(64) + MAGIC + bytes(12))  # a stray magic is not a container
    assert embedded_architectures(f) == set()
    from dlmtrt.plugins import fp8_linear
    fp8 = embedded_architectures(fp8_linear.library_path())
    assert {a for kind, a in fp8 if kind == "sass"} == {80, 86, 89, 90, 120}


@pytest.mark.parametrize("kw,message", [
    (dict(H=28, Hkv=5), "H must be a multiple of Hkv"),
    (dict(D=96), "head_dim 96 is not supported (64 or 128)"),
    (dict(dtype=7), "dtype code 7 is not supported"),
    (dict(A=-1), "bad shape"),
    (dict(mask_type=2), "mask_type 2 is not supported"),
    (dict(mask_type=1, block=0), "block_causal needs block >= 1"),
    (dict(mask_type=1, block=4, pos=0), "block_causal needs block >= 1 (got 4) and query and key positions"),
    (dict(layout=2), "qo_layout 2 is not supported (0 [B, H, A, D], 1 [B, A, H, D])"),
])
def test_bad_launches_are_refused_with_the_reason(kw, message):
    args = dict(B=1, H=28, Hkv=4, A=1, L=8, D=128, dtype=2, mask_type=0, block=0, pos=0x100, layout=0) | kw
    pattern = message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(PluginError, match=pattern):
        launch_ptrs(0, 0, 0, 0, args["pos"], args["pos"], 0, args["B"], args["H"], args["Hkv"], args["A"], args["L"],
                    args["D"], 0.1, args["dtype"], args["mask_type"], args["block"], 0, qo_layout=args["layout"])


@pytest.mark.parametrize("ptrs,message", [
    (dict(q=0x1002), "misaligned pointers: q, k, v and o must be 16-byte aligned"),
    (dict(o=0x1008), "misaligned pointers"),
    (dict(ws=0x2001, ws_bytes=4096), "the workspace must be 16-byte aligned device memory"),
    (dict(ws=0, ws_bytes=4096), "the workspace must be 16-byte aligned device memory"),
])
def test_misaligned_pointers_are_refused_before_any_launch(ptrs, message):
    p = dict(q=0x1000, k=0x2000, v=0x3000, o=0x4000, ws=0, ws_bytes=0) | ptrs
    for dtype in (0, 1, 2):
        with pytest.raises(PluginError, match=message):
            launch_ptrs(p["q"], p["k"], p["v"], 0x5000, 0x100, 0x100, p["o"], 1, 28, 4, 1, 8, 128, 0.1, dtype, 0, 0, 0,
                        p["ws"], p["ws_bytes"])


def test_workspace_sizes_follow_the_launch_plan():
    """Key splits (and so workspace) only where the row tiles leave the GPU mostly idle; never more than the
    bound a TensorRT plugin reserves; none for fp32 (the scalar kernel) or a head_dim it does not run."""
    from dlmtrt.plugins.launcher import workspace_size
    bound = workspace_size(1, 28, 4, 0, 1, 128, 2)
    assert bound > 0 and workspace_size(1, 28, 4, 0, 1, 64, 2) < bound
    one_row = workspace_size(1, 28, 4, 1, 2048, 128, 2)  # 4 CTAs of rows: the keys split
    assert 0 < one_row <= bound
    assert workspace_size(8, 28, 4, 768, 2048, 128, 2) == 0  # 8 x 4 x 84 row tiles fill the GPU
    assert workspace_size(1, 28, 4, 1, 64, 128, 2) == 0  # one key tile cannot split
    assert workspace_size(1, 28, 4, 1, 2048, 128, 0) == 0 and workspace_size(1, 28, 4, 1, 2048, 96, 2) == 0
    sizes = [workspace_size(B, H, Hkv, A, L, D, 1) for B in (1, 3, 8) for H, Hkv in ((28, 4), (8, 8), (32, 8))
             for A in (1, 2, 5, 32, 100) for L in (65, 768, 8192) for D in (64, 128)]
    assert max(sizes) <= bound and sum(s > 0 for s in sizes) > len(sizes) // 3


def test_an_empty_launch_is_a_no_op():
    for mask_type, block in ((0, 0), (1, 4)):
        launch_ptrs(0, 0, 0, 0, 0x100, 0x100, 0, 0, 28, 4, 1, 8, 128, 0.1, 2, mask_type, block, 0)
        launch_ptrs(0, 0, 0, 0, 0x100, 0x100, 0, 2, 28, 4, 0, 8, 128, 0.1, 2, mask_type, block, 0)


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("DLMTRT_PLUGIN_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(PluginError, match="run `make plugin`"):
        library_path()
    assert library_sha256() is None


def test_torch_op_shapes_and_cpu_refusal():
    q, k = torch.empty(2, 28, 3, 128, device="meta"), torch.empty(2, 4, 40, 128, device="meta")
    qp, kp = torch.empty(2, 3, dtype=torch.long, device="meta"), torch.empty(2, 40, dtype=torch.long, device="meta")
    out = torch.ops.dlmtrt.cached_attention_cuda(q, k, k, torch.empty(2, 40, dtype=torch.bool, device="meta"), qp, kp,
                                                 1, 4)
    assert out.shape == q.shape and out.device.type == "meta"
    qt = torch.empty(2, 3, 28, 128, device="meta").transpose(1, 2)  # a model's layout: o comes back in it
    assert torch.ops.dlmtrt.cached_attention_cuda(qt, k, k, torch.empty(2, 40, dtype=torch.bool, device="meta"), qp,
                                                  kp, 1, 4).stride() == qt.stride()
    with pytest.raises(PluginError, match="takes CUDA tensors"):
        cached_attention_cuda(torch.zeros(1, 2, 1, 64), torch.zeros(1, 1, 4, 64), torch.zeros(1, 1, 4, 64),
                              torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long),
                              torch.zeros(1, 4, dtype=torch.long))


def test_abi_version_is_checked(monkeypatch):
    launcher._lib.cache_clear()
    monkeypatch.setattr(launcher, "ABI_VERSION", 99)
    with pytest.raises(PluginError, match="rebuild it with `make plugin`"):
        launcher._lib()
    launcher._lib.cache_clear()


def test_the_graph_backend_can_run_attention_through_the_kernel_on_cuda_only():
    from dlmtrt.evals.speed import random_model, shape_args
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    m = random_model(shape_args("tiny-dream"), "cpu", torch.float32)
    with pytest.raises(ValueError, match="runs our CUDA kernel: put the model on a CUDA device"):
        TorchGraphBackend(m, attention="kernel")
    with pytest.raises(ValueError, match="'sdpa' or 'kernel'"):
        TorchGraphBackend(m, attention="flash")
    if torch.cuda.is_available():
        from dlmtrt.plugins.torch_op import plugin_attend
        be = TorchGraphBackend(random_model(shape_args("tiny-dream"), "cuda", torch.float32), attention="kernel")
        assert all(layer.self_attn.attend is plugin_attend for layer in be.model.model.layers)


def test_auto_attention_takes_the_kernel_only_where_it_measured_faster(monkeypatch):
    """`KERNEL_ROWS` is the measured rule (docs/results/attention-kernel.md): fp16/bf16 on CUDA, 2-32 rows per head,
    and on Hopper every count from 2; `auto_attention` runs the kernel there and SDPA elsewhere."""
    from types import SimpleNamespace

    from dlmtrt.models.attention_kinds import AttentionKind
    from dlmtrt.plugins import torch_op
    from dlmtrt.runtime.backends import torch_graph_backend as tgb

    def fake(A, dtype=torch.bfloat16, cuda=True):
        return SimpleNamespace(is_cuda=cuda, dtype=dtype, shape=(1, 28, A, 128))
    assert [A for A in range(0, 300) if torch_op.kernel_is_faster(fake(A))] == list(range(2, 33))
    assert not torch_op.kernel_is_faster(fake(8, torch.float32)) and not torch_op.kernel_is_faster(fake(8, cuda=False))
    assert torch_op.kernel_is_faster(fake(8, torch.float16))
    assert [A for A in range(0, 300) if torch_op.kernel_is_faster(fake(A), hopper=True)] == list(range(2, 300))
    assert not torch_op.kernel_is_faster(fake(768, torch.float32), hopper=True)
    assert not torch_op.is_hopper(torch.device("cpu"))
    assert not torch_op.kernel_is_faster(torch.zeros(1, 28, 8, 128, dtype=torch.bfloat16))  # a CPU tensor

    q, k = torch.randn(1, 4, 8, 64), torch.randn(1, 2, 16, 64)
    v, valid = torch.randn(1, 2, 16, 64), torch.ones(1, 16, dtype=torch.bool)
    qp, kp = torch.arange(8, 16)[None], torch.arange(16)[None]
    calls = []
    monkeypatch.setattr(torch_op, "plugin_attend", lambda *a: calls.append(a) or "kernel")
    monkeypatch.setattr(torch_op, "kernel_is_faster", lambda q, hopper=False: True)
    assert tgb.auto_attention(q, k, v, valid, qp, kp, AttentionKind(), True) == "kernel" and len(calls) == 1
    monkeypatch.setattr(torch_op, "kernel_is_faster", lambda q, hopper=False: False)
    out = tgb.auto_attention(q, k, v, valid, qp, kp, AttentionKind(), True)
    assert torch.equal(out, tgb.gqa_attention(q, k, v, valid, qp, kp, AttentionKind(), True)) and len(calls) == 1


def test_the_graph_backend_defaults_to_auto_and_keeps_sdpa_on_the_cpu():
    from dlmtrt.evals.speed import random_model, shape_args
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend, gqa_attention
    be = TorchGraphBackend(random_model(shape_args("tiny-dream"), "cpu", torch.float32))
    assert be.attention == "auto"
    assert all(layer.self_attn.attend.func is gqa_attention for layer in be.model.model.layers)


def test_the_generated_wgmma_wrappers_are_current():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "plugins" / "cached_attention" / "gen_wgmma_ops.py"
    spec = importlib.util.spec_from_file_location("gen_wgmma_ops", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.source()
    assert path.with_name("wgmma_ops.cuh").read_text() == text
    for shape in ("m64n64k16", "m64n128k16"):
        assert f"wgmma.mma_async.sync.aligned.{shape}.f32.bf16.bf16" in text and f"{shape}.f32.f16.f16" in text
    assert text.count('"+f"(d[63])') == 4  # m64n128 accumulators: S over 128 keys and O at head_dim 128, bf16 and fp16
    assert text.count("void wgmma_ss_m64n128(") == 2 and text.count("void wgmma_rs_m64n64(") == 2
