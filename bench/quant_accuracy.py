"""Accuracy of the 8-bit formats on the shipped tiny models (`python -m bench.quant_accuracy`, CPU, about 45
minutes; writes bench/results/quant-accuracy-cpu.json and prints a table).

For each family: the float32 model, then `dlmtrt calibrate` in every format (calibrated on 64 sudoku4 + 64
countdown prompts drawn with the calibration seed, so never the evaluated problems; 8 mask-ratio strata of 32
canvases), and fp8 calibrated on fully masked canvases only. Each is evaluated on sudoku4 and countdown, N=200
problems (evaluation seed), with no cache (`none`) and with the family's usual cache policy (Dream `decode`,
LLaDA `dual` over 2 blocks). On the CPU the 8-bit products are emulated with the same roundings as on a GPU.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from dlmtrt.calibration.pipeline import calibrate
from dlmtrt.evals.evaluate import evaluate
from dlmtrt.evals.tasks import get_task
from dlmtrt.runtime.backends import make_backend

TASKS = ["sudoku4", "countdown"]
POLICY = {"dream": "decode", "llada": "dual"}
VARIANTS = [("float32", None, False), ("fp8", "fp8", False), ("int8-wo", "int8-wo", False), ("w8a8", "w8a8", False),
            ("fp8, fully masked calibration", "fp8", True)]


def prompts() -> list[str]:
    out = []
    for t in TASKS:
        out += [p.prompt for p in get_task(t).problems(64, 99)]
    return out


def main(path: str, n: int = 200) -> None:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="quant-acc-"))
    for fam in ("dream", "llada"):
        src = f"tiny-{fam}-tasks"
        for label, fmt, masked_only in VARIANTS:
            model, calib = src, None
            if fmt is not None:
                out = work / f"{fam}-{label.replace(' ', '_').replace(',', '')}"
                res = calibrate(src, fmt, out, prompts(), new_tokens=max(get_task(t).answer_tokens for t in TASKS),
                                masked_only=masked_only, batch=64)
                model, calib = str(out), {"canvases": res.canvases_used, "seconds": round(res.seconds, 1)}
            be, tok, _ = make_backend("torch", model)
            for task in TASKS:
                t0 = time.perf_counter()
                res, _ = evaluate(be, tok, task, n, ["none", POLICY[fam]], batch_size=100,
                                  blocks=2 if fam == "llada" else None)
                for r in res:
                    rows.append({"family": fam, "variant": label, "format": fmt, "masked_only": masked_only,
                                 "task": task, "policy": r.policy, "n": r.n, "accuracy": r.accuracy,
                                 "correct": r.correct, "calibration": calib})
                    print(f"{fam:5s} {label:30s} {task:10s} {r.policy:6s} accuracy {r.accuracy:.3f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
                Path(path).write_text(json.dumps({"device": "cpu", "n": n, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/quant-accuracy-cpu.json")
