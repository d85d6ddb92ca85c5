"""`dlmtrt calibrate`: an 8-bit checkpoint (fp8, int8 weight-only, SmoothQuant w8a8) calibrated on the model's
own denoising trajectories, stratified by mask ratio."""
from __future__ import annotations

from pathlib import Path

import click

from dlmtrt.dtypes import QUANT_FORMATS

from ._common import (SEED, TEXT, check_device, console, dtype_choice, friendly_errors, output_dir, positive, progress,
                      read_prompt_file)
from ._common import out as stdout



def _prompts(prompts_file: Path | None, tasks: tuple[str, ...], samples: int,
             new_tokens: int | None) -> tuple[list[str], list[int]]:
    """(prompts, answer positions of each): a task's own answer length, `new_tokens` (default 64) for the file's."""
    from dlmtrt.errors import UsageError
    if prompts_file is None and not tasks:
        raise UsageError("no calibration data: pass --prompts FILE (a text file, one prompt per line; \\n inside a "
                         "prompt is a newline) or --task NAME (a built-in task: sudoku4, countdown, shift128)")
    texts: list[str] = []
    lengths: list[int] = []
    if prompts_file is not None:
        lines = read_prompt_file(prompts_file, "--prompts")
        texts += lines[:samples]
        lengths += [new_tokens or 64] * len(lines[:samples])
    if tasks:
        from dlmtrt.evals.tasks import calibration_prompts
        more, own = calibration_prompts(list(tasks), samples)
        texts += more
        lengths += [new_tokens or n for n in own]
    return texts, lengths


@click.command("calibrate")
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias or cached repo id (unquantised).")
@click.option("--format", "fmt", type=click.Choice(QUANT_FORMATS), required=True,
              help="fp8: E4M3 weights (per channel) and activations (static per tensor); int8-wo: int8 weights "
                   "only; w8a8: SmoothQuant int8 weights and activations.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, callback=output_dir,
              help="New directory for the quantised checkpoint (must not exist or be empty).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Text file of calibration prompts, one per line.")
@click.option("--task", "tasks", multiple=True, type=TEXT, help="Built-in task whose prompts to calibrate on (repeatable).")
@click.option("--samples", type=positive(100_000), default=64, show_default=True,
              help="Prompts per task (and at most this many from --prompts).")
@click.option("--new-tokens", type=positive(100_000), default=None,
              help="Answer positions per trajectory [default: each task's answer length; 64 for --prompts].")
@click.option("--steps", type=positive(100_000), default=None, help="Denoising steps per trajectory [default: new tokens].")
@click.option("--strata", type=positive(100), default=8, show_default=True, help="Mask-ratio bins over (0, 1].")
@click.option("--per-stratum", type=positive(100_000), default=32, show_default=True,
              help="Canvases drawn from each bin.")
@click.option("--masked-only", is_flag=True,
              help="Calibrate on fully masked canvases only (for comparison: what step-0 inputs alone give).")
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="SmoothQuant migration strength (w8a8).")
@click.option("--keep-blocks", type=click.IntRange(0, 10_000), default=0, show_default=True,
              help="Leave this many transformer blocks unquantised: those whose quantisation alone changes the "
                   "predictions at masked positions most (KL on the calibration canvases).")
@click.option("--quantize-head", is_flag=True,
              help="Quantise the output head too: at one active row it is 1/7 of an fp8 7B step's weight reads. "
                   "Off by default (the head is the layer every decision is read from); not for tied embeddings.")
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="cpu, cuda, cuda:N or auto: where the trajectories and statistics are computed.")
@click.option("--dtype", type=dtype_choice(), default="float32", show_default=True,
              help="Dtype the trajectories and statistics are computed in.")
@click.option("--batch", type=positive(4096), default=16, show_default=True,
              help="Prompts decoded together when recording trajectories, and canvases per statistics pass.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the stratified draw.")
@friendly_errors
def calibrate_cmd(model, fmt, out, prompts_file, tasks, samples, new_tokens, steps, strata, per_stratum, masked_only,
                  alpha, keep_blocks, quantize_head, device, dtype, batch, seed):
    """Quantise a checkpoint to 8 bits, calibrated across the noise levels its denoising visits.

    \b
    dlmtrt calibrate -m tiny-dream-tasks --format fp8 --task sudoku4 --task countdown --out q/dream-fp8
    dlmtrt calibrate -m dream-7b --format fp8 --prompts prompts.txt --device cuda --dtype bfloat16 --out q/dream-7b-fp8
    """
    from rich.table import Table

    from dlmtrt.calibration.pipeline import calibrate
    texts, lengths = _prompts(prompts_file, tasks, samples, new_tokens)
    with progress() as bar:
        ids = {}

        def tick(stage, n, total):
            if stage not in ids:
                ids[stage] = bar.add_task(stage, total=total)
            bar.advance(ids[stage], n)
        res = calibrate(model, fmt, out, texts, new_tokens=lengths, steps=steps, strata=strata,
                        per_stratum=per_stratum, masked_only=masked_only, alpha=alpha, keep_blocks=keep_blocks,
                        quantize_head=quantize_head, device=device, dtype=dtype, batch=batch, seed=seed, progress=tick)
    t = Table(title=f"calibrated {fmt} checkpoint: {res.out}")
    for col in ("mask ratio", "canvases", "largest layer-input amax"):
        t.add_column(col, justify="right")
    for k, n in sorted(res.per_stratum.items()):
        t.add_row(f"({k / strata:.2f}, {(k + 1) / strata:.2f}]", str(n), f"{res.amax_by_stratum[k]:.3g}")
    stdout.print(t)
    if res.block_sensitivity is not None:
        t = Table(title="block sensitivity (KL at masked positions, that block alone quantised)")
        for col in ("block", "KL", "kept unquantised"):
            t.add_column(col, justify="right")
        for i, kl in enumerate(res.block_sensitivity):
            t.add_row(str(i), f"{kl:.3g}", "yes" if i in res.kept_blocks else "")
        stdout.print(t)
    console.print(f"{res.prompts} prompts, {res.canvases_recorded} canvases recorded, {res.canvases_used} used, "
                  f"{res.layers} layers quantised in {res.seconds:.1f} s; statistics in {res.out / 'quantization.json'}")
