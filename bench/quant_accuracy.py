"""Accuracy of the 8-bit formats on the shipped tiny models, on the CPU (8-bit products emulated with the
GPU's roundings). Writes a JSON and prints one line per cell.

    python -m bench.quant_accuracy [--out F] [--family dream --family llada] [--task sudoku4 --task countdown]
                                   [--variant float32 --variant fp8 ...] [--lengths per-task|shared]

For each family: the float32 model, then `dlmtrt calibrate` in each format (64 prompts per task drawn with the
calibration seed, so never the evaluated problems; 8 mask-ratio strata of 32 canvases), and fp8 calibrated on
fully masked canvases only. Each is evaluated at N=200 problems (evaluation seed) with no cache (`none`) and
with the family's usual cache policy (Dream `decode`, LLaDA `dual` over 2 blocks). `--lengths shared` denoises
every calibration prompt at the longest task's answer length (how bench/results/quant-accuracy-cpu.json was
made, about 45 minutes for the two families on sudoku4 and countdown); `per-task` (default) at each task's own,
as `dlmtrt calibrate --task` does.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dlmtrt.calibration.pipeline import calibrate
from dlmtrt.evals.evaluate import evaluate
from dlmtrt.evals.tasks import calibration_prompts
from dlmtrt.runtime.backends import make_backend

POLICY = {"dream": "decode", "llada": "dual"}
VARIANTS = {"float32": (None, False), "fp8": ("fp8", False), "int8-wo": ("int8-wo", False), "w8a8": ("w8a8", False),
            "fp8, fully masked calibration": ("fp8", True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/quant-accuracy-cpu.json")
    ap.add_argument("--family", action="append", choices=["dream", "llada"])
    ap.add_argument("--task", action="append")
    ap.add_argument("--variant", action="append", choices=list(VARIANTS))
    ap.add_argument("--lengths", choices=["per-task", "shared"], default="per-task")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    tasks = a.task or ["sudoku4", "countdown"]
    prompts, lengths = calibration_prompts(tasks, 64)
    if a.lengths == "shared":
        lengths = [max(lengths)] * len(lengths)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="quant-acc-"))
    for fam in a.family or ["dream", "llada"]:
        src = f"tiny-{fam}-tasks"
        for label in a.variant or list(VARIANTS):
            fmt, masked_only = VARIANTS[label]
            model, calib = src, None
            if fmt is not None:
                out = work / f"{fam}-{label.replace(' ', '_').replace(',', '')}"
                res = calibrate(src, fmt, out, prompts, new_tokens=lengths, masked_only=masked_only, batch=64)
                model, calib = str(out), {"canvases": res.canvases_used, "seconds": round(res.seconds, 1),
                                          "lengths": a.lengths}
            be, tok, _ = make_backend("torch", model)
            for task in tasks:
                t0 = time.perf_counter()
                res, _ = evaluate(be, tok, task, a.n, ["none", POLICY[fam]], batch_size=100,
                                  blocks=2 if fam == "llada" else None)
                for r in res:
                    rows.append({"family": fam, "variant": label, "format": fmt, "masked_only": masked_only,
                                 "task": task, "policy": r.policy, "n": r.n, "accuracy": r.accuracy,
                                 "correct": r.correct, "calibration": calib})
                    print(f"{fam:5s} {label:30s} {task:10s} {r.policy:6s} accuracy {r.accuracy:.3f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                Path(a.out).write_text(json.dumps({"device": "cpu", "n": a.n, "lengths": a.lengths, "rows": rows},
                                                  indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
