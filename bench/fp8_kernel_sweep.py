"""Launch configurations of the few-row fp8 kernel (`python3 bench/fp8_kernel_sweep.py OUT.json`, on the device,
after `make fp8-sweep`): warps per block, warps per output group (split of each weight row), weight rows per group
and loads in flight, at 1-4 activation rows for every Dream-7B projection and at one row for the vocabulary head. Each configuration runs over
distinct weight copies (more bytes than L2 holds) inside one CUDA graph, as in a real step, and is checked against
a float64 product. The launcher's choice (plugins/fp8_linear/fp8_linear.cu, `launch_m`) comes from this table.
"""
from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlmtrt.evals.speed import median_ms  # noqa: E402

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944),
          "head": (152064, 3584)}
ROWS = (1, 2, 3, 4)
SPLITS = {1: (1,), 2: (1, 2), 4: (1, 2, 4), 8: (1, 2, 4, 8), 16: (4, 8, 16)}


def main(out: str) -> None:
    lib = ctypes.CDLL(str(ROOT / "dlmtrt/plugins/lib/libdlmtrt_fp8_linear_sweep.so"))
    lib.dlmtrt_fp8_linear_sweep.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 7 + [ctypes.c_void_p]
    torch.manual_seed(0)
    doc = {"gpu": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
           "torch": torch.__version__, "rows": []}
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(28, int(4e9 // (n * k * 3))))
        ws = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies)]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        sw = torch.rand(n, device="cuda") + 0.5
        sx = torch.tensor(0.5, device="cuda")

        def timed(fn) -> float:  # microseconds per weight copy, replaying one CUDA graph over all copies
            return median_ms(fn, "cuda", 20, graph=True) * 1000 / copies

        for m in ROWS if name != "head" else (1,):
            xq = (torch.randn(m, k, device="cuda") * 4).to(torch.float8_e4m3fn)
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = (xq.double() @ ws[0].double().t()) * 0.5 * sw.double()
            ys = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            bf16 = timed(lambda: [torch.nn.functional.linear(xb, w) for w in wb])
            row = {"layer": name, "m": m, "n": n, "k": k, "copies": copies, "bf16_us": bf16, "configs": []}
            for warps, splits in SPLITS.items():
                for split in splits:
                    for r in (1, 2, 4):
                        for u in (1, 2, 4, 8):
                            def run(w=warps, s=split, r=r, u=u):
                                stream = torch.cuda.current_stream().cuda_stream  # the capture stream, in a capture
                                for wq, y in zip(ws, ys):
                                    rc = lib.dlmtrt_fp8_linear_sweep(xq.data_ptr(), wq.data_ptr(), sw.data_ptr(),
                                                                     sx.data_ptr(), y.data_ptr(), m, n, k, w, s, r, u,
                                                                     ctypes.c_void_p(stream))
                                    if rc:
                                        raise RuntimeError(f"config {w},{s},{r},{u}: rc {rc}")
                            us = timed(run)
                            ys[0].zero_()
                            run()
                            err = float((ys[0].double() - ref).norm() / ref.norm())
                            row["configs"].append({"warps": warps, "split": split, "rows": r, "unroll": u, "us": us,
                                                   "GBps": n * k / us / 1e3, "rel_err": err})
            row["configs"].sort(key=lambda c: c["us"])
            best = row["configs"][0]
            print(f"{name} m={m}: bf16 {bf16:.1f} us; best {best}; next "
                  + "; ".join(f"{c['warps']}/{c['split']}/{c['rows']}/{c['unroll']} {c['us']:.1f}"
                              for c in row["configs"][1:6]), flush=True)
            doc["rows"].append(row)
            Path(out).write_text(json.dumps(doc, indent=1))
        del ws, wb
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
