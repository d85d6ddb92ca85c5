"""Quality-vs-work table of the decode policies on the shipped task checkpoints.

    python -m bench.policy_table --n 200                  # the full table (hours on a 2-core CPU)
    python -m bench.policy_table --n 50 --task sudoku4:clues=8-12 --task countdown:numbers=3

Every policy decodes the same problems; LLaDA decodes in `--blocks` semi-autoregressive blocks so that block
and dual caching have blocks to work on (Dream's diffusion_generate has one block: the answer). Writes one
JSON per model under bench/results/ and a markdown table (bench/results/policies-<device>.md).
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.evaluate import evaluate
from runtime.backends import make_backend

CACHES = ["none", "decode", "greedy", "block", "dual", "adaptive"]
MODS = ["", "+parallel", "+early", "+parallel+early"]
RESULTS = Path(__file__).resolve().parent / "results"


@click.command()
@click.option("--model", "models", multiple=True, default=["tiny-dream-tasks", "tiny-llada-tasks"], show_default=True)
@click.option("--task", "tasks", multiple=True, default=["sudoku4:clues=8-12", "countdown:numbers=3", "shift128"],
              show_default=True)
@click.option("--policy", "policies", multiple=True, default=[c + m for c in CACHES for m in MODS],
              help="[default: each cache policy alone, +parallel and +early]")
@click.option("--n", default=200, show_default=True)
@click.option("--blocks", default=2, show_default=True, help="LLaDA blocks per answer.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=100, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=RESULTS, show_default=True)
def main(models, tasks, policies, n, blocks, device, batch_size, out_dir):
    console = Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"| model | task | policy | n | accuracy | forward passes | rows/token | early | tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in models:
        be, tok, ck = make_backend("torch", model, dtype="float32", device=device)
        b = 1 if ck.family == "dream" else blocks
        if device.startswith("cuda"):  # kernels and allocator warmed up so the first policy's wall time is fair
            evaluate(be, tok, tasks[0], min(n, batch_size), [policies[0]], batch_size=batch_size, blocks=b)
        rows = []
        with Progress(console=console) as prog:
            for task in tasks:
                bar = prog.add_task(f"{model} {task}", total=n * len(policies))
                res, _ = evaluate(be, tok, task, n, list(policies), batch_size=batch_size, blocks=b,
                                  progress=lambda k, t=bar: prog.advance(t, k))
                rows += res
        out = out_dir / f"policies-{model}-{device.split(':')[0]}.json"
        gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else None
        out.write_text(json.dumps({"model": model, "device": device, "gpu": gpu, "torch": torch.__version__,
                                   "blocks": b, "batch_size": batch_size,
                                   "results": [r.to_dict() for r in rows]}, indent=1) + "\n")
        t = Table(title=f"{model} · {device} · blocks {b}")
        for col in ("task", "policy", "acc", "NFE", "rows/tok", "early", "tok/s"):
            t.add_column(col)
        for r in rows:
            t.add_row(r.task, r.policy, f"{r.accuracy:.3f}", f"{r.forward_passes:.1f}", f"{r.rows_per_token:.1f}",
                      f"{r.early_committed:.1f}", f"{r.tokens_per_s:.0f}")
            lines.append(f"| {model} | {r.task} | `{r.policy}` | {r.n} | {r.accuracy:.3f} | {r.forward_passes:.1f} | "
                         f"{r.rows_per_token:.1f} | {r.early_committed:.1f} | {r.tokens_per_s:.0f} |")
        console.print(t)
        console.print(f"results: {out}")
    md = out_dir / f"policies-{device.split(':')[0]}.md"
    md.write_text("\n".join(lines) + "\n")
    console.print(f"table: {md}")


if __name__ == "__main__":
    main()
