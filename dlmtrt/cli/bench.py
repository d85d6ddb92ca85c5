"""`dlmtrt bench`: speed of every policy at a named model shape with random weights, against the weight-read floor."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from dlmtrt.dtypes import DTYPE_NAMES, QUANT_FORMATS
from dlmtrt.models.families import shapes
from dlmtrt.runtime.backends import BACKENDS

from ._common import POSITIVE_TOKENS, SEED, TEXT, check_device, console, friendly_errors, out, output_file, positive


@click.command("bench")
@click.option("--shape", type=click.Choice(list(shapes())), default=next(s for s in shapes() if s.startswith("tiny-")),
              show_default=True, help="Model shape, built with random weights (nothing is downloaded).")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default=None,
              help="Dtype of the random weights, the K/V cache and the arithmetic [default: bfloat16 on a GPU, "
                   "float32 on the CPU].")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch-graph", show_default=True,
              help="torch-graph: in-place cache, row buckets, CUDA graphs on a GPU; torch: the eager step.")
@click.option("--attention", type=click.Choice(["auto", "sdpa", "kernel"]), default=None,
              help="torch-graph: PyTorch's fused attention, our cached-attention CUDA kernel (the TensorRT "
                   "plugin's; needs `make plugin` and a GPU), or auto: the kernel for the steps where it measured "
                   "faster [default: auto].")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch-graph: torch.compile the step (fuses its small kernels) before capturing it.")
@click.option("--batch", type=positive(1024), default=1, show_default=True,
              help="Sequences generated together (the same prompt length each).")
@click.option("--prompt", "prompt_len", type=POSITIVE_TOKENS, default=512, show_default=True, help="Prompt tokens.")
@click.option("--answer", type=POSITIVE_TOKENS, default=256, show_default=True, help="New tokens.")
@click.option("--steps", type=POSITIVE_TOKENS, default=None,
              help="Denoising steps (SDAR: per block) [default: one token per step].")
@click.option("--block-length", type=POSITIVE_TOKENS, default=None,
              help="Block of block/dual (Fast-dLLM's block decoding for Dream), of LLaDA and of SDAR "
                   "[default: 32; block-causal families: the model's block size].")
@click.option("--policy", "policies", multiple=True, metavar="SPEC", type=TEXT,
              help="Policy spec, repeatable (as `generate --policy`) [default: none, decode, dual; block-causal "
                   "families: none, append].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random weights and prompts.")
@click.option("--quant", type=click.Choice(QUANT_FORMATS), default=None,
              help="Quantise the random model first (as `dlmtrt calibrate` does; fp8 runs our few-row kernel for "
                   "1-4 rows on CUDA (`make plugin`) and torch._scaled_mm above on FP8 GPUs; int8-wo and w8a8 are "
                   "emulated in PyTorch: correct, not fast).")
@click.option("--quantize-head", is_flag=True, help="With --quant: the output head too (calibrate --quantize-head).")
@click.option("--keep-blocks", type=click.IntRange(0, 10_000), default=0, show_default=True,
              help="With --quant: leave the first N blocks unquantised (the bytes of calibrate --keep-blocks N).")
@click.option("--out", "-o", "out_path", type=click.Path(path_type=Path), default=None, callback=output_file(),
              help="JSON results [default: bench-<shape>-<device>-<backend>-b<batch>.json in the current "
                   "directory].")
@friendly_errors
def bench_cmd(shape, device, dtype, backend, attention, compile_, batch, prompt_len, answer, steps, block_length, policies, seed,
              quant, quantize_head, keep_blocks, out_path):
    """Tokens/s, median step time, rows per step and peak memory of each policy, with the weight-read floor
    measured in the same process (the device's copy bandwidth)."""
    from dlmtrt.evals.speed import bench
    from dlmtrt.paths import check_output_file, write_text_atomic
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    out_path = out_path or check_output_file(Path.cwd() / f"bench-{shape}-{device.split(':')[0]}-{backend}-b{batch}.json")
    rep = bench(shape, device=device, dtype=dtype, backend=backend, attention=attention, compile=compile_, batch=batch, prompt=prompt_len, answer=answer,
                steps=steps, policies=list(policies), block_length=block_length, seed=seed, quant=quant, quantize_head=quantize_head,
                keep_blocks=keep_blocks, log=console.log)
    t = Table(title=f"bench · {shape} · {rep.gpu or device} · {dtype} · {rep.backend} · B={batch} · prompt {prompt_len}"
                    f" · answer {answer}")
    for col in ("policy", "schedule", "steps", "tok/s", "ms/step (median)", "rows/step", "peak GiB", "peak / (W+KV)", "x floor"):
        t.add_column(col, justify="left" if col in ("policy", "schedule") else "right")
    for r in rep.runs:
        t.add_row(r.policy, r.schedule, str(r.steps), f"{r.tokens_per_s:.1f}", f"{r.step_ms_median:.2f}",
                  f"{r.rows_per_step:.1f}", "-" if r.peak_bytes is None else f"{r.peak_bytes / 2**30:.3f}",
                  "-" if r.peak_bytes is None else f"{r.peak_bytes / (rep.weight_bytes + rep.kv_bytes):.3f}",
                  f"{r.floor_ratio:.2f}")
    out.print(t)
    out.print(f"weights {_bytes(rep.weight_bytes)}, K/V {_bytes(rep.kv_bytes)}; copy bandwidth "
              f"{rep.copy_bytes_per_s / 1e9:.1f} GB/s -> weight-read floor {rep.floor_ms:.3g} ms; one-active-row step "
              f"{rep.single_row_step_ms:.3g} ms ({rep.single_row_step_ms / rep.floor_ms:.2f}x floor)")
    if rep.gpu is None:
        out.print("peak: the process's peak resident memory above what it held before the model was built")
    write_text_atomic(out_path, rep.to_json())
    console.print(f"results: {out_path}")


def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"
