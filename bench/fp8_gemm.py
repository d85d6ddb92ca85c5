"""Which FP8 product is fastest for a few rows at Dream-7B's layer shapes (`python3 bench/fp8_gemm.py OUT.json`):
bf16 `F.linear` against `torch._scaled_mm` with row-wise scales (activation [M,1], weight [1,N]) and with
per-tensor scales (the per-channel weight scale applied to the output afterwards), the cost of quantising
the activations, and our Triton kernel (dlmtrt/models/fp8_skinny.py) at a few tile sizes, with its relative
error against the emulated product (CUDA events, medians of 50, after warm-up; eager launches, so a few us of
launch overhead are in every figure)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dlmtrt.models.fp8_skinny import fp8_skinny  # noqa: E402

TILES = [(16, 256), (32, 256), (64, 128), (32, 512), (64, 256), (16, 512)]

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}
FP8 = torch.float8_e4m3fn


def t(fn, n: int = 50) -> float:
    for _ in range(5):
        fn()
    out = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3)
    return statistics.median(out)


def main(path: str) -> None:
    rows = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        ws = w.float().abs().amax(1) / 448
        wq = (w.float() / ws[:, None]).to(FP8)
        one = torch.ones((), device="cuda")
        for m in (1, 4, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            sx = x.float().abs().amax() / 448
            xq = (x.float() / sx).to(FP8)
            sa = sx.expand(m, 1).contiguous()
            r = {"layer": name, "rows": m, "bf16_us": t(lambda: F.linear(x, w))}
            try:
                r["fp8_rowwise_us"] = t(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=ws[None, :],
                                                                 out_dtype=torch.bfloat16))
            except RuntimeError as e:
                r["fp8_rowwise_us"] = str(e).splitlines()[0]
            try:
                r["fp8_tensorwise_us"] = t(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=one,
                                                                    out_dtype=torch.bfloat16) * ws)
            except RuntimeError as e:
                r["fp8_tensorwise_us"] = str(e).splitlines()[0]
            r["quantize_input_us"] = t(lambda: (x.float() / sx).clamp(-448, 448).to(FP8))
            r["quantize_input_bf16_us"] = t(lambda: (x * (1 / sx).to(torch.bfloat16)).to(FP8))
            if m <= 16:
                xs = sx.reshape(()).float()
                emu = F.linear(((x.float() / xs).clamp(-448, 448).to(FP8).float() * xs).to(torch.bfloat16),
                               (wq.float() * ws[:, None]).to(torch.bfloat16)).float()
                for bn, bk in TILES:
                    y = fp8_skinny(x, wq, ws, xs, bn, bk).float()
                    r[f"triton_{bn}x{bk}_us"] = t(lambda: fp8_skinny(x, wq, ws, xs, bn, bk))
                    r[f"triton_{bn}x{bk}_rel"] = float((y - emu).norm() / emu.norm())
            rows.append(r)
            print(r, flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
