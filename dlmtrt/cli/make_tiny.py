"""`dlmtrt make-tiny`: a tiny random checkpoint in the real Hugging Face layout."""
from __future__ import annotations

from pathlib import Path

import click

from dlmtrt.dtypes import DTYPE_NAMES
from dlmtrt.models.families import FAMILIES

from ._common import SEED, console, friendly_errors, output_dir, positive


def _multiple_of_16(ctx, param, value):
    if value % 16:
        raise click.BadParameter(f"{value} is not a multiple of 16 (4 heads whose size is even, for RoPE)")
    return value


@click.command("make-tiny")
@click.option("--arch", type=click.Choice(list(FAMILIES)), required=True, help="Model family to imitate.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, callback=output_dir,
              help="New directory for the checkpoint (must not exist or be empty).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True,
              help="Dtype the weights are stored in.")
@click.option("--layers", type=positive(64), default=2, show_default=True, help="Number of transformer blocks (1-64).")
@click.option("--hidden", type=click.IntRange(16, 4096), default=64, show_default=True, callback=_multiple_of_16,
              help="Hidden size: a multiple of 16 in 16-4096 (4 heads of an even size).")
@click.option("--shard-bytes", type=positive(), default=None, help="Split the weights into shards of at most this many bytes.")
@friendly_errors
def make_tiny_cmd(arch, out, seed, dtype, layers, hidden, shard_bytes):
    """Write a tiny random checkpoint in the real Hugging Face layout (config, safetensors, tokenizer)."""
    from dlmtrt.dtypes import DTYPES
    from dlmtrt.models.tiny import make_tiny
    path = make_tiny(arch, out, seed=seed, dtype=DTYPES[dtype], max_shard_bytes=shard_bytes,
                     num_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden, head_dim=hidden // 4)
    files = sorted(p.name for p in path.iterdir())
    console.print(f"[green]wrote[/] {arch} checkpoint to {path}: {', '.join(files)}")
