"""`dlmtrt eval`: accuracy and work of decode policies on the task generators."""
from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from dlmtrt.runtime.backends import BACKENDS

from ._common import (MAX_PROBLEMS, POSITIVE_TOKENS, SEED, TEXT, check_device, console, dtype_choice,
                      friendly_errors, out, output_file, positive, progress, refuse_other_families)


@click.command("eval")
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias or cached repo id.")
@click.option("--task", "tasks", multiple=True, required=True, type=TEXT,
              help="sudoku4, countdown or shift128, optionally with difficulty: sudoku4:clues=8-12, countdown:numbers=3.")
@click.option("--n", type=positive(MAX_PROBLEMS), default=50, show_default=True, help="Problems per task (the same for every policy).")
@click.option("--policy", "policies", multiple=True, type=TEXT, metavar="SPEC",
              help="Policy spec, repeatable (see generate --help): none, decode, greedy:window=2, dual+parallel, ... "
                   "[default: the family's: none; SDAR append].")
@click.option("--steps", type=POSITIVE_TOKENS, default=None, help="Denoising steps [default: the answer length].")
@click.option("--blocks", type=positive(1000), default=None,
              help="Decode each task's answer in this many blocks: LLaDA's semi-autoregressive blocks [default: 1]; "
                   "for Dream, Fast-dLLM's block decoding [default: off, Dream's own schedule].")
@click.option("--block-length", type=POSITIVE_TOKENS, default=None,
              help="Instead of --blocks: blocks of this many tokens, as `generate --block-length` (each task's "
                   "answer is rounded up to whole blocks).")
@click.option("--remasking", type=TEXT, default=None, metavar="NAME",
              help="LLaDA: low_confidence | random [default: low_confidence]; SDAR: low_confidence_static (default: one token per step) | low_confidence_dynamic | sequential.")
@click.option("--batch-size", type=positive(MAX_PROBLEMS), default=64, show_default=True,
              help="Problems decoded together in one batch (left-padded).")
@click.option("--seed", type=SEED, default=1234, show_default=True, help="Seed of the problem generator.")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
              help="torch / torch-graph run a checkpoint; onnxruntime an export directory (dlmtrt export); "
                   "tensorrt an engine file (dlmtrt build-engine) on a GPU.")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=dtype_choice(), default=None, help="[default: float32; for onnxruntime the exported dtype]")
@click.option("--out", "-o", "out_path", type=click.Path(path_type=Path), default=None, callback=output_file(),
              help="JSON results file, with a record per problem [default: eval-<model>-<tasks>.json in the current "
                   "directory].")
@friendly_errors
def eval_cmd(model, tasks, n, policies, steps, blocks, block_length, remasking, batch_size, seed, backend, device,
             dtype, out_path):
    """Accuracy and work of each cache policy on generated task problems (exact checkers)."""
    from dlmtrt.evals.evaluate import evaluate, write_results
    from dlmtrt.evals.tasks import get_task, parse_task
    from dlmtrt.runtime.backends import describe_model, make_backend
    from dlmtrt.errors import UsageError
    from dlmtrt.paths import check_output_file
    from dlmtrt.runtime.families import get as get_family
    from dlmtrt.runtime.params import check_step_budget, greedy_params
    from dlmtrt.runtime.policies import parse_policy

    if blocks is not None and block_length is not None:
        raise click.UsageError("--blocks and --block-length both set the blocks; give one")
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
    if not policies:  # the family's default policy
        policies = (get_family(src.family).default_policy,)
        plans = [parse_policy(policies[0])]
    refuse_other_families(src.family, {"remasking": remasking} if remasking is not None else {})
    for plan in plans:
        plan.check(src.family, remasking or "low_confidence")
    for spec, n_tokens in answer_tokens.items():
        params = greedy_params(src.family, n_tokens, steps=steps, blocks=blocks, remasking=remasking,
                               block_length=block_length, attention=src.args.attention)
        for plan in plans:
            try:
                check_step_budget(src.family, params, plan.parallel is not None, explicit_steps=steps is not None)
            except UsageError as e:
                raise click.BadParameter(f"{spec}, policy {plan.spec}: {e}", param_hint="--steps") from None
    name = Path(str(src.path)).name or "model"
    out_path = out_path or check_output_file(Path.cwd() / f"eval-{name}-{'-'.join(s.split(':')[0] for s in tasks)}.json")
    be, tok, ck = make_backend(backend, model, dtype=dtype, device=device)
    dtype = ck.dtype
    rows, records = [], []
    with progress() as prog:
        for spec in tasks:
            task = prog.add_task(spec, total=n * len(policies))
            r, rec = evaluate(be, tok, spec, n, list(policies), seed=seed, batch_size=batch_size, steps=steps,
                              blocks=blocks, block_length=block_length, remasking=remasking,
                              progress=lambda k, t=task: prog.advance(t, k))
            rows += r
            records += rec
    t = Table(title=f"eval · {Path(str(ck.path)).name} · {be.name} · {device} · {dtype}")
    t.add_column("task", min_width=max(map(len, tasks)))
    t.add_column("policy", min_width=max(map(len, policies)))
    for col in ("n", "acc", "NFE", "rows/step", "rows/tok", "early", "wall s", "tok/s"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r.task, r.policy, str(r.n), f"{r.accuracy:.3f}", f"{r.forward_passes:.1f}", f"{r.rows_fraction:.3f}",
                  f"{r.rows_per_token:.1f}", f"{r.early_committed:.1f}", f"{r.wall_s:.1f}",
                  "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}")
    out.print(t)
    write_results(out_path, str(model), rows, {"backend": backend, "device": device, "dtype": dtype, "seed": seed,
                                               "blocks": blocks, "block_length": block_length,
                                               "remasking": remasking,
                                               "records": records})
    console.print(f"results: {out_path}")
