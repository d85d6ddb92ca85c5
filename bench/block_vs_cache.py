"""Issue 28's comparison: can the training objective itself allow a KV cache? The bidirectional task model under no
cache, dKV-Cache Decode, Fast-dLLM's dual cache and dual+parallel, against block-diffusion task models (SDAR's
layout, trained with dlmtrt/evals/block_diffusion.py) under their own exact cache (`append`), on the same problems.

    python -m bench.block_vs_cache --block-model out/tiny-sdar-b4-tasks --block-model out/tiny-sdar-b16-tasks \
        --n 200 --device cuda --out bench/results/block-vs-cache-h200.json

Cells, every one with its accuracy, forward passes per answer (each problem's own NFE), rows computed per answer
token and tokens/s:
- the bidirectional model (default tiny-llada-tasks) in LLaDA's 2 blocks, one token per step, low-confidence
  remasking, as in the policy tables: none, decode, dual, dual+parallel;
- each block model with its trained block size, one token per step, static low-confidence remasking and the
  dynamic threshold (0.85, SDAR's default); then static remasking at half the steps per block, and with a block
  size other than the trained one (twice it), which SDAR's generation allows and which measures what training
  at one block size costs at another.
Writes JSON (rows plus the exact command) and prints a table; docs/results has the figures.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from dlmtrt.evals.evaluate import evaluate
from dlmtrt.runtime.backends import make_backend

BIDIRECTIONAL = ["none", "decode", "dual", "dual+parallel"]


def block_cells(block: int) -> list[dict]:
    """The block model's schedules: (label, evaluate's schedule options)."""
    return [dict(label=f"blocks of {block}, 1 token/step, static", block_length=block, steps=block,
                 remasking="low_confidence_static"),
            dict(label=f"blocks of {block}, dynamic 0.85", block_length=block, steps=block,
                 remasking="low_confidence_dynamic"),
            dict(label=f"blocks of {block}, {max(block // 2, 1)} steps/block, static", block_length=block,
                 steps=max(block // 2, 1), remasking="low_confidence_static"),
            dict(label=f"blocks of {2 * block} (trained {block}), static", block_length=2 * block, steps=2 * block,
                 remasking="low_confidence_static")]


def run(bidirectional: str, block_models: list[str], tasks: list[str], n: int, batch: int, device: str,
        seed: int, log=print) -> list[dict]:
    rows = []
    be, tok, _ = make_backend("torch", bidirectional, device=device)
    for task in tasks:
        res, _ = evaluate(be, tok, task, n, BIDIRECTIONAL, seed=seed, batch_size=batch, blocks=2)
        rows += [dict(model=bidirectional, objective="masked diffusion", cell=r.schedule, **r.to_dict()) for r in res]
        log(f"{bidirectional} {task}: " + ", ".join(f"{r.policy} {r.accuracy:.3f}" for r in res))
    for path in block_models:
        be, tok, src = make_backend("torch", path, device=device)
        block = src.args.attention_kind.block
        if not block:
            raise click.UsageError(f"{path} is not block-causal (its attention is {src.args.attention}): pass a "
                                   "model trained with --family sdar")
        for task in tasks:
            for cell in block_cells(block):
                opts = {k: v for k, v in cell.items() if k != "label"}
                (r,), _ = evaluate(be, tok, task, n, ["append"], seed=seed, batch_size=batch, **opts)
                rows.append(dict(model=path, objective="block diffusion", trained_block=block, cell=cell["label"],
                                 **r.to_dict()))
                log(f"{Path(path).name} {task} {cell['label']}: {r.accuracy:.3f}, NFE {r.forward_passes:.1f}")
    return rows


@click.command()
@click.option("--bidirectional", default="tiny-llada-tasks", show_default=True)
@click.option("--block-model", "block_models", multiple=True, required=True,
              help="A block-diffusion task model directory (bench/gpu_train.sh FAMILIES=sdar:N); repeatable.")
@click.option("--task", "tasks", multiple=True, default=["sudoku4:clues=8-12", "countdown:numbers=3", "shift128"],
              show_default=True)
@click.option("--n", default=200, show_default=True)
@click.option("--batch-size", "batch", default=200, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", default=1234, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(bidirectional, block_models, tasks, n, batch, device, seed, out):
    from dlmtrt.paths import check_output_file, write_text_atomic
    check_output_file(out)
    rows = run(bidirectional, list(block_models), list(tasks), n, batch, device, seed)
    doc = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "torch": torch.__version__,
           "n": n, "seed": seed, "command": "python -m bench.block_vs_cache " + " ".join(sys.argv[1:]), "rows": rows}
    write_text_atomic(out, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    t = Table(title=f"block diffusion against caches, n={n}")
    for c in ("model", "task", "policy / schedule", "acc", "NFE", "rows/tok"):
        t.add_column(c)
    for r in rows:
        label = r["policy"] if r["objective"] == "masked diffusion" else r["cell"]
        t.add_row(Path(r["model"]).name, r["task"], label, f"{r['accuracy']:.3f}", f"{r['forward_passes']:.1f}",
                  f"{r['rows_per_token']:.1f}")
    Console().print(t)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
