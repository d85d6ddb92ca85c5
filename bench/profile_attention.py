"""One shape of the cached-attention kernel launched a few times, for Nsight Compute (run on the device):
`ncu --clock-control none -k regex:attention_kernel -c 1 --section SpeedOfLight python3 bench/profile_attention.py
[B A L]`. Launches through the torch op, as everywhere else."""
from __future__ import annotations

import sys

import torch

import dlmtrt.plugins.torch_op  # noqa: F401


def main(B: int = 8, A: int = 768, L: int = 2048) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, 28, A, 128, generator=g, device="cuda").bfloat16()
    k = torch.randn(B, 4, L, 128, generator=g, device="cuda").bfloat16()
    v = torch.randn_like(k)
    valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    k_pos = torch.arange(L, device="cuda").expand(B, L).contiguous()
    for _ in range(3):
        torch.ops.dlmtrt.cached_attention_cuda(q, k, v, valid, k_pos[:, L - A:].contiguous(), k_pos, 0, 0)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
