"""`dlmtrt bicache-profile`: BiCache's depth table of a bidirectional model, profiled once, offline, and written
beside the model (bicache.json), where `dlmtrt serve --prefix-cache-mb N` finds it."""
from __future__ import annotations

from pathlib import Path

import click

from ._common import SEED, TEXT, check_device, console, dtype_choice, friendly_errors, out, output_file, positive, progress


@click.command("bicache-profile")
@click.option("--model", "-m", required=True, help="Checkpoint directory, alias or cached repo id (Dream, LLaDA).")
@click.option("--conversations", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="JSON list of conversations (lists of {role, content} messages): every user turn after the "
                   "first message is a sample [default: conversations built from the task problems].")
@click.option("--task", "tasks", multiple=True, type=TEXT,
              help="Task whose problems build the samples when no --conversations is given (repeatable) "
                   "[default: sudoku4 and countdown].")
@click.option("--per-bucket", type=positive(100_000), default=8, show_default=True,
              help="Samples per ratio bucket (the first ones found).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.97,
              show_default=True, help="A layer's prefix K/V are reused while its mean cosine similarity stays "
                                      "strictly above this.")
@click.option("--min-ratio", type=click.IntRange(0, 100), default=None,
              help="Lowest bucket to profile [default: the lowest with --per-bucket samples; requests below the "
                   "table's first ratio are served without reuse].")
@click.option("--max-ratio", type=click.IntRange(0, 100), default=None,
              help="Highest bucket to profile [default: the highest with --per-bucket samples].")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the task problems drawn.")
@click.option("--device", default="cpu", show_default=True, callback=check_device, help="cpu, cuda, cuda:N or auto.")
@click.option("--dtype", type=dtype_choice(), default="float32", show_default=True,
              help="Dtype the K/V are computed in (profile in the dtype you serve).")
@click.option("--out", "-o", "out_path", type=click.Path(path_type=Path), default=None, callback=output_file(),
              help="The table's JSON file [default: bicache.json in the model's directory, where serve looks].")
@friendly_errors
def bicache_profile_cmd(model, conversations, tasks, per_bucket, threshold, min_ratio, max_ratio, seed, device,
                        dtype, out_path):
    """Profile BiCache's depth table: per prefix-ratio bucket, how many leading layers keep a shared prefix's
    K/V (computed alone vs. followed by the last turn) above the threshold.

    \b
    dlmtrt bicache-profile -m tiny-llada-tasks                 # task samples; writes <model>/bicache.json
    dlmtrt bicache-profile -m llada-8b --conversations chats.json --device cuda --dtype bfloat16 -o llada-bicache.json
    """
    from dlmtrt.errors import UsageError
    from dlmtrt.evals import bicache_profile as bp
    from dlmtrt.evals.tasks import get_task
    from dlmtrt.models.loading import load_tokenizer, open_checkpoint
    from dlmtrt.paths import check_output_file
    from dlmtrt.runtime.backends import describe_model, make_backend
    from dlmtrt.runtime.bicache import profile
    from dlmtrt.runtime.bicache_table import TABLE_FILE, write_table
    from dlmtrt.runtime.families import get as get_family

    if conversations is not None and tasks:
        raise click.UsageError("--task builds samples from task problems, --conversations reads them: give one")
    if min_ratio is not None and max_ratio is not None and min_ratio > max_ratio:
        raise click.BadParameter(f"{min_ratio} is above --max-ratio {max_ratio}", param_hint="--min-ratio")
    task_names = list(tasks) or list(bp.DEFAULT_TASKS)
    for name in task_names:
        get_task(name)
    src = describe_model("torch", model)
    if get_family(src.family).block_causal:
        raise UsageError(f"{src.family} models are block-causal: a shared prefix never attends to what follows it, "
                         "so the exact prefix freeze (serve --prefix-cache-mb) reuses it in every layer and BiCache "
                         "has nothing to profile")
    if out_path is None:
        out_path = check_output_file(Path(src.path) / TABLE_FILE, "--out")
    convs = bp.read_conversations(conversations) if conversations is not None else None
    tok = load_tokenizer(open_checkpoint(model))
    positions = src.args.max_position_embeddings
    if convs is not None:
        samples, skipped = bp.conversation_samples(tok, convs, positions)
        source = {"source": "conversations", "file": str(conversations), "conversations": len(convs),
                  "skipped_too_long": skipped}
        reach = ""
    else:
        samples = bp.task_samples(tok, task_names, positions, per_bucket, seed, min_ratio, max_ratio)
        source = {"source": "tasks", "tasks": task_names, "seed": seed, "instructions": list(bp.INSTRUCTIONS)}
        ratios = [s.ratio for s in samples] or [0]
        reach = (f"; the task samples reach buckets {min(ratios)}-{max(ratios)} within the model's {positions} "
                 "positions (pass --conversations for others)")
    buckets = bp.bucket(samples, per_bucket, min_ratio, max_ratio, reach)
    total = sum(len(b) for b in buckets.samples)
    console.print(f"profiling {src.family} model {src.path}: buckets {buckets.first}-{buckets.last}, "
                  f"{per_bucket} samples each ({total} in all, from {source['source']})")
    be, _, ck = make_backend("torch", model, dtype=dtype, device=device)
    with progress() as bar:
        task = bar.add_task("prefix K/V similarity", total=total)
        table, means = profile(be, [[(s.prefix, s.rest) for s in b] for b in buckets.samples], threshold,
                               buckets.first, progress=lambda n: bar.advance(task, n))
    means = [m.tolist() for m in means]
    doc = bp.profile_document(model=model, family=src.family, layers=src.args.num_layers,
                              dtype=ck.dtype, threshold=threshold, table=table, buckets=buckets, means=means,
                              source=source)
    write_table(out_path, doc)
    _summary(table, buckets, means, threshold, src.args.num_layers)
    if not table:
        raise click.ClickException(f"no layer stayed above {threshold} in any bucket, so BiCache would reuse nothing "
                                   f"for this model (the means are in {out_path}); profile with a lower --threshold")
    console.print(f"table: {out_path}")


def _summary(table: dict[int, int], buckets, means: list[list[float]], threshold: float, layers: int) -> None:
    """One row per table entry: from which ratio on how many layers are reused, and the similarities there."""
    from rich.table import Table
    t = Table(title=f"BiCache depth table (threshold {threshold}, buckets {buckets.first}-{buckets.last}, "
                    f"{len(buckets.samples[0])} samples each)")
    t.add_column("ratio from", justify="right")
    t.add_column(f"layers reused (of {layers})", justify="right")
    t.add_column("mean K/V similarity by layer at that ratio")
    for r, b in sorted(table.items()):
        t.add_row(str(r), str(b), " ".join(f"{x:.3f}" for x in means[r - buckets.first]))
    if not table:
        t.add_row("-", "0", "no bucket keeps a layer above the threshold")
    out.print(t)
