"""Quality harness: accuracy and work of decoding policies on the task generators.

For each policy it decodes the same N problems and reports accuracy (exact checkers), mean forward passes
per problem, the mean fraction of canvas rows computed per step (the compute proxy of a cache policy),
wall time and tokens/s. Used by `dlmtrt eval` and by the cache-policy benchmarks.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dlmtrt.errors import UsageError
from dlmtrt.evals.tasks import Problem, get_task, parse_task
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.prefix import BLOCK as PREFIX_BLOCK
from dlmtrt.runtime.prefix import PrefixStore
from dlmtrt.runtime.families import get as get_family
from dlmtrt.runtime.params import greedy_params
from dlmtrt.runtime.policies import parse_policy


@dataclass
class PolicyResult:
    task: str
    policy: str
    schedule: str
    n: int
    accuracy: float
    forward_passes: float  # mean per problem of the steps at which it still had masks (its own NFE)
    rows_fraction: float
    rows_per_token: float  # canvas rows computed per generated token (batch padding of the active set included)
    early_committed: float  # mean tokens per problem committed by early commit
    wall_s: float
    tokens_per_s: float | None  # None when no time was measured
    correct: int
    prefix_rows_served: float | None = None  # share of prompt rows served by the prefix store (None: no store)

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(backend, tokenizer, task_spec: str, n: int, policies: list[str], *, seed: int = 1234,
             batch_size: int = 64, steps: int | None = None, blocks: int | None = None, remasking: str | None = None,
             block_length: int | None = None, progress=None, prefix_store_bytes: int = 0,
             prefix_block: int = PREFIX_BLOCK) -> tuple[list[PolicyResult], list[dict]]:
    """Run every policy on the same problems; returns the summary rows and per-problem records. `blocks` or
    `block_length` (not both) split the answer into blocks (`greedy_params`). `progress(k)` is told of k more
    problems done, in fractions as the steps of a batch go by. With `prefix_store_bytes` > 0 each policy gets
    a fresh prefix store (runtime/prefix.py) shared by its batches, so later batches start from the prompt
    blocks earlier ones stored."""
    if n < 1 or batch_size < 1:
        raise UsageError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    name, diff = parse_task(task_spec)
    task = get_task(name)
    problems = task.problems(n, seed, **diff)
    family = backend.info.family
    params = greedy_params(family, task.answer_tokens, steps=steps, blocks=blocks, remasking=remasking,
                           block_length=block_length, attention=backend.info.attention)
    schedule = get_family(family).schedule_name(params)
    results, records = [], []
    for spec in policies:
        policy = parse_policy(spec)
        spec = policy.spec
        correct, fwd, rows, rows_full, wall, toks, early = 0, 0, 0, 0, 0.0, 0, 0
        store = PrefixStore(prefix_store_bytes, prefix_block) if prefix_store_bytes > 0 else None
        for start in range(0, n, batch_size):
            chunk: list[Problem] = problems[start:start + batch_size]
            t0 = time.perf_counter()
            done = [0.0]

            def on_step(i: int, total: int, k: int = len(chunk)) -> None:
                if progress is not None and total:
                    frac = k * min(i, total) / total
                    progress(frac - done[0])
                    done[0] = frac
            g = generate_text(backend, tokenizer, [p.prompt for p in chunk], policy=policy, prefix_store=store,
                              on_step=on_step, **params)
            wall += time.perf_counter() - t0
            st = g.stats
            fwd += st.seq_forward_passes
            rows += st.rows_computed
            rows_full += st.rows_full
            toks += st.batch * st.new_tokens
            early += st.early_committed
            for p, out in zip(chunk, g.texts):
                ok = task.check(p, out)
                correct += ok
                records.append({"task": task_spec, "policy": spec, "schedule": schedule, "prompt": p.prompt, "output": out, "correct": ok,
                                **{k: v for k, v in p.meta.items() if isinstance(v, (int, str))}})
            if progress is not None:
                progress(len(chunk) - done[0])
        results.append(PolicyResult(task_spec, spec, schedule, n, correct / n, fwd / n, rows / max(rows_full, 1),
                                    rows / max(toks, 1), early / n, wall,
                                    toks / wall if wall else None, correct,
                                    store.stats.hit_rows / max(store.stats.prompt_rows, 1) if store else None))
    return results, records


def write_results(path: Path, model: str, results: list[PolicyResult], extra: dict | None = None) -> None:
    """The results as strict JSON (no NaN), written whole or not at all."""
    from dlmtrt.paths import write_text_atomic
    doc = {"model": model, "torch": torch.__version__, "device": extra.get("device") if extra else None,
           "results": [r.to_dict() for r in results], **(extra or {})}
    write_text_atomic(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
