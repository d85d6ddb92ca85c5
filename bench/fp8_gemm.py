"""Which FP8 product is fastest for a few rows at Dream-7B's layer shapes (`python3 bench/fp8_gemm.py OUT.json`):
bf16 `F.linear` against `torch._scaled_mm` with row-wise scales (activation [M,1], weight [1,N]) and with
per-tensor scales (the per-channel weight scale applied to the output afterwards), the cost of quantising
the activations (CUDA events, medians of 50, after warm-up; eager launches, so a few us of launch overhead are
in every figure). bench/results/fp8-gemm-h200.json also holds `triton_*` columns: a Triton FP8 kernel for up
to 16 rows measured by this script at commit b1d8559, reverted since (not faster than the bf16 product)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dlmtrt.evals.speed import median_ms  # noqa: E402

SHAPES = {"qkv": (3584, 4608), "o": (3584, 3584), "gate_up": (3584, 37888), "down": (18944, 3584)}
FP8 = torch.float8_e4m3fn


def t(fn, n: int = 50) -> float:
    """Median microseconds."""
    return 1e3 * median_ms(fn, "cuda", n, warmup=5)


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
            rows.append(r)
            print(r, flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
