"""8-bit formats on the GPU (`python3 bench/gpu_quant.py OUT.json PARTS`, PARTS a comma list of
kernels, tiny_accuracy, fp8_kernel, speed, speed_compile, keep_blocks, keep_blocks_dream, speed_compile_head,
speed_compile_kept, head_accuracy):

1. `kernels`: `QuantLinear`'s GPU paths against their exact emulation and against the bf16 product: fp8 through
   `torch._scaled_mm` (row-wise scales) and w8a8 through `torch._int_mm`, at Dream-7B's q|k|v shape and 1-256 rows.
2. `tiny_accuracy`: the shipped tiny models calibrated to fp8 and int8-wo on the GPU in bf16 and evaluated on every task (N=200,
   no cache and the usual cache policy) against the unquantised bf16 model: the real FP8 tensor-core path.
3. `fp8_kernel`: our few-row fp8 kernel (plugins/fp8_linear) against float64 and `_scaled_mm`, and its time per
   Dream-7B projection at 1-4 rows against bf16 and `_scaled_mm` (`fp8_kernel`).
4. `dlmtrt bench` at Dream-7B shape (random weights, torch-graph, B=1): bf16, fp8 with our kernel and fp8 with
   `_scaled_mm` only, in this process (`speed`; `speed_compile` with torch.compile): ms per step, tok/s, the
   one-active-row step and the weight-read floor of each.
5. `keep_blocks`: item 2 for bf16, fp8 with its most sensitive block left in bf16 (`calibrate --keep-blocks 1`)
   and plain fp8; `keep_blocks_dream`: Dream with 2 and 3 blocks kept.
6. `speed_compile_head`: item 4 compiled, decode policy, for bf16, fp8 and fp8 with the head quantised too
   (`calibrate --quantize-head`); `head_accuracy`: item 2 for the kept-block fp8 checkpoints of item 5 (LLaDA
   keep 1, Dream keep 2) with and without the head quantised; `speed_compile_kept`: the one-row step compiled
   for bf16 and fp8 with the head quantised and 0, 1 or 2 blocks kept in bf16.
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


SHAPES_7B = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}


@torch.no_grad()
def fp8_kernel() -> dict:
    """Our few-row fp8 kernel (plugins/fp8_linear, through `torch.ops.dlmtrt.fp8_linear`, the call QuantLinear
    makes) against a float64 product of the same e4m3 values, and against `torch._scaled_mm`; then the time of
    each Dream-7B projection at 1-4 rows against bf16 `F.linear` and `_scaled_mm`, each over 28 distinct
    weight copies (more than L2 holds) inside one CUDA graph, so the figures are DRAM-bound as in a real step."""
    from dlmtrt.evals.speed import median_ms
    from dlmtrt.plugins import fp8_linear as k
    torch.manual_seed(0)
    out = []
    shapes = dict(SHAPES_7B, odd=(100, 64))
    for name, (n, kdim) in shapes.items():
        for dtype in (torch.bfloat16, torch.float16):
            lin = torch.nn.Linear(kdim, n, bias=name in ("qkv", "odd"), device="cuda", dtype=dtype)
            for m in range(1, 5):
                x = torch.randn(m, kdim, device="cuda", dtype=dtype) * 3
                q = QuantLinear.from_linear(lin, "fp8", float(x.abs().max()) / 448 * 0.5)  # some saturate
                assert k.usable(x, q.weight)
                y = q(x)
                xq = quantize_input(x, q.input_scale, "fp8")
                ref = (xq.double() @ q.weight.double().t()) * q.input_scale.double() * q.weight_scale.double()
                if lin.bias is not None:
                    ref = ref + lin.bias.double()
                pre = k.fp8_linear(xq, q.weight, q.weight_scale, q.input_scale, lin.bias, dtype)
                row = {"layer": name, "dtype": str(dtype).removeprefix("torch."), "rows": m,
                       "rel_vs_float64": rel(y, ref), "max_rel_vs_float64": float(((y.double() - ref).abs()
                                                                                   / ref.abs().clamp_min(1e-3)).max()),
                       "prequantised_equal": bool(torch.equal(pre, y))}
                if dtype == torch.bfloat16 and n % 16 == 0:
                    sm = torch._scaled_mm(xq, q.weight.t(), scale_a=q.input_scale.expand(m, 1).contiguous(),
                                          scale_b=q.weight_scale[None, :], out_dtype=dtype)
                    if lin.bias is not None:
                        sm = sm + lin.bias
                    row["rel_scaled_mm_vs_float64"] = rel(sm, ref)
                    row["equal_to_scaled_mm"] = float((sm == y).float().mean())
                out.append(row)
            print({k2: v for k2, v in out[-1].items()}, flush=True)
    timing = []
    for name, (n, kdim) in SHAPES_7B.items():
        lins = [torch.nn.Linear(kdim, n, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(28)]
        for m in (1, 2, 3, 4):
            x = torch.randn(m, kdim, device="cuda", dtype=torch.bfloat16)
            qs = [QuantLinear.from_linear(lin, "fp8", float(x.abs().max()) / 448) for lin in lins]
            xq = quantize_input(x, qs[0].input_scale, "fp8")
            variants = {"bf16": lambda: [F.linear(x, lin.weight) for lin in lins],
                        "fp8_kernel": lambda: [q(x) for q in qs],
                        "fp8_kernel_prequantised": lambda: [k.fp8_linear(xq, q.weight, q.weight_scale, q.input_scale,
                                                                         None, torch.bfloat16) for q in qs]}

            def scaled():
                k.set_enabled(False)
                try:
                    return [q(x) for q in qs]
                finally:
                    k.set_enabled(True)
            variants["fp8_scaled_mm"] = scaled
            row = {"layer": name, "rows": m, "n": n, "k": kdim}
            for label, fn in variants.items():
                us = median_ms(fn, "cuda", 20, graph=True) * 1000 / len(lins)
                wbytes = n * kdim * (2 if label == "bf16" else 1)
                row[f"{label}_us"] = us
                row[f"{label}_GBps"] = wbytes / us / 1e3
            timing.append(row)
            print(row, flush=True)
        del lins, qs
        torch.cuda.empty_cache()
    return {"numerics": out, "timing": timing}


def tiny_accuracy(formats=("fp8", "int8-wo"), tasks=("sudoku4", "countdown", "shift128"), partial=None,
                  families=("dream", "llada")) -> list[dict]:
    """Both shipped tiny models in bf16 on the GPU, unquantised and calibrated on the GPU (each task's prompts
    with its own answer length, calibration seed), on every task at N=200 with no cache and the usual cache
    policy: the real FP8 path (`_scaled_mm`), and every task, shift128 included (too slow for the CPU).
    A format "F+keepN" is F calibrated with `keep_blocks=N`, "F+head" with the head quantised too (both may be
    given, per family as "F+keepN@family"). `partial(rows)` is called after every cell."""
    from dlmtrt.calibration.pipeline import calibrate
    from dlmtrt.evals.evaluate import evaluate
    from dlmtrt.evals.tasks import calibration_prompts
    from dlmtrt.runtime.backends import make_backend
    policy = {"dream": "decode", "llada": "dual"}
    rows = []
    work = Path(tempfile.mkdtemp())
    prompts, lengths = calibration_prompts(list(tasks), 64)
    for fam in families:
        src = f"tiny-{fam}-tasks"
        for label in (None, *formats):
            model, extra = src, {}
            if label is not None:
                label, _, only = label.partition("@")
                if only and only != fam:
                    continue
                fmt, *opts = label.split("+")
                keep = next((int(o[4:]) for o in opts if o.startswith("keep")), 0)
                model = str(work / f"{fam}-{label}")
                res = calibrate(src, fmt, model, prompts, new_tokens=lengths, device="cuda", dtype="bfloat16",
                                batch=64, keep_blocks=keep, quantize_head="head" in opts)
                if res.block_sensitivity is not None:
                    extra = {"block_sensitivity": res.block_sensitivity,
                             "kept_blocks": res.kept_blocks}
                    print(label, extra, flush=True)
            be, tok, _ = make_backend("torch", model, dtype="bfloat16", device="cuda")
            for task in tasks:
                res, _ = evaluate(be, tok, task, 200, ["none", policy[fam]], batch_size=100,
                                  blocks=2 if fam == "llada" else None)
                for r in res:
                    rows.append({"family": fam, "format": label or "bfloat16", "task": task, "policy": r.policy,
                                 "accuracy": r.accuracy, "n": r.n, **extra})
                    print({k: v for k, v in rows[-1].items() if k != "block_sensitivity"}, flush=True)
                    if partial is not None:
                        partial(rows)
    shutil.rmtree(work, ignore_errors=True)
    return rows


VARIANTS = ((None, True, False), ("fp8", True, False), ("fp8", False, False))
KEPT = ((None, True, False, 0), ("fp8", True, True, 0), ("fp8", True, True, 1), ("fp8", True, True, 2))


def speed(compile: bool = False, policies=("none", "decode", "dual"), variants=VARIANTS, partial=None) -> list[dict]:
    """bf16, fp8 through our few-row kernel, fp8 through `torch._scaled_mm` only (`variants`: (quant, our
    kernel, head quantised too[, blocks kept])): in this process."""
    from dlmtrt.evals.speed import bench
    from dlmtrt.plugins import fp8_linear as k
    reps = []
    for quant, kernel, head, *keep in variants:
        k.set_enabled(kernel)
        rep = bench("dream-7b", device="cuda", dtype="bfloat16", backend="torch-graph", batch=1, prompt=512,
                    answer=256, policies=policies, quant=quant, quantize_head=head, compile=compile,
                    keep_blocks=keep[0] if keep else 0, log=lambda m: print(m, flush=True))
        k.set_enabled(True)
        d = asdict(rep)
        d["fp8_kernel"] = kernel if quant == "fp8" else None
        d["head_quantized"] = head
        d["blocks_kept"] = keep[0] if keep else 0
        reps.append(d)
        if partial is not None:
            partial(reps)
        print(f"{rep.backend}: weights {rep.weight_bytes / 1e9:.2f} GB floor {rep.floor_ms:.2f} ms one-row step "
              f"{rep.single_row_step_ms:.3f} ms; " + "; ".join(f"{r.policy} {r.tokens_per_s:.1f} tok/s "
                                                               f"{r.step_ms_median:.2f} ms" for r in rep.runs), flush=True)
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    for r in reps[1:]:
        print(f"one-row step {r['backend']} (kernel {r['fp8_kernel']}) / bf16: "
              f"{r['single_row_step_ms'] / reps[0]['single_row_step_ms']:.3f}", flush=True)
    return reps


def main(path: str, parts: list[str]) -> None:
    doc = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    def partial(name):
        def write(rows):
            Path(path).write_text(json.dumps(doc | {name: rows}, indent=1))
        return write
    for name, fn in (("kernels", kernels), ("fp8_kernel", fp8_kernel), ("speed", speed),
                     ("speed_compile", lambda: speed(compile=True, policies=("decode", "dual"))),
                     ("speed_compile_head", lambda: speed(compile=True, policies=("decode",),
                                                          variants=((None, True, False), ("fp8", True, False),
                                                                    ("fp8", True, True)),
                                                          partial=partial("speed_compile_head"))),
                     ("speed_compile_kept", lambda: speed(compile=True, policies=(), variants=KEPT,
                                                          partial=partial("speed_compile_kept"))),
                     ("head_accuracy", lambda: tiny_accuracy(("fp8+keep1@llada", "fp8+keep1+head@llada",
                                                              "fp8+keep2@dream", "fp8+keep2+head@dream"),
                                                             partial=partial("head_accuracy"))),
                     ("tiny_accuracy", lambda: tiny_accuracy(partial=partial("tiny_accuracy"))),
                     ("keep_blocks", lambda: tiny_accuracy(("fp8+keep1", "fp8"), partial=partial("keep_blocks"))),
                     ("keep_blocks_dream", lambda: tiny_accuracy(("fp8+keep2", "fp8+keep3"), families=("dream",),
                                                                 partial=partial("keep_blocks_dream")))):
        if name in parts:
            doc[name] = fn()
            Path(path).write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else ["kernels", "speed", "tiny_accuracy"])
