"""`torch.ops.dlmtrt.fp8_linear`: a calibrated fp8 linear for 1-4 rows on CUDA (plugins/fp8_linear/fp8_linear.cu).

Why: a cached denoising step at batch 1 is a chain of matrix-vector products bound by weight reads, and cuBLAS's
FP8 GEMMs do not run faster than bf16 at one row, so fp8 weights saved memory but not time. This kernel reads
the fp8 weights once for all rows. Same ctypes route as the cached-attention launcher: one build for every torch.
`QuantLinear` (models/quantized.py) calls it for few-row fp8 products on CUDA when the library is built and
falls back to `torch._scaled_mm` (or the exact emulation) otherwise.
"""
from __future__ import annotations

import ctypes
import functools
import sys

import torch
from torch import Tensor

from .launcher import DTYPE_CODES, PluginError, find_library, open_library

LIB_NAME = "libdlmtrt_fp8_linear.so"
ABI_VERSION = 1
MAX_ROWS = 4
_state = {"enabled": True, "built": False, "rows": MAX_ROWS}


def library_path():
    """$DLMTRT_FP8_LINEAR_LIB, else the library `make plugin` builds inside the package."""
    return find_library(LIB_NAME, "DLMTRT_FP8_LINEAR_LIB", "the fp8 linear kernel library")


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = open_library(library_path(), "dlmtrt_fp8_linear",
                       [ctypes.c_void_p] * 7 + [ctypes.c_int] * 4 + [ctypes.c_void_p], ABI_VERSION)
    lib.dlmtrt_fp8_linear_max_rows.restype = ctypes.c_int
    if lib.dlmtrt_fp8_linear_max_rows() != MAX_ROWS:
        raise PluginError(f"{library_path()} takes up to {lib.dlmtrt_fp8_linear_max_rows()} rows, this package "
                          f"expects {MAX_ROWS}: rebuild it with `make plugin`")
    return lib


def _built() -> bool:
    try:
        _lib()
    except (PluginError, OSError):
        return False
    return True


DTYPES = (torch.float16, torch.bfloat16)


def set_enabled(on: bool, rows: int = MAX_ROWS) -> None:
    """Route fp8 products of up to `rows` rows through the kernel (default) or none (benchmarks compare in one
    run)."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"rows must be in 1..{MAX_ROWS}, got {rows}")
    _state["enabled"], _state["rows"] = bool(on), rows


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether `fp8_linear` can take this product: CUDA, fp16/bf16, 1-4 rows, K a multiple of 16, the library
    built."""
    return (_state["enabled"] and _state["built"] and x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= _state["rows"]
            and x.shape[1] % 16 == 0 and x.dtype in DTYPES and weight.dtype == torch.float8_e4m3fn)


def _aligned(t: Tensor) -> Tensor:
    """The kernel reads 16 bytes at a time: a view starting mid-allocation is copied."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


@torch.library.custom_op("dlmtrt::fp8_linear", mutates_args=())
def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor, bias: Tensor | None = None,
               out_dtype: torch.dtype | None = None) -> Tensor:
    """y = (e4m3(x / input_scale) @ weight.T) * input_scale * weight_scale + bias, fp32 accumulation, in x's
    dtype. x [M, K] with M <= 4 in fp16/bf16, or already quantised (float8_e4m3fn, then `out_dtype` says the
    output's dtype); weight [N, K] float8_e4m3fn; weight_scale [N] and input_scale [] fp32."""
    M, K = x.shape
    N = weight.shape[0]
    quantised = x.dtype == torch.float8_e4m3fn
    dtype = out_dtype if quantised else x.dtype
    if not (x.is_cuda and weight.is_cuda and weight_scale.is_cuda and input_scale.is_cuda):
        raise PluginError("dlmtrt::fp8_linear takes CUDA tensors; elsewhere QuantLinear emulates the product")
    if dtype not in DTYPES:
        raise PluginError(f"the output dtype must be float16 or bfloat16, got {dtype}"
                          + (" (pass out_dtype with quantised activations)" if quantised else ""))
    if weight.dtype != torch.float8_e4m3fn or tuple(weight.shape) != (N, K) or weight_scale.numel() != N:
        raise PluginError(f"weight must be float8_e4m3fn [N, {K}] with weight_scale [N]; got {weight.dtype} "
                          f"{tuple(weight.shape)}, weight_scale {tuple(weight_scale.shape)}")
    if bias is not None and (bias.numel() != N or bias.dtype != dtype):
        raise PluginError(f"bias must be [{N}] in {dtype}, got {tuple(bias.shape)} {bias.dtype}")
    x, weight = _aligned(x.contiguous()), _aligned(weight.contiguous())
    ws, xs = weight_scale.float().contiguous(), input_scale.float().contiguous()
    b = bias.contiguous() if bias is not None else None
    y = torch.empty(M, N, dtype=dtype, device=x.device)
    scratch = x if quantised else torch.empty(M * K, dtype=torch.uint8, device=x.device)
    lib = _lib()
    rc = lib.dlmtrt_fp8_linear(None if quantised else x.data_ptr(), weight.data_ptr(), ws.data_ptr(),
                               xs.data_ptr(), b.data_ptr() if b is not None else None, scratch.data_ptr(),
                               y.data_ptr(), M, N, K, DTYPE_CODES[str(dtype).removeprefix("torch.")],
                               torch.cuda.current_stream(x.device).cuda_stream)
    if rc:
        raise PluginError(f"fp8 linear: {lib.dlmtrt_fp8_linear_error().decode()}")
    return y


@fp8_linear.register_fake
def _(x, weight, weight_scale, input_scale, bias=None, out_dtype=None):
    dtype = out_dtype if x.dtype == torch.float8_e4m3fn else x.dtype
    return x.new_empty(x.shape[0], weight.shape[0], dtype=dtype)


def _register() -> None:
    from dlmtrt.models import quantized
    _state["built"] = _built()
    quantized.few_row_fp8 = sys.modules[__name__]


_register()
