"""How the time of one denoising step's matrix products grows with the rows it computes, at Dream-7B shape
(bf16, random weights, CUDA events, medians): the part of a step that prefix reuse or a cache policy shrinks.

    python3 bench/gemm_rows.py OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlmtrt.evals.speed import median_ms  # noqa: E402

H, I, KV, LAYERS, V = 3584, 18944, 512, 28, 152064
SHAPES = {"qkv": (H, H + 2 * KV), "o": (H, H), "gate_up": (H, 2 * I), "down": (I, H)}


def main(path: str) -> None:
    w = {k: torch.randn(n, k_, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (k_, n) in SHAPES.items()}
    rows = []
    for m in (1, 8, 32, 48, 64, 72, 96, 128, 192, 256, 384, 472, 512):
        x = {k: torch.randn(m, s[0], device="cuda", dtype=torch.bfloat16) for k, s in SHAPES.items()}

        def layer():
            for k in SHAPES:
                torch.nn.functional.linear(x[k], w[k])
        per_layer = {k: median_ms(lambda k=k: torch.nn.functional.linear(x[k], w[k]), "cuda", 20)
                     for k in SHAPES}
        total = LAYERS * median_ms(layer, "cuda", 20)
        flops = 2 * m * sum(a * b for a, b in SHAPES.values()) * LAYERS
        byts = 2 * sum(a * b for a, b in SHAPES.values()) * LAYERS
        rows.append({"rows": m, "layers_ms": round(total, 3), "tflops": round(flops / total / 1e9, 1),
                     "weight_gbps": round(byts / total / 1e6, 1), **{f"{k}_ms": round(v, 4) for k, v in per_layer.items()}})
        print(rows[-1], flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
