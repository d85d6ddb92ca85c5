"""An FP8 product for a few rows (a batch-1 denoising step), in Triton.

Why: at one to a few active rows a step is a chain of matrix-vector products bound by reading the weights,
so FP8 weights should halve it; but cuBLAS's FP8 GEMMs (`torch._scaled_mm`) are tiled for large M and at
one row run barely faster than the bf16 GEMV (measured on an H200: bench/fp8_gemm.py). This kernel reads
each weight tile once for up to `BLOCK_M` rows, quantises the activation tile to E4M3 in registers with the
static input scale, multiplies on FP8 tensor cores (`tl.dot`, rows padded to 16 by masking) and applies the
per-channel weight scale: the same arithmetic as the `_scaled_mm` path and the emulation (tested against them
on the GPU by bench/gpu_quant.py), up to the order of the sums.

Triton is only needed on a CUDA device; without it `available()` is False and callers use `_scaled_mm`.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch has no triton
    triton = None

MAX_ROWS = 16
BLOCK_N, BLOCK_K = 32, 256


def available(x: Tensor) -> bool:
    return triton is not None and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


if triton is not None:
    @triton.jit
    def _kernel(x_ptr, w_ptr, ws_ptr, xs_ptr, y_ptr, M, N, K, sxm, swn, sym,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)
        rm = tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        xs = tl.load(xs_ptr)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K),
                        other=0.0)
            xq = tl.clamp(x.to(tl.float32) / xs, -448.0, 448.0).to(tl.float8e4nv)
            w = tl.load(w_ptr + rn[None, :] * swn + kk[:, None], mask=(rn[None, :] < N) & (kk[:, None] < K),
                        other=0.0)
            acc = tl.dot(xq, w, acc)
        ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
        y = acc * (ws[None, :] * xs)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def fp8_skinny(x: Tensor, weight: Tensor, weight_scale: Tensor, input_scale: Tensor,
               block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> Tensor:
    """x [M, K] (bf16/fp16, M <= 16) times E4M3 weight [N, K]^T with scales -> [M, N] in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _kernel[(triton.cdiv(N, block_n),)](x, weight, weight_scale, input_scale, y, M, N, K, x.stride(0),
                                        weight.stride(0), y.stride(0), BM=16, BN=block_n, BK=block_k)
    return y
