"""Quality-vs-work table of the decode policies on the shipped task checkpoints.

    python -m bench.policy_table --n 200                  # the full table (hours on a 2-core CPU; minutes on a GPU)
    python -m bench.policy_table --n 50 --task sudoku4:clues=8-12 --task countdown:numbers=3

Each policy runs under the schedule its authors use it with, and every row says which:
- Dream's own schedule (one block, steps = answer length): no cache, dKV-Cache Decode (each shift type),
  Prefill and PD, and ours (adaptive, delayed), alone and with early commit;
- Fast-dLLM's block decoding of Dream: no cache, prefix (`block`) and dual caches, Decode, alone, with
  parallel decoding, early commit and both; in the fewest blocks (>= 2) that divide the task's answer (sudoku 2,
  countdown 2, shift128 3), because this Dream model only knows its trained answer lengths: rounding shift128's
  129 tokens up to 2 x 65 costs it the first letter (0.11 instead of 1.0, bench/results/policies-*.json history);
- LLaDA in 2 blocks with low_confidence remasking: every cache policy that applies, alone, +parallel, +early
  and +parallel+early;
- LLaDA in 2 blocks with random remasking: no cache, Decode and dKV-Cache-Greedy (which needs random remasking).
Every policy of a schedule decodes the same problems. Writes one JSON per model under --out-dir and a
markdown table (policies-<device>.md); `python -m bench.policy_markdown` formats the README's tables.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dlmtrt.evals.evaluate import evaluate
from dlmtrt.evals.tasks import get_task, parse_task
from dlmtrt.runtime.backends import make_backend

MODS = ["", "+parallel", "+early", "+parallel+early"]
# (blocks, remasking, policies) per family; blocks None = Dream's own schedule
SCHEDULES = {
    "dream": [
        (None, None, [c + m for c in ["none", "decode", "decode:shift=un_right", "decode:shift=right", "prefill", "pd",
                                      "adaptive", "delayed"] for m in ["", "+early"]]),
        ("divisor", None, [c + m for c in ["none", "block", "dual", "decode"] for m in MODS]),
    ],
    "llada": [
        (2, None, [c + m for c in ["none", "decode", "block", "dual", "adaptive", "delayed"] for m in MODS]),
        (2, "random", ["none", "decode", "greedy"]),
    ],
}
RESULTS = Path(__file__).resolve().parent / "results"


def task_blocks(blocks, task: str) -> int | None:
    """'divisor': the fewest blocks (>= 2) that divide the task's answer length."""
    if blocks != "divisor":
        return blocks
    n = get_task(parse_task(task)[0]).answer_tokens
    return next(k for k in range(2, n + 1) if n % k == 0)


@click.command()
@click.option("--model", "models", multiple=True, default=["tiny-dream-tasks", "tiny-llada-tasks"], show_default=True)
@click.option("--task", "tasks", multiple=True, default=["sudoku4:clues=8-12", "countdown:numbers=3", "shift128"],
              show_default=True)
@click.option("--policy", "only", multiple=True, help="Run only these policy specs (of every schedule that has them).")
@click.option("--n", default=200, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=100, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS, show_default=True)
def main(models, tasks, only, n, device, batch_size, out_dir):
    console = Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| model | schedule | task | policy | n | accuracy | forward passes | rows/token | early | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in models:
        be, tok, ck = make_backend("torch", model, dtype="float32", device=device)
        schedules = [(b, r, [p for p in pols if not only or p in only]) for b, r, pols in SCHEDULES[ck.family]]
        schedules = [s for s in schedules if s[2]]
        if device.startswith("cuda"):  # kernels and allocator warmed up so the first policy's wall time is fair
            b, r, pols = schedules[0]
            evaluate(be, tok, tasks[0], min(n, batch_size), pols[:1], batch_size=batch_size,
                     blocks=task_blocks(b, tasks[0]), remasking=r)
        rows = []
        with Progress(console=console) as prog:
            for blocks, remasking, pols in schedules:
                for task in tasks:
                    bar = prog.add_task(f"{model} {task}", total=n * len(pols))
                    res, _ = evaluate(be, tok, task, n, pols, batch_size=batch_size, blocks=task_blocks(blocks, task),
                                      remasking=remasking, progress=lambda k, t=bar: prog.advance(t, k))
                    if blocks == "divisor":
                        for r in res:
                            r.schedule = "fast-dllm blocks (2, 2, 3)"
                    rows += res
        out = out_dir / f"policies-{model}-{device.split(':')[0]}.json"
        gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
        out.write_text(json.dumps({"model": model, "device": device, "gpu": gpu, "torch": torch.__version__,
                                   "batch_size": batch_size, "results": [r.to_dict() for r in rows]}, indent=1) + "\n")
        t = Table(title=f"{model} · {device}")
        for col in ("schedule", "task", "policy", "acc", "NFE", "rows/tok", "early", "tok/s"):
            t.add_column(col)
        for r in rows:
            t.add_row(r.schedule, r.task, r.policy, f"{r.accuracy:.3f}", f"{r.forward_passes:.1f}",
                      f"{r.rows_per_token:.1f}", f"{r.early_committed:.1f}", f"{r.tokens_per_s:.0f}")
            lines.append(f"| {model} | {r.schedule} | {r.task} | `{r.policy}` | {r.n} | {r.accuracy:.3f} | "
                         f"{r.forward_passes:.1f} | {r.rows_per_token:.1f} | {r.early_committed:.1f} | "
                         f"{r.tokens_per_s:.0f} |")
        console.print(t)
        console.print(f"results: {out}")
    md = out_dir / f"policies-{device.split(':')[0]}.md"
    md.write_text("\n".join(lines) + "\n")
    console.print(f"table: {md}")


if __name__ == "__main__":
    main()
