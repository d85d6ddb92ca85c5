"""`dlmtrt compare`: backends against each other on real step inputs, with Polygraphy."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from dlmtrt.dtypes import DTYPE_NAMES

from ._common import SEED, TEXT, console, friendly_errors, out, output_file, positive


def _print_data_loader(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    from dlmtrt.evals.polygraphy_data import data_loader_script
    click.echo(data_loader_script())
    ctx.exit()


@click.command("compare")
@click.option("--model", "-m", required=True,
              help="Checkpoint (directory, alias or cached repo id): the PyTorch fp32 reference, whose greedy "
                   "denoising trajectories give the step inputs.")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="model.onnx or its export directory [default: export --model to a temporary directory].")
@click.option("--backends", default="torch,onnxruntime,tensorrt", show_default=True, metavar="LIST",
              help="Comma-separated: torch, onnxruntime, tensorrt. The first is the reference the others are "
                   "compared with; one that cannot run here is skipped with its reason.")
@click.option("--policy", "policies", multiple=True, metavar="SPEC", type=TEXT,
              help="Cache policy of a recorded trajectory, repeatable [default: none, decode, dual+parallel].")
@click.option("--steps-per-policy", type=click.IntRange(min=0), default=6, show_default=True,
              help="Steps kept per policy, evenly spaced over its trajectory; 0 keeps them all.")
@click.option("--max-feeds", type=positive(), default=None,
              help="Cap on the number of step inputs compared (evenly spaced over the recorded ones).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the task problems and of the RNG.")
@click.option("--rtol", multiple=True, metavar="[OUTPUT:]VALUE",
              help="Relative tolerance, repeatable: a bare VALUE for every output not named, or per output name "
                   "or kind (logits, present, present_valid, kv_drift) [default: by the graph's dtype].")
@click.option("--atol", multiple=True, metavar="[OUTPUT:]VALUE", help="Absolute tolerance, like --rtol.")
@click.option("--load-inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Replay step inputs saved by --save-inputs instead of recording trajectories.")
@click.option("--save-inputs", type=click.Path(path_type=Path), default=None, callback=output_file(),
              help="Save the step inputs (Polygraphy JSON; polygraphy run --load-inputs reads it too).")
@click.option("--save-outputs", type=click.Path(path_type=Path), default=None, callback=output_file(),
              help="Save the reference's (first backend's) outputs as Polygraphy RunResults for polygraphy run "
                   "--load-outputs, and print that command (dlmtrt/evals/polygraphy_data.py explains it).")
@click.option("--data-loader-path", is_flag=True, is_eager=True, expose_value=False, callback=_print_data_loader,
              help="Print the --data-loader-script argument for `polygraphy run` (this installation's "
                   "polygraphy_data.py:load_data, an absolute path) and exit.")
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True,
              help="Export dtype when no --onnx is given.")
@click.option("--attention", type=click.Choice(["standard", "plugin"]), default="standard", show_default=True,
              help="Export attention when no --onnx is given (plugin graphs run with their reference function).")
@click.option("--verbose", "-v", is_flag=True, help="Polygraphy's full report (inputs, error statistics and histograms "
                                                    "of every output at every step) instead of its verdicts.")
@friendly_errors
def compare_cmd(model, onnx_path, backends, policies, steps_per_policy, max_feeds, seed, rtol, atol, load_inputs,
                save_inputs, save_outputs, dtype, attention, verbose):
    """Compare backends with Polygraphy on step inputs recorded from real denoising trajectories.

    \b
    Every output of the step graph is compared with its own tolerance (present_valid exactly); exits
    non-zero when any output of any step is out of tolerance.
      dlmtrt compare -m tiny-dream-tasks --onnx out/dream-onnx --save-outputs torch_outputs.json
    """
    from dlmtrt.evals.compare import check_backends, compare_backends
    from dlmtrt.errors import UsageError

    try:
        check_backends(backends)
    except UsageError as e:
        raise click.BadParameter(str(e).removeprefix("--backends: "), param_hint="--backends") from None
    report = compare_backends(model, onnx_path=onnx_path, backends=backends, policies=policies,
                              steps_per_policy=steps_per_policy, max_feeds=max_feeds, seed=seed, rtol=rtol, atol=atol,
                              load_inputs=load_inputs, save_inputs=save_inputs, save_outputs=save_outputs, dtype=dtype,
                              attention=attention, verbose=verbose, log=console.log)
    if report.polygraphy_command:
        console.print("the same check with Polygraphy's command line:\n  " + report.polygraphy_command,
                      soft_wrap=True, highlight=False)
    t = Table(title=f"compare · {report.model_path.name} · {report.feeds} steps · graph {report.graph_dtype}, "
                    f"{report.graph_attention} attention · reference {report.reference}")
    for col in ("backend", "output", "steps ok", "max abs", "max rel", "rel L2", "atol", "rtol", "ok"):
        t.add_column(col, justify="left" if col in ("backend", "output") else "right")
    for r in report.rows:
        t.add_row(r.backend, r.output, f"{r.steps_ok}/{r.steps}", f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                  f"{r.rel_l2:.2e}", f"{r.atol:g}", f"{r.rtol:g}", "[green]yes[/]" if r.ok else "[red]NO[/]")
    out.print(t)
    loose = sorted({r.output.split(".")[0] for r in report.rows if r.ok and r.max_rel > r.rtol})
    if loose:
        console.print(f"[dim]ok with max rel above rtol ({', '.join(loose)}): Polygraphy fails an element only when it "
                      "is off by more than atol and by more than rtol; these relative errors are on elements whose "
                      "reference is about 0 (kv_drift is 0 for a row with no valid past), where atol decides.[/]",
                      soft_wrap=True, highlight=False)
    for b, why in report.skipped.items():
        console.print(f"[yellow]{b} skipped:[/] {why}", soft_wrap=True)
    skip_note = f"; skipped: {', '.join(report.skipped)}" if report.skipped else ""
    failed = report.failed
    if failed:
        raise click.ClickException(f"{len(failed)} output(s) out of tolerance: {', '.join(failed[:6])}"
                                   + (" ..." if len(failed) > 6 else "") + skip_note)
    n_out = len({r.output for r in report.rows})
    others = [b for b in report.backends if b != report.reference and b not in report.skipped]
    out.print(f"all {n_out} outputs within tolerance on {report.feeds} steps for {', '.join(others)} vs "
              f"{report.reference}{skip_note}; {report.seconds:.1f} s")
