"""Exact prefix sharing on a trained block-diffusion model (issue 28, item 4): the same shared instruction and
few-shot prefix before every problem, decoded with and without the prefix store (runtime/prefix.PrefixStore,
the all-layer freeze, exact for block-causal models), then time to first token with and without it.

    python -m bench.prefix_exact [--model tiny-sdar-tasks] [--n 200] [--n-long 50] [--device cpu] \
        [--out bench/results/prefix-exact-sdar-cpu.json]

1. Accuracy: every problem's answer with the store must equal its answer without it, token for token (the
   freeze is exact when no prefix row attends a later one); the store is warmed by problems of another draw,
   as a server that has run a while, so every batch finds the prefix stored.
2. Time to first token: requests one at a time (the same prefix, different problems), submit to the end of the
   first denoising step (the first committed tokens), medians over requests 2..N, with and without the store.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch

from dlmtrt.evals.evaluate import evaluate
from dlmtrt.evals.shared_prefix import SharedPrefix, parse_shared_prefix
from dlmtrt.evals.tasks import get_task, parse_task
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.generate import generate_ids
from dlmtrt.runtime.params import greedy_params
from dlmtrt.runtime.policies import parse_policy
from dlmtrt.runtime.prefix import PrefixStore

STORE_BYTES = 1 << 30


def ttft(backend, tokenizer, task_spec: str, shared: SharedPrefix, requests: int, store_bytes: int) -> list[float]:
    """Seconds from submit to the end of the first step, one request at a time."""
    name, diff = parse_task(task_spec)
    task = get_task(name)
    problems = task.problems(requests, 77, **diff)
    encoded = shared.encode(tokenizer, task, diff, problems, None)
    params = greedy_params(backend.info.family, task.answer_tokens, attention=backend.info.attention)
    store = PrefixStore(store_bytes) if store_bytes else None
    out = []
    for ids, _ in encoded:
        t0 = time.perf_counter()
        first = []

        def on_step(i: int, total: int) -> None:
            if not first:
                if backend.info.device.type == "cuda":
                    torch.cuda.synchronize()
                first.append(time.perf_counter() - t0)
        generate_ids(backend, tokenizer, [ids], policy=parse_policy("append"), prefix_store=store, on_step=on_step,
                     **params)
        out.append(first[0])
    return out


@click.command()
@click.option("--model", default="tiny-sdar-tasks", show_default=True)
@click.option("--n", default=200, show_default=True)
@click.option("--n-long", default=50, show_default=True, help="Problems of shift128 (129 steps each).")
@click.option("--prefix", "prefix_spec", default="instruction,shots=2", show_default=True)
@click.option("--requests", default=12, show_default=True, help="Requests of the time-to-first-token run.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/prefix-exact-sdar-cpu.json"),
              show_default=True)
def main(model, n, n_long, prefix_spec, requests, device, out):
    from dlmtrt.paths import check_output_file, write_text_atomic
    check_output_file(out)
    shared = parse_shared_prefix(prefix_spec)
    be, tok, src = make_backend("torch", model, device=device)
    rows = []
    for task, k in (("sudoku4:clues=8-12", n), ("countdown:numbers=3", n), ("shift128", n_long)):
        (plain,), rec0 = evaluate(be, tok, task, k, ["append"], batch_size=50, shared_prefix=shared)
        (stored,), rec1 = evaluate(be, tok, task, k, ["append"], batch_size=50, shared_prefix=shared,
                                   prefix_store_bytes=STORE_BYTES, warm=8)
        same = sum(a["output"] == b["output"] for a, b in zip(rec0, rec1))
        rows.append(dict(task=task, n=k, accuracy_without=plain.accuracy, accuracy_with=stored.accuracy,
                         identical_answers=same, prefix_tokens=stored.prefix_tokens,
                         prompt_rows_served=stored.prefix_rows_served, rows_fraction_without=plain.rows_fraction,
                         rows_fraction_with=stored.rows_fraction))
        print(f"{task}: accuracy {plain.accuracy:.3f} without the store, {stored.accuracy:.3f} with it; "
              f"{same}/{k} answers identical; {100 * stored.prefix_rows_served:.1f}% of prompt rows served", flush=True)
    t_without = ttft(be, tok, "countdown:numbers=3", shared, requests, 0)
    t_with = ttft(be, tok, "countdown:numbers=3", shared, requests, STORE_BYTES)
    timing = dict(task="countdown:numbers=3", requests=requests,
                  ttft_ms_without=round(1e3 * statistics.median(t_without[1:]), 2),
                  ttft_ms_with=round(1e3 * statistics.median(t_with[1:]), 2))
    timing["speedup"] = round(timing["ttft_ms_without"] / timing["ttft_ms_with"], 2)
    print(f"time to first token, one request at a time: {timing['ttft_ms_without']} ms without the store, "
          f"{timing['ttft_ms_with']} ms with it ({timing['speedup']}x)")
    doc = dict(model=model, device=device, torch=torch.__version__, shared_prefix=shared.spec, rows=rows,
               ttft=timing, command="python -m bench.prefix_exact " + " ".join(sys.argv[1:]))
    write_text_atomic(out, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
