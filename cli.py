"""dlmtrt command line: one click group over the whole pipeline (checkpoints, generation, export, serving)."""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)  # tables piped to a file are not cropped to 80


def _export_error():
    from export.onnx_export import ExportError
    return ExportError


def friendly_errors(fn):
    """Known input problems become one clean error line instead of a traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        from models.loading import CheckpointError
        try:
            return fn(*a, **kw)
        except (CheckpointError, ValueError, FileExistsError, _export_error()) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """Deploy diffusion language models (Dream, LLaDA): checkpoints, generation, export.

    \b
    Quick start (CPU, no downloads):
      python cli.py make-tiny --arch dream --out tiny/dream
      python cli.py generate --model tiny/dream --prompt "Hello" --chat
    """


@main.command("make-tiny")
@click.option("--arch", type=click.Choice(["dream", "llada"]), required=True, help="Model family to imitate.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New directory for the checkpoint (must not exist or be empty).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Dtype the weights are stored in.")
@click.option("--layers", default=2, show_default=True, help="Number of transformer blocks.")
@click.option("--hidden", default=64, show_default=True, help="Hidden size.")
@click.option("--shard-bytes", type=int, default=None, help="Split the weights into shards of at most this many bytes.")
@friendly_errors
def make_tiny_cmd(arch, out, seed, dtype, layers, hidden, shard_bytes):
    """Write a tiny random checkpoint in the real Hugging Face layout (config, safetensors, tokenizer)."""
    import torch

    from models.tiny import make_tiny
    path = make_tiny(arch, out, seed=seed, dtype=getattr(torch, dtype), max_shard_bytes=shard_bytes,
                     num_layers=layers, hidden_size=hidden, intermediate_size=2 * hidden, head_dim=hidden // 4)
    files = sorted(p.name for p in path.iterdir())
    console.print(f"[green]wrote[/] {arch} checkpoint to {path}: {', '.join(files)}")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@main.command()
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias (dream-7b, llada-8b, ...) or cached repo id.")
@click.option("--prompt", "-p", "prompts", multiple=True, required=True, help="Prompt text; repeat for a batch.")
@click.option("--chat/--no-chat", default=False, help="Wrap each prompt in the model's chat template.")
@click.option("--max-new-tokens", "-n", type=int, default=None,
              help="Tokens to generate (LLaDA: gen_length) [default: the family's, Dream 20, LLaDA 128].")
@click.option("--steps", "-s", type=int, default=None, help="Denoising steps [default: the family's, Dream 512, LLaDA 128].")
@click.option("--temperature", "-t", type=float, default=None,
              help="Sampling temperature; 0 is greedy [default: the family's, Dream 1.0 (as upstream), LLaDA 0].")
@click.option("--alg", type=click.Choice(["origin", "maskgit_plus", "topk_margin", "entropy"]), default=None,
              help="Dream: unmasking order [default: origin, as upstream].")
@click.option("--alg-temp", type=float, default=None, help="Dream: temperature of the confidence-based order.")
@click.option("--eps", type=float, default=None, help="Dream: final timestep of the schedule [default: 1e-3].")
@click.option("--top-p", type=float, default=None, help="Dream: nucleus sampling threshold [default: off].")
@click.option("--top-k", type=int, default=None,
              help="Dream: keep the k largest logits before confidences [default: 50, as upstream; 0 turns it off].")
@click.option("--block-length", type=int, default=None,
              help="LLaDA: semi-autoregressive block [default: 128, or the whole answer when shorter]. Dream: "
                   "Fast-dLLM's block decoding with this block length [default: off, Dream's own schedule].")
@click.option("--remasking", type=click.Choice(["low_confidence", "random"]), default=None,
              help="LLaDA: which predictions to commit [default: low_confidence].")
@click.option("--cfg-scale", type=float, default=None, help="LLaDA: classifier-free guidance scale [default: 0].")
@click.option("--policy", default="none", show_default=True, metavar="SPEC",
              help="Cache policy and modifiers: none | decode | prefill | pd | greedy | block | dual | adaptive | "
                   "delayed | window, options as name:key=value,..., modifiers joined by '+': "
                   "decode:cache_steps=4,shift=un+parallel:threshold=0.9+early.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="torch runs a checkpoint; onnxruntime runs an export directory (cli.py export).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", default=None, help="float32, float16 or bfloat16 [default: float32; for onnxruntime the "
                                           "exported dtype].")
@click.option("--seed", default=0, show_default=True, help="Seed of the global RNG (sampling, origin, random).")
@click.option("--json", "as_json", is_flag=True, help="Print answers and statistics as JSON on stdout.")
@friendly_errors
def generate(model, prompts, chat, max_new_tokens, steps, temperature, alg, alg_temp, eps, top_p, top_k,
             block_length, remasking, cfg_scale, policy, backend, device, dtype, seed, as_json):
    """Generate answers for one or more prompts and print the statistics of the run.

    Unset parameters take the family's upstream defaults (Dream's diffusion_generate, LLaDA's generate)."""
    import json

    import torch

    from runtime.backends import describe_model, make_backend
    from runtime.generate import generate_text
    from runtime.params import family_params
    from runtime.policies import parse_policy

    plan = parse_policy(policy)
    ck = describe_model(backend, model)
    dream_only = {"--alg": alg, "--alg-temp": alg_temp, "--eps": eps, "--top-p": top_p, "--top-k": top_k}
    llada_only = {"--remasking": remasking, "--cfg-scale": cfg_scale}
    wrong = [k for k, v in (llada_only if ck.family == "dream" else dream_only).items() if v is not None]
    if wrong:
        raise click.UsageError(f"{', '.join(wrong)} do(es) not apply to {ck.family} models")
    explicit = dict(max_new_tokens=max_new_tokens, steps=steps, temperature=temperature, alg=alg, alg_temp=alg_temp,
                    eps=eps, top_p=top_p, top_k=top_k, block_length=block_length, remasking=remasking,
                    cfg_scale=cfg_scale)
    params = family_params(ck.family, ck.path, **{k: v for k, v in explicit.items() if v is not None})
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    be, tok, ck = make_backend(backend, model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    with _progress() as prog:
        task = prog.add_task("denoising", total=params["steps"])
        res = generate_text(be, tok, list(prompts), chat=chat, max_positions=ck.args.max_position_embeddings,
                            policy=plan, on_step=lambda i, n: prog.update(task, completed=i), **params)
        prog.update(task, completed=res.stats.steps, total=res.stats.steps)
    s = res.stats
    if as_json:
        out.print_json(json.dumps({"answers": res.texts, "stats": s.to_dict(), "load_s": load_s, "params": params,
                                   "policy": plan.spec}))
        return
    for i, (p, a) in enumerate(zip(prompts, res.texts)):
        out.print(f"[bold cyan]prompt {i}:[/] {p}")
        out.print(f"[bold green]answer {i}:[/] {a!r}" if not a.isprintable() else f"[bold green]answer {i}:[/] {a}")
    t = Table(title=f"{ck.family} · {be.name} · {device} · {ck.dtype} · policy {plan.spec}")
    for col in ("batch", "new", "steps", "NFE", "rows", "rows/full", "early", "load s", "wall s", "tok/s"):
        t.add_column(col, justify="right")
    t.add_row(str(s.batch), str(s.new_tokens), str(s.steps), str(s.forward_passes), str(s.rows_computed),
              f"{s.rows_fraction:.2f}", str(s.early_committed), f"{load_s:.2f}", f"{s.wall_s:.3f}",
              f"{s.tokens_per_s:.1f}")
    out.print(t)


@main.command("export")
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias (dream-7b, llada-8b, ...) or cached repo id.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New directory for model.onnx (+ model.onnx.data above 2 GB), tokenizer and configs.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="Dtype of the weights, the K/V cache and the arithmetic in the graph.")
@click.option("--opset", default=18, show_default=True, help="ONNX opset (18-23).")
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
    from export.onnx_export import ExportError, export_step
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


@main.command("eval")
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias or cached repo id.")
@click.option("--task", "tasks", multiple=True, required=True,
              help="sudoku4, countdown or shift128, optionally with difficulty: sudoku4:clues=8-12, countdown:numbers=3.")
@click.option("--n", default=50, show_default=True, help="Problems per task (the same for every policy).")
@click.option("--policy", "policies", multiple=True, default=["none"], show_default=True,
              help="Policy spec, repeatable (see generate --help): none, decode, greedy:window=2, dual+parallel, ...")
@click.option("--steps", type=int, default=None, help="Denoising steps [default: the answer length].")
@click.option("--blocks", type=int, default=None,
              help="Decode the answer in this many blocks: LLaDA's semi-autoregressive blocks [default: 1]; for Dream, "
                   "Fast-dLLM's block decoding [default: off, Dream's own schedule].")
@click.option("--remasking", type=click.Choice(["low_confidence", "random"]), default=None,
              help="LLaDA: which predictions to commit [default: low_confidence].")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--seed", default=1234, show_default=True, help="Seed of the problem generator.")
@click.option("--backend", type=click.Choice(["torch", "onnxruntime"]), default="torch", show_default=True,
              help="torch runs a checkpoint; onnxruntime runs an export directory (cli.py export).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default=None, help="[default: float32; for onnxruntime the exported dtype]")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON results file [default: bench/results/eval-<model>-<tasks>.json].")
@friendly_errors
def eval_cmd(model, tasks, n, policies, steps, blocks, remasking, batch_size, seed, backend, device, dtype, out_path):
    """Accuracy and work of each cache policy on generated task problems (exact checkers)."""
    from bench.evaluate import evaluate, write_results
    from runtime.backends import make_backend
    from runtime.policies import parse_policy
    from bench.evaluate import parse_task
    from bench.tasks import get_task
    for p in policies:
        parse_policy(p)
    for spec in tasks:  # fail on a bad task spec before spending time on loading the model
        name, diff = parse_task(spec)
        get_task(name).problems(1, seed, **diff)
    be, tok, ck = make_backend(backend, model, dtype=dtype, device=device)
    dtype = ck.dtype
    rows, records = [], []
    with _progress() as prog:
        for spec in tasks:
            task = prog.add_task(spec, total=n * len(policies))
            r, rec = evaluate(be, tok, spec, n, list(policies), seed=seed, batch_size=batch_size, steps=steps,
                              blocks=blocks, remasking=remasking, progress=lambda k, t=task: prog.advance(t, k))
            rows += r
            records += rec
    t = Table(title=f"eval · {Path(str(ck.path)).name} · {be.name} · {device} · {dtype}")
    t.add_column("task", min_width=max(map(len, tasks)))
    t.add_column("policy", min_width=max(map(len, policies)))
    for col in ("n", "acc", "NFE", "rows/step", "rows/tok", "early", "wall s", "tok/s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r.task, r.policy, str(r.n), f"{r.accuracy:.3f}", f"{r.forward_passes:.1f}", f"{r.rows_fraction:.3f}",
                  f"{r.rows_per_token:.1f}", f"{r.early_committed:.1f}", f"{r.wall_s:.1f}", f"{r.tokens_per_s:.0f}")
    out.print(t)
    name = Path(str(ck.path)).name or "model"
    out_path = out_path or Path("bench/results") / f"eval-{name}-{'-'.join(s.split(':')[0] for s in tasks)}.json"
    write_results(out_path, str(model), rows, {"backend": backend, "device": device, "dtype": dtype, "seed": seed,
                                               "blocks": blocks, "remasking": remasking,
                                               "records": records})
    console.print(f"results: {out_path}")



@main.command("compare")
@click.option("--model", "-m", required=True,
              help="Checkpoint (directory, alias or cached repo id): the PyTorch fp32 reference, whose greedy "
                   "denoising trajectories give the step inputs.")
@click.option("--onnx", "onnx_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="model.onnx or its export directory [default: export --model to a temporary directory].")
@click.option("--backends", default="torch,onnxruntime,tensorrt", show_default=True, metavar="LIST",
              help="Comma-separated: torch, onnxruntime, tensorrt. The first is the reference the others are "
                   "compared with; one that cannot run here is skipped with its reason.")
@click.option("--policy", "policies", multiple=True, metavar="SPEC",
              help="Cache policy of a recorded trajectory, repeatable [default: none, decode, dual+parallel].")
@click.option("--steps-per-policy", default=6, show_default=True,
              help="Steps kept per policy, evenly spaced over its trajectory; 0 keeps them all.")
@click.option("--max-feeds", type=int, default=None,
              help="Cap on the number of step inputs compared (evenly spaced over the recorded ones).")
@click.option("--seed", default=0, show_default=True, help="Seed of the task problems and of the RNG.")
@click.option("--rtol", multiple=True, metavar="[OUTPUT:]VALUE",
              help="Relative tolerance, repeatable: a bare VALUE for every output not named, or per output name "
                   "or kind (logits, present, present_valid, kv_drift) [default: by the graph's dtype].")
@click.option("--atol", multiple=True, metavar="[OUTPUT:]VALUE", help="Absolute tolerance, like --rtol.")
@click.option("--load-inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Replay step inputs saved by --save-inputs instead of recording trajectories.")
@click.option("--save-inputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the step inputs (Polygraphy JSON; polygraphy run --load-inputs reads it too).")
@click.option("--save-outputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Save the reference's (first backend's) outputs as Polygraphy RunResults for polygraphy run "
                   "--load-outputs, and print that command (export/polygraphy_data.py explains it).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
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
      python cli.py compare -m tiny-dream-tasks --onnx out/dream-onnx --save-outputs torch_outputs.json
    """
    import contextlib
    import tempfile

    import numpy as np

    from export import polygraphy_data as pg
    from export.metadata import onnx_metadata, read_metadata
    from export.trajectory import describe, load_feeds, record_feeds, save_feeds, spread
    from models.loading import load
    from runtime.backends.torch_backend import TorchBackend
    from runtime.policies import parse_policy

    names = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in pg.BACKENDS]
    if unknown or len(set(names)) != len(names):
        raise click.BadParameter(f"{backends!r}: give distinct backends among {', '.join(pg.BACKENDS)}",
                                 param_hint="--backends")
    if len(names) < 2:
        raise click.BadParameter("name at least two backends to compare", param_hint="--backends")
    policies = list(policies) or list(pg.DEFAULT_POLICIES)
    for p in policies:
        parse_policy(p)
    t0 = time.perf_counter()
    with console.status(f"loading {model} (fp32)"):
        m, tok, ck = load(model, dtype="float32", device="cpu")
    n_layers = ck.args.num_layers
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # Polygraphy logs to stdout: keep it for tables
        onnx_file, graph_dtype, graph_attention = None, "float32", "standard"
        if {"onnxruntime", "tensorrt"} & set(names):
            if onnx_path is None:
                from export.onnx_export import export_step
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dlmtrt-compare-")))
                with console.status("exporting") as status:
                    res = export_step(model, tmp / "export", dtype=dtype, attention=attention, numeric_check=False,
                                      log=lambda msg: (console.log(msg), status.update(msg)))
                onnx_file = res.onnx_path
            else:
                onnx_file = onnx_path / "model.onnx" if onnx_path.is_dir() else onnx_path
                if not onnx_file.is_file():
                    raise click.BadParameter(f"{onnx_path} holds no model.onnx", param_hint="--onnx")
            g_args, meta = read_metadata(onnx_metadata(onnx_file), onnx_file)
            if g_args.to_dict() != ck.args.to_dict():
                raise click.ClickException(f"{onnx_file} was exported from {meta.get('source_path')}, whose "
                                           f"architecture differs from {model}'s; pass the matching --model")
            graph_dtype, graph_attention = meta.get("dtype", "float32"), meta.get("attention", "standard")
        rtols = pg.parse_tolerances(rtol, n_layers, graph_dtype, "rtol")
        atols = pg.parse_tolerances(atol, n_layers, graph_dtype, "atol")

        if load_inputs is not None:
            feeds = load_feeds(load_inputs)
            source = str(load_inputs)
        else:
            with console.status("recording denoising trajectories"):
                feeds = record_feeds(TorchBackend(m), tok, ck, policies=policies, seed=seed,
                                     steps_per_policy=steps_per_policy or None, log=console.log)
            source = f"policies {', '.join(policies)}"
        feeds = spread(feeds, max_feeds)
        if not feeds:
            raise click.ClickException("no step inputs to compare (--max-feeds 0 or an empty --load-inputs)")
        cov = describe(feeds)
        console.log(f"{cov['feeds']} step inputs ({source}): {cov['partial_active']} with partial active rows, "
                    f"{cov['with_stable_rows']} with stable rows, {cov['padded']} left padded")
        if save_inputs is not None:
            save_feeds(save_inputs, feeds)
            console.print(f"step inputs: {save_inputs}")

        runners, skipped = [], []
        for b in names:
            if b == "torch":
                runners.append(pg.make_torch_runner(m))
            elif b == "onnxruntime":
                runners.append(pg.make_onnxrt_runner(onnx_file, graph_attention, graph_dtype))
            else:
                with console.status("building a TensorRT engine"):
                    r, why = pg.make_tensorrt_runner(onnx_file, feeds)
                if r is None:
                    skipped.append(b)
                    console.print(f"[yellow]tensorrt skipped:[/] {why}", soft_wrap=True)
                else:
                    runners.append(r)
        if len(runners) < 2:
            raise click.ClickException(f"nothing to compare: only {runners[0].name if runners else 'no backend'} "
                                       f"can run here (skipped: {', '.join(skipped)})")

        from polygraphy.comparator import Comparator, RunResults
        from polygraphy.comparator.compare import SimpleCompareFunc
        from polygraphy.logger import G_LOGGER
        severity = G_LOGGER.module_severity
        stack.callback(setattr, G_LOGGER, "module_severity", severity)
        G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.FINISH
        func = SimpleCompareFunc(rtol=dict(rtols), atol=dict(atols), check_error_stat="elemwise")
        pairs = [(i, 0) for i in range(1, len(runners))]
        from polygraphy.exception import PolygraphyException
        try:
            results = Comparator.run(runners, data_loader=feeds)
            with np.errstate(divide="ignore", invalid="ignore"):  # relative error of boolean present_valid: 0/0
                accuracy = Comparator.compare_accuracy(results, comparisons=pairs, compare_func=func)
        except PolygraphyException as e:
            raise click.ClickException(f"Polygraphy failed: {str(e).strip().splitlines()[0]}") from None
        if save_outputs is not None:
            ref = RunResults()
            ref.append((runners[0].name, results[runners[0].name]))
            ref.save(str(save_outputs))
            console.print(f"{runners[0].name} outputs: {save_outputs}")
            if runners[0].name == "torch" and graph_attention == "standard" and onnx_path is not None:
                env, argv = pg.polygraphy_run_command(
                    onnx_file, save_outputs, rtols, atols, model=model, policies=policies,
                    steps_per_policy=steps_per_policy, seed=seed, max_feeds=max_feeds, feeds_file=load_inputs)
                console.print("the same check with Polygraphy's command line:\n  " + pg.shell_command(env, argv),
                              soft_wrap=True, highlight=False)

    acc = accuracy[0]
    ref_name = runners[0].name
    t = Table(title=f"compare · {Path(str(ck.path)).name} · {len(feeds)} steps · graph {graph_dtype}, "
                    f"{graph_attention} attention · reference {ref_name}")
    for col in ("backend", "output", "steps ok", "max abs", "max rel", "rel L2", "atol", "rtol", "ok"):
        t.add_column(col, justify="left" if col in ("backend", "output") else "right")
    failed = []
    for i, _ in pairs:
        name = runners[i].name
        per_iter = acc[(name, ref_name)]
        for out_name in pg.output_names(n_layers):
            rs = [it[out_name] for it in per_iter if out_name in it]
            ok_n = sum(bool(r) for r in rs)
            l2 = 0.0
            for k in range(len(results[name])):
                got = np.asarray(results[name][k][out_name], dtype=np.float64)
                ref = np.asarray(results[ref_name][k][out_name], dtype=np.float64)
                l2 = max(l2, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
                         if got.shape == ref.shape else np.inf)
            ok = bool(rs) and ok_n == len(rs)
            if not ok:
                failed.append(f"{name} {out_name}")
            worst = []
            for f in ("max_absdiff", "max_reldiff"):  # the relative error of a boolean is 0/0 where both are False
                v = np.array([getattr(r, f, np.nan) for r in rs], dtype=float)
                worst.append(float(np.nanmax(v)) if (~np.isnan(v)).any() else np.nan)
            t.add_row(name, out_name, f"{ok_n}/{len(rs)}", f"{worst[0]:.2e}", f"{worst[1]:.2e}", f"{l2:.2e}",
                      f"{atols[out_name]:g}", f"{rtols[out_name]:g}", "[green]yes[/]" if ok else "[red]NO[/]")
    out.print(t)
    skip_note = f"; skipped: {', '.join(skipped)}" if skipped else ""
    if failed:
        raise click.ClickException(f"{len(failed)} output(s) out of tolerance: {', '.join(failed[:6])}"
                                   + (" ..." if len(failed) > 6 else "") + skip_note)
    out.print(f"all {len(pg.output_names(n_layers))} outputs within tolerance on {len(feeds)} steps for "
              f"{', '.join(r.name for r in runners[1:])} vs {ref_name}{skip_note}; {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
