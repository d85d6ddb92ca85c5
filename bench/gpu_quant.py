"""8-bit formats on the GPU, one device call (`python3 bench/gpu_quant.py OUT.json [kernels,speed,tiny_accuracy]`):

1. `QuantLinear`'s GPU paths against their exact emulation and against the bf16 product: fp8 through
   `torch._scaled_mm` (row-wise scales) and w8a8 through `torch._int_mm`, at Dream-7B's q|k|v shape and 1-256 rows.
2. The shipped tiny models calibrated to fp8 and int8-wo on the GPU in bf16 and evaluated on every task (N=200,
   no cache and the usual cache policy) against the unquantised bf16 model: the real FP8 tensor-core path.
3. `dlmtrt bench` at Dream-7B shape (random weights, torch-graph, B=1): bf16, then fp8, in this process: ms per
   step, tok/s, the one-active-row step and the weight-read floor of each.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlmtrt.models.quantized import QuantLinear, quantize_input  # noqa: E402


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def kernels() -> list[dict]:
    torch.manual_seed(0)
    out = []
    lin = torch.nn.Linear(3584, 4608, bias=False, device="cuda", dtype=torch.bfloat16)
    for fmt in ("fp8", "w8a8"):
        for m in (1, 16, 72, 256):
            x = torch.randn(m, 3584, device="cuda", dtype=torch.bfloat16)
            q = QuantLinear.from_linear(lin, fmt, float(x.abs().max()) / (448 if fmt == "fp8" else 127))
            fast = q(x)
            xq = quantize_input(x, q.input_scale, fmt)
            if fmt == "fp8":
                emu = F.linear((xq.float() * q.input_scale).to(torch.bfloat16), q.dequantized_weight(torch.bfloat16))
            else:
                emu = (xq.float() @ q.weight.float().t() * (q.input_scale * q.weight_scale)).to(torch.bfloat16)
            ref = F.linear(x, lin.weight)
            out.append({"format": fmt, "rows": m, "rel_vs_emulation": rel(fast, emu), "rel_vs_bf16": rel(fast, ref)})
            print(out[-1], flush=True)
    return out


def tiny_accuracy(formats=("fp8", "int8-wo"), tasks=("sudoku4", "countdown", "shift128")) -> list[dict]:
    """Both shipped tiny models in bf16 on the GPU, unquantised and calibrated on the GPU (each task's prompts
    with its own answer length, calibration seed), on every task at N=200 with no cache and the usual cache
    policy: the real FP8 path (`_scaled_mm`), and every task, shift128 included (too slow for the CPU)."""
    from dlmtrt.calibration.pipeline import calibrate
    from dlmtrt.evals.evaluate import evaluate
    from dlmtrt.evals.tasks import calibration_prompts
    from dlmtrt.runtime.backends import make_backend
    policy = {"dream": "decode", "llada": "dual"}
    rows = []
    work = Path(tempfile.mkdtemp())
    prompts, lengths = calibration_prompts(list(tasks), 64)
    for fam in ("dream", "llada"):
        src = f"tiny-{fam}-tasks"
        for fmt in (None, *formats):
            model = src
            if fmt is not None:
                model = str(work / f"{fam}-{fmt}")
                calibrate(src, fmt, model, prompts, new_tokens=lengths, device="cuda", dtype="bfloat16", batch=64)
            be, tok, _ = make_backend("torch", model, dtype="bfloat16", device="cuda")
            for task in tasks:
                res, _ = evaluate(be, tok, task, 200, ["none", policy[fam]], batch_size=100,
                                  blocks=2 if fam == "llada" else None)
                for r in res:
                    rows.append({"family": fam, "format": fmt or "bfloat16", "task": task, "policy": r.policy,
                                 "accuracy": r.accuracy, "n": r.n})
                    print(rows[-1], flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return rows


def speed() -> list[dict]:
    from dlmtrt.evals.speed import bench
    reps = []
    for quant in (None, "fp8"):
        rep = bench("dream-7b", device="cuda", dtype="bfloat16", backend="torch-graph", batch=1, prompt=512,
                    answer=256, policies=("none", "decode", "dual"), quant=quant, log=lambda m: print(m, flush=True))
        d = asdict(rep)
        reps.append(d)
        print(f"{rep.backend}: weights {rep.weight_bytes / 1e9:.2f} GB floor {rep.floor_ms:.2f} ms one-row step "
              f"{rep.single_row_step_ms:.2f} ms; " + "; ".join(f"{r.policy} {r.tokens_per_s:.1f} tok/s "
                                                               f"{r.step_ms_median:.2f} ms" for r in rep.runs), flush=True)
        torch.cuda.empty_cache()
    b, f = reps
    print(f"fp8 / bf16 one-row step: {f['single_row_step_ms'] / b['single_row_step_ms']:.3f}", flush=True)
    return reps


def main(path: str, parts: list[str]) -> None:
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("kernels", kernels), ("speed", speed), ("tiny_accuracy", tiny_accuracy)):
        if name in parts:
            doc[name] = fn()
            Path(path).write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else ["kernels", "speed", "tiny_accuracy"])
