"""`dlmtrt eval`: accuracy and work of decode policies on the task generators."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ._common import (MAX_PROBLEMS, POSITIVE_TOKENS, SEED, check_device, console, dtype_choice, friendly_errors,
                      out, positive, progress)


@click.command("eval")
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias or cached repo id.")
@click.option("--task", "tasks", multiple=True, required=True,
              help="sudoku4, countdown or shift128, optionally with difficulty: sudoku4:clues=8-12, countdown:numbers=3.")
@click.option("--n", type=positive(MAX_PROBLEMS), default=50, show_default=True, help="Problems per task (the same for every policy).")
@click.option("--policy", "policies", multiple=True, default=["none"], show_default=True,
              help="Policy spec, repeatable (see generate --help): none, decode, greedy:window=2, dual+parallel, ...")
@click.option("--steps", type=POSITIVE_TOKENS, default=None, help="Denoising steps [default: the answer length].")
@click.option("--blocks", type=positive(1000), default=None,
              help="Decode the answer in this many blocks: LLaDA's semi-autoregressive blocks [default: 1]; for Dream, "
                   "Fast-dLLM's block decoding [default: off, Dream's own schedule].")
@click.option("--remasking", type=click.Choice(["low_confidence", "random"]), default=None,
              help="LLaDA: which predictions to commit [default: low_confidence].")
@click.option("--batch-size", type=positive(MAX_PROBLEMS), default=64, show_default=True)
@click.option("--seed", type=SEED, default=1234, show_default=True, help="Seed of the problem generator.")
@click.option("--backend", type=click.Choice(["torch", "torch-graph", "onnxruntime"]), default="torch", show_default=True,
              help="torch runs a checkpoint; onnxruntime runs an export directory (dlmtrt export).")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=dtype_choice(), default=None, help="[default: float32; for onnxruntime the exported dtype]")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON results file [default: eval-<model>-<tasks>.json in the current directory].")
@friendly_errors
def eval_cmd(model, tasks, n, policies, steps, blocks, remasking, batch_size, seed, backend, device, dtype, out_path):
    """Accuracy and work of each cache policy on generated task problems (exact checkers)."""
    from dlmtrt.evals.evaluate import evaluate, write_results
    from dlmtrt.evals.tasks import get_task, parse_task
    from dlmtrt.runtime.backends import describe_model, make_backend
    from dlmtrt.runtime.params import greedy_params
    from dlmtrt.runtime.policies import parse_policy

    # everything that can be wrong is found before the (possibly slow) model load: the task and policy specs
    # first, then what depends on the model's family (read from its config, not loaded)
    answer_tokens = {}
    for spec in tasks:
        name, diff = parse_task(spec)
        task_ = get_task(name)
        task_.problems(1, seed, **diff)
        answer_tokens[spec] = task_.answer_tokens
    plans = [parse_policy(p) for p in policies]
    src = describe_model(backend, model)
    if remasking is not None and src.family == "dream":
        raise click.BadParameter("applies to LLaDA models", param_hint="--remasking")
    for n_tokens in answer_tokens.values():
        greedy_params(src.family, n_tokens, steps=steps, blocks=blocks, remasking=remasking)
    for plan in plans:
        plan.check(src.family, remasking or "low_confidence")
    name = Path(str(src.path)).name or "model"
    out_path = out_path or Path.cwd() / f"eval-{name}-{'-'.join(s.split(':')[0] for s in tasks)}.json"
    be, tok, ck = make_backend(backend, model, dtype=dtype, device=device)
    dtype = ck.dtype
    rows, records = [], []
    with progress() as prog:
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
    write_results(out_path, str(model), rows, {"backend": backend, "device": device, "dtype": dtype, "seed": seed,
                                               "blocks": blocks, "remasking": remasking,
                                               "records": records})
    console.print(f"results: {out_path}")
