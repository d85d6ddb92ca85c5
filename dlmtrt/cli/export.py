"""`dlmtrt export`: one denoising step to ONNX, checked."""
from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from dlmtrt.dtypes import DTYPE_NAMES

from ._common import console, friendly_errors, out


def _supported_opset(ctx, param, value):
    from dlmtrt.export.onnx_export import SUPPORTED_OPSETS
    if value is not None and value not in SUPPORTED_OPSETS:
        raise click.BadParameter(f"opset {value} is not supported: choose one of {SUPPORTED_OPSETS.start}.."
                                 f"{SUPPORTED_OPSETS.stop - 1}")
    return value


@click.command("export")
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias (dream-7b, llada-8b, ...) or cached repo id.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New directory for model.onnx (+ model.onnx.data above 2 GB), tokenizer and configs.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True,
              help="Dtype of the weights, the K/V cache and the arithmetic in the graph.")
@click.option("--opset", type=int, default=None, callback=_supported_opset,
              help="ONNX opset (18-23) [default: 18; 19 for an fp8 checkpoint from `dlmtrt calibrate`].")
@click.option("--attention", type=click.Choice(["standard", "plugin"]), default="standard", show_default=True,
              help="Cached attention as standard ONNX operators, or as one dlmtrt::CachedAttention node per layer "
                   "for the TensorRT plugin (export/attention.py documents its semantics).")
@click.option("--tokenizer", type=click.Path(file_okay=False), default=None,
              help="Directory of the tokenizer to ship [default: the checkpoint's]; checked against the model.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out (only once the new export passed its checks).")
@click.option("--numeric-check/--no-numeric-check", default=True, show_default=True,
              help="Compare ONNX Runtime with PyTorch fp32 on random step inputs (needs the fp32 model in memory).")
@friendly_errors
def export_cmd(model, out_dir, dtype, opset, attention, tokenizer, overwrite, numeric_check):
    """Export one denoising step to ONNX (dynamic batch, active rows and canvas) and check it."""
    from dlmtrt.export.onnx_export import ExportError, export_step
    t0 = time.perf_counter()
    try:
        with console.status("exporting") as status:
            res = export_step(model, out_dir, dtype=dtype, opset=opset, attention=attention, tokenizer=tokenizer,
                              overwrite=overwrite, numeric_check=numeric_check,
                              log=lambda m: (console.log(m), status.update(m)))
    except ExportError as e:
        if e.report is not None:
            out.print(_check_table(e.report, only_failed=False))
        raise click.ClickException(str(e).split("\n")[0]) from None
    total = time.perf_counter() - t0
    if res.checks is not None:
        out.print(_check_table(res.checks))
    t = Table(title=f"export · {res.out_dir}")
    for col in ("file", "MiB"):
        t.add_column(col, justify="right" if col == "MiB" else "left")
    for f in sorted(res.out_dir.iterdir()):
        t.add_row(f.name, f"{f.stat().st_size / 2**20:.2f}")
    out.print(t)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
    out.print(f"{res.dtype}, opset {res.opset}, {res.attention} attention, {res.weight_bytes / 2**20:.1f} MiB of "
              f"weights; {total:.1f} s ({secs})")


def _check_table(report, only_failed: bool = False) -> Table:
    """Worst relative error per output kind, or every failing row."""
    t = Table(title=f"ONNX Runtime vs PyTorch fp32 · export dtype {report.dtype}"
                    + (f" · {report.note}" if report.note else ""))
    for col in ("output", "worst case", "rel err", "max abs", "tolerance", "ok"):
        t.add_column(col, justify="left" if col in ("output", "worst case") else "right")
    rows = [r for r in report.rows if not r.ok] if not report.ok else list(report.worst().values())
    for r in rows:
        t.add_row(r.output, r.case, f"{r.rel_err:.2e}", f"{r.max_abs:.2e}", f"{r.tol:.0e}",
                  "[green]yes[/]" if r.ok else "[red]NO[/]")
    return t
