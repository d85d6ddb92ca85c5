"""The few-row fp8 linear kernel library (plugins/fp8_linear) on a machine without a GPU: `make plugin` built it,
it exports its C ABI, refuses bad launches with the reason before touching the GPU, and QuantLinear only routes
products to it on CUDA. Its numerics and speed run on the GPU (bench/gpu_quant.py fp8_kernel, README)."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from dlmtrt.models import quantized
from dlmtrt.models.quantized import QuantLinear
from dlmtrt.plugins import fp8_linear as k
from dlmtrt.plugins.launcher import PluginError


def test_the_library_is_built_with_its_c_abi_and_every_target_architecture():
    path = k.library_path()
    lib = ctypes.CDLL(str(path))
    for name in ("dlmtrt_fp8_linear", "dlmtrt_fp8_linear_error", "dlmtrt_fp8_linear_abi_version",
                 "dlmtrt_fp8_linear_max_rows"):
        assert hasattr(lib, name)
    assert k._lib().dlmtrt_fp8_linear_max_rows() == k.MAX_ROWS
    if shutil.which("cuobjdump"):
        archs = subprocess.run(["cuobjdump", "--list-elf", str(path)], capture_output=True, text=True, check=True)
        for sm in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_120"):
            assert sm in archs.stdout


def test_importing_the_plugin_registers_it_with_quantlinear():
    assert quantized.few_row_fp8 is k
    assert k._state["built"]


def launch(M=1, N=64, K=64, dtype=2):
    lib = k._lib()
    rc = lib.dlmtrt_fp8_linear(None, None, None, None, None, None, None, M, N, K, dtype, None)
    return rc, lib.dlmtrt_fp8_linear_error().decode()


@pytest.mark.parametrize("kw,message", [
    (dict(M=5), "1 <= M <= 4"),
    (dict(M=-1), "bad shape"),
    (dict(K=40), "K a multiple of 16"),
    (dict(N=0), "bad shape"),
    (dict(dtype=0), "dtype code 0 is not supported (1 fp16, 2 bf16)"),
])
def test_bad_launches_are_refused_with_the_reason(kw, message):
    rc, err = launch(**kw)
    assert rc != 0
    assert message in err


def test_a_misaligned_weight_is_refused_and_the_op_copies_views_to_alignment():
    lib = k._lib()
    rc = lib.dlmtrt_fp8_linear(None, 8, None, None, None, 16, None, 1, 64, 64, 2, None)
    assert rc == 2 and "16-byte aligned" in lib.dlmtrt_fp8_linear_error().decode()
    base = torch.zeros(80, dtype=torch.uint8)
    view = base[8:72]
    assert view.data_ptr() % 16 == 8
    fixed = k._aligned(view)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    assert k._aligned(base) is base


def test_an_empty_launch_is_a_no_op():
    assert launch(M=0)[0] == 0


def test_the_op_refuses_cpu_tensors_and_names_the_fallback():
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    w = torch.randn(16, 32).to(torch.float8_e4m3fn)
    with pytest.raises(PluginError, match="CUDA tensors"):
        k.fp8_linear(x, w, torch.ones(16), torch.tensor(0.1))


def test_usable_only_for_cuda_few_rows_fp16_bf16_and_k_multiple_of_16(monkeypatch):
    w = torch.zeros(16, 32).to(torch.float8_e4m3fn)
    assert not k.usable(torch.zeros(1, 32, dtype=torch.bfloat16), w)  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert k.usable(torch.zeros(1, 32, dtype=torch.bfloat16), w)
    assert k.usable(torch.zeros(4, 32, dtype=torch.float16), w)
    assert not k.usable(torch.zeros(5, 32, dtype=torch.bfloat16), w)
    assert not k.usable(torch.zeros(0, 32, dtype=torch.bfloat16), w)
    assert not k.usable(torch.zeros(1, 32, dtype=torch.float32), w)
    assert not k.usable(torch.zeros(1, 24, dtype=torch.bfloat16), torch.zeros(16, 24).to(torch.float8_e4m3fn))
    assert not k.usable(torch.zeros(1, 32, dtype=torch.bfloat16), w.view(torch.int8))
    k.set_enabled(False)
    try:
        assert not k.usable(torch.zeros(1, 32, dtype=torch.bfloat16), w)
    finally:
        k.set_enabled(True)


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("DLMTRT_FP8_LINEAR_LIB", str(tmp_path / "nope.so"))
    k._lib.cache_clear()
    try:
        with pytest.raises(PluginError, match="run `make plugin`"):
            k._lib()
        assert not k._built()
    finally:
        monkeypatch.undo()
        k._lib.cache_clear()


def test_quantlinear_on_the_cpu_keeps_its_exact_emulation():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16, bias=True)
    x = torch.randn(3, 32)
    q = QuantLinear.from_linear(lin, "fp8", float(x.abs().max()) / 448)
    xq = quantized.quantize_input(x, q.input_scale, "fp8")
    ref = torch.nn.functional.linear(xq.float() * q.input_scale, q.dequantized_weight(torch.float32), lin.bias)
    torch.testing.assert_close(q(x), ref, rtol=0, atol=0)


def test_the_fake_kernel_gives_the_output_shape_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 64, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(48, 64, dtype=torch.float8_e4m3fn, device="cuda")
        y = torch.ops.dlmtrt.fp8_linear(x, w, torch.empty(48, device="cuda"), torch.empty((), device="cuda"), None)
    assert tuple(y.shape) == (3, 48) and y.dtype == torch.bfloat16


def test_the_fake_kernel_takes_quantised_activations_with_an_output_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 64, dtype=torch.float8_e4m3fn, device="cuda")
        w = torch.empty(48, 64, dtype=torch.float8_e4m3fn, device="cuda")
        y = torch.ops.dlmtrt.fp8_linear(x, w, torch.empty(48, device="cuda"), torch.empty((), device="cuda"), None,
                                        torch.float16)
    assert tuple(y.shape) == (2, 48) and y.dtype == torch.float16


def test_set_enabled_checks_the_row_limit():
    with pytest.raises(ValueError, match="rows must be in 1..4"):
        k.set_enabled(True, rows=5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's import
def test_a_compiled_step_hands_the_kernel_activations_quantised_in_the_graph(monkeypatch):
    """Under torch.compile QuantLinear quantises the activations itself (the quantisation fuses into the kernel
    producing them) and passes e4m3 values with the output dtype; eagerly it passes the activations as they are.
    The op's CUDA launch is replaced by a CPU implementation of the same product to trace this here."""
    calls = []

    def cpu_impl(x, weight, weight_scale, input_scale, bias=None, out_dtype=None):
        calls.append(x.dtype)
        xq = x if x.dtype == torch.float8_e4m3fn else quantized.quantize_input(x, input_scale, "fp8")
        y = (xq.float() @ weight.float().t()) * input_scale * weight_scale
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype if x.dtype == torch.float8_e4m3fn else x.dtype)

    lib = torch.library.Library("dlmtrt", "IMPL")  # noqa: TOR901  test-only CPU kernel, dropped below
    lib.impl("fp8_linear", cpu_impl, "CPU")
    monkeypatch.setattr(k, "usable", lambda x, w: x.dim() == 2 and 1 <= x.shape[0] <= k.MAX_ROWS)
    try:
        torch.manual_seed(0)
        q = QuantLinear.from_linear(torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16), "fp8", 0.01)
        torch._dynamo.reset()
        f = torch.compile(q, fullgraph=True, dynamic=True)
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        eager = q(x)
        assert calls == [torch.bfloat16]
        compiled = f(x)
        assert calls[1:] == [torch.float8_e4m3fn]
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
        calls.clear()
        assert f(torch.randn(7, 64, dtype=torch.bfloat16)).shape == (7, 48) and calls == []  # > MAX_ROWS
    finally:
        lib._destroy()
        torch._dynamo.reset()
