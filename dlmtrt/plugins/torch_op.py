"""`torch.ops.dlmtrt.cached_attention_cuda`: the kernel as a torch custom op (CUDA tensors), through the same
launcher the TensorRT plugin calls, so the torch backends can run it and the GPU test exercises the plugin's
code path. Semantics: `models.transformer.cached_attention` (q [B,H,A,D], k/v [B,Hkv,L,D], valid [B,L] bool,
q_pos [B,A] and k_pos [B,L] sequence positions, the attention kind as mask_type and block)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .launcher import DTYPE_CODES, PluginError, launch_ptrs, workspace_size


@torch.library.custom_op("dlmtrt::cached_attention_cuda", mutates_args=())
def cached_attention_cuda(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_pos: Tensor, k_pos: Tensor,
                          mask_type: int = 0, block: int = 0, scale: float | None = None) -> Tensor:
    if not (q.is_cuda and k.is_cuda and v.is_cuda and valid.is_cuda):
        raise PluginError("dlmtrt::cached_attention_cuda takes CUDA tensors; on the CPU use "
                          "models.transformer.cached_attention")
    if not (q.dtype == k.dtype == v.dtype) or str(q.dtype).removeprefix("torch.") not in DTYPE_CODES:
        raise PluginError(f"q, k, v must share one of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, A, D = q.shape
    _, Hkv, L, _ = k.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or tuple(valid.shape) != (B, L) or \
            tuple(q_pos.shape) != (B, A) or tuple(k_pos.shape) != (B, L):
        raise PluginError(f"shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                          f"valid {tuple(valid.shape)}, q_pos {tuple(q_pos.shape)}, k_pos {tuple(k_pos.shape)}")
    # a model's q is [B, A, H, D] transposed: the kernel reads it (and writes o) in that order, no copies
    heads_inner = not q.is_contiguous() and q.transpose(1, 2).is_contiguous()
    q = q if heads_inner else q.contiguous()
    k, v = k.contiguous(), v.contiguous()
    valid = valid.to(torch.bool).contiguous()
    q_pos, k_pos = q_pos.to(torch.int64).contiguous(), k_pos.to(torch.int64).contiguous()
    o = torch.empty(B, A, H, D, dtype=q.dtype, device=q.device).transpose(1, 2) if heads_inner else torch.empty_like(q)
    code = DTYPE_CODES[str(q.dtype).removeprefix("torch.")]
    ws_bytes = workspace_size(B, H, Hkv, A, L, D, code) if A else 0
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=q.device) if ws_bytes else None
    launch_ptrs(q.data_ptr(), k.data_ptr(), v.data_ptr(), valid.data_ptr(), q_pos.data_ptr(), k_pos.data_ptr(),
                o.data_ptr(), B, H, Hkv, A, L, D, 1.0 / math.sqrt(D) if scale is None else scale, code, mask_type,
                block, torch.cuda.current_stream(q.device).cuda_stream, 0 if ws is None else ws.data_ptr(), ws_bytes,
                int(heads_inner))
    return o


@cached_attention_cuda.register_fake
def _(q, k, v, valid, q_pos, k_pos, mask_type=0, block=0, scale=None):
    return torch.empty_like(q)


def plugin_attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_pos: Tensor, k_pos: Tensor, kind) -> Tensor:
    """Drop-in for a layer's `attend` (models.transformer): the kernel instead of PyTorch's attention."""
    return cached_attention_cuda(q, k, v, valid, q_pos, k_pos, kind.mask_type, kind.block)


# Active rows per head for which the kernel beat PyTorch's fused attention at every batch (1, 8, 32) and cache
# length (768, 2048, 8192) measured, bidirectional and block-causal, bf16 on an H200 (docs/results/
# attention-kernel.md). The mma.sync kernel (every GPU) wins at 2-32 rows (0.15x-0.81x of SDPA's time); on Hopper
# the warp-specialised wgmma kernel takes over from 256 rows per GQA group and wins at every row count measured
# above that (0.55x-0.96x), so Hopper takes the kernel from 2 rows on. One row stays with SDPA: it was slower at
# batch 32 or 8192 keys (up to 1.25x).
KERNEL_ROWS = range(2, 33)
HOPPER_KERNEL_MIN_ROWS = 2


def kernel_is_faster(q: Tensor, hopper: bool = False) -> bool:
    """Whether the measured rule picks the kernel for this call: CUDA fp16/bf16 with rows in KERNEL_ROWS, or at
    least HOPPER_KERNEL_MIN_ROWS on a Hopper GPU (`hopper`, decided once per backend); fp32 runs the kernel's
    scalar path, far slower than SDPA."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    return q.shape[2] >= HOPPER_KERNEL_MIN_ROWS if hopper else q.shape[2] in KERNEL_ROWS


def is_hopper(device: torch.device) -> bool:
    """sm_90 (H100, H200, GH200): where the library runs its wgmma kernel."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
