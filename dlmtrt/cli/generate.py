"""`dlmtrt generate`: answers for prompts, with the run's statistics."""
from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from dlmtrt.runtime.backends import BACKENDS

from ._common import (NONEMPTY_TEXT, NONNEGATIVE, POSITIVE_TOKENS, SEED, TEXT, check_device, refuse_other_families,
                      console, dtype_choice, friendly_errors, out, progress, read_prompt_file)

# The cache policies `--policy` takes (runtime.policies.CACHE_POLICIES; a test keeps the two equal, so that
# --help needs no torch import).
POLICY_NAMES = ("none", "append", "decode", "greedy", "prefill", "pd", "block", "dual", "adaptive", "delayed")
POLICY_HELP = ("Cache policy and modifiers: " + " | ".join(POLICY_NAMES) + ", options as name:key=value,..., "
               "modifiers joined by '+': decode:cache_steps=4,shift=un+parallel:threshold=0.9+early; "
               "none+prophet:early=7.5,mid=5,late=2.5 is Prophet's early exit.")


@click.command()
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias (dream-7b, llada-8b, ...) or cached repo id.")
@click.option("--prompt", "-p", "prompts", multiple=True, type=NONEMPTY_TEXT,
              help="Prompt text (UTF-8, not empty); repeat for a batch.")
@click.option("--prompt-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="UTF-8 text file of prompts, one per line (a literal \\n is a newline); after any --prompt.")
@click.option("--chat/--no-chat", default=False, help="Wrap each prompt in the model's chat template.")
@click.option("--max-new-tokens", "-n", type=POSITIVE_TOKENS, default=None,
              help="Tokens to generate (LLaDA, SDAR: gen_length) [default: the family's, Dream 20, LLaDA 128, SDAR 128].")
@click.option("--steps", "-s", type=POSITIVE_TOKENS, default=None,
              help="Denoising steps (SDAR: per block, denoising_steps) [default: the family's, Dream 512, LLaDA 128, "
                   "SDAR its block size].")
@click.option("--temperature", "-t", type=NONNEGATIVE, default=None,
              help="Sampling temperature; 0 is greedy (SDAR: use --top-k 1) [default: the family's, Dream 1.0 (as "
                   "upstream), LLaDA 0, SDAR its generation_config's].")
@click.option("--alg", type=click.Choice(["origin", "maskgit_plus", "topk_margin", "entropy"]), default=None,
              help="Dream: unmasking order [default: origin, as upstream].")
@click.option("--alg-temp", type=NONNEGATIVE, default=None, help="Dream: temperature of the confidence-based order.")
@click.option("--eps", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, help="Dream: final timestep of the schedule [default: 1e-3].")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Dream, SDAR: nucleus sampling threshold [default: Dream off; SDAR its generation_config's].")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Dream, SDAR: keep the k largest logits; 0 turns it off [default: Dream 50, as upstream; SDAR its "
                   "generation_config's]. SDAR's greedy decoding is --top-k 1.")
@click.option("--block-length", type=POSITIVE_TOKENS, default=None,
              help="LLaDA: semi-autoregressive block [default: 128, or the whole answer when shorter]. Dream: "
                   "Fast-dLLM's block decoding with this block length [default: off, Dream's own schedule]. SDAR: "
                   "its diffusion block [default: the model's block_size].")
@click.option("--remasking", type=TEXT, default=None, metavar="NAME",
              help="Which predictions to commit. LLaDA: low_confidence | random [default: low_confidence]; SDAR: "
                   "low_confidence_static | low_confidence_dynamic | sequential [default: low_confidence_dynamic].")
@click.option("--confidence-threshold", type=NONNEGATIVE, default=None,
              help="SDAR: low_confidence_dynamic commits every token above it [default: 0.85].")
@click.option("--cfg-scale", type=NONNEGATIVE, default=None, help="LLaDA: classifier-free guidance scale [default: 0].")
@click.option("--policy", type=TEXT, default=None, metavar="SPEC",
              help=POLICY_HELP + " [default: the family's: none; SDAR append, its exact cache].")
@click.option("--constraint", "constraints", multiple=True, type=TEXT, metavar="POS:TEXT",
              help="Pin TEXT (tokenized with a leading space, as Prophet does) at answer position POS "
                   "(from 0) and keep it there; repeatable. With +prophet its answer span starts 2 after the last.")
@click.option("--answer-start", type=click.IntRange(min=0), default=None, metavar="POS",
              help="+prophet: the answer position where its 5-token gap span starts [default: 2 after the last "
                   "--constraint, as Prophet's eval_llada.py].")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch",
              show_default=True,
              help="torch / torch-graph run a checkpoint; onnxruntime runs an export directory (dlmtrt export); "
                   "tensorrt runs an engine file (dlmtrt build-engine) on a GPU (--device cuda).")
@click.option("--device", default=None, callback=check_device,
              help="cpu, cuda, cuda:N or auto [default: cpu; tensorrt: cuda].")
@click.option("--dtype", type=dtype_choice(), default=None, help="float32, float16 or bfloat16 [default: float32; for onnxruntime the "
                                           "exported dtype].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the global RNG (sampling, origin, random).")
@click.option("--json", "as_json", is_flag=True, help="Print answers and statistics as JSON on stdout.")
@friendly_errors
def generate(model, prompts, prompt_file, chat, max_new_tokens, steps, temperature, alg, alg_temp, eps, top_p, top_k,
             block_length, remasking, confidence_threshold, cfg_scale, policy, constraints, answer_start, backend,
             device, dtype, seed, as_json):
    """Generate answers for one or more prompts and print the statistics of the run.

    Unset parameters take the family's upstream defaults (Dream's diffusion_generate, LLaDA's generate)."""
    import json

    import torch

    from dlmtrt.errors import UsageError
    from dlmtrt.runtime.backends import describe_model, make_backend
    from dlmtrt.runtime.constraints import parse_constraints
    from dlmtrt.runtime.families import get as family
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.params import check_step_budget, family_params, surplus_steps_note
    from dlmtrt.runtime.policies import parse_policy

    prompts = list(prompts) + (read_prompt_file(prompt_file) if prompt_file is not None else [])
    if not prompts:
        raise click.UsageError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    if policy is not None:
        parse_policy(policy)  # a misspelt policy is one line before the model is even looked at
    ck = describe_model(backend, model)
    plan = parse_policy(policy or family(ck.family).default_policy)
    explicit = dict(max_new_tokens=max_new_tokens, steps=steps, temperature=temperature, alg=alg, alg_temp=alg_temp,
                    eps=eps, top_p=top_p, top_k=top_k, block_length=block_length, remasking=remasking,
                    confidence_threshold=confidence_threshold, cfg_scale=cfg_scale)
    explicit = {k: v for k, v in explicit.items() if v is not None}
    refuse_other_families(ck.family, explicit)
    params = family_params(ck.family, ck.path, **explicit)
    plan.check(ck.family, params.get("remasking"))
    try:
        check_step_budget(ck.family, params, plan.parallel is not None, explicit_steps=steps is not None)
    except UsageError as e:
        raise click.BadParameter(str(e), param_hint="--steps") from None
    new = family(ck.family).new_tokens(params)
    if new >= ck.args.max_position_embeddings:
        raise click.BadParameter(f"{new} new tokens do not fit the model's {ck.args.max_position_embeddings} "
                                 "positions with any prompt; ask for fewer", param_hint="--max-new-tokens")
    check_constraints(constraints, answer_start, plan, new)
    note = surplus_steps_note(ck.family, params) if steps is None else None
    if note:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    device = device or ("cuda" if backend == "tensorrt" else "cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    be, tok, ck = make_backend(backend, model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    pinned = parse_constraints(list(constraints), tok, answer_tokens=new) if constraints else None
    with progress() as prog:
        task = prog.add_task("denoising", total=None)  # the schedule says its bound with every step
        res = generate_text(be, tok, prompts, chat=chat, max_positions=ck.args.max_position_embeddings,
                            policy=plan, on_step=lambda i, n: prog.update(task, completed=i, total=n),
                            constraints=pinned, answer_start=answer_start, **params)
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
    cols = ["batch", "new", "steps", "NFE", "rows", "rows/full", "early", "load s", "wall s", "tok/s"]
    row = [str(s.batch), str(s.new_tokens), str(s.steps), str(s.forward_passes), str(s.rows_computed),
           f"{s.rows_fraction:.2f}", str(s.early_committed), f"{load_s:.2f}", f"{s.wall_s:.3f}", f"{s.tokens_per_s:.1f}"]
    if plan.prophet is not None:
        cols.insert(7, "exit step")
        row.insert(7, ",".join("-" if e is None else str(e) for e in s.exit_steps))
    for col in cols:
        t.add_column(col, justify="right")
    t.add_row(*row)
    out.print(t)


def check_constraints(constraints, answer_start, plan, new_tokens: int) -> None:
    """--constraint and --answer-start before any work: their form, their positions within the answer, and an
    answer span for +prophet (which has none without them)."""
    from dlmtrt.errors import UsageError
    from dlmtrt.runtime.constraints import parse_constraints

    class _Chars:  # the form and the positions; the tokenizer's lengths are checked once it is loaded
        def encode(self, text, add_special_tokens=False):
            return [0]

    try:
        parse_constraints(list(constraints), _Chars(), answer_tokens=new_tokens)
    except UsageError as e:
        raise click.BadParameter(str(e), param_hint="--constraint") from None
    if answer_start is not None and answer_start >= new_tokens:
        raise click.BadParameter(f"answer position {answer_start} is past the {new_tokens}-token answer",
                                 param_hint="--answer-start")
    if plan.prophet is not None and not constraints and answer_start is None:
        raise click.UsageError("+prophet needs the answer's position: pass --constraint POS:TEXT (its span starts 2 "
                               "after the last) or --answer-start POS")
    if plan.prophet is None and answer_start is not None:
        raise click.UsageError("--answer-start places +prophet's span; add +prophet to --policy or drop it")
