"""Quality harness: accuracy and work of decoding policies on the task generators.

For each policy it decodes the same N problems and reports accuracy (exact checkers), mean forward passes
per problem, the mean fraction of canvas rows computed per step (the compute proxy of a cache policy),
wall time and tokens/s. Used by `dlmtrt eval` and by the cache-policy benchmarks.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dlmtrt.errors import UsageError
from dlmtrt.evals.shared_prefix import WARM_SEED, BiCacheSetting, SharedPrefix
from dlmtrt.evals.tasks import get_task, parse_task
from dlmtrt.runtime.bicache import BiCache, BiCacheStore, prefix_ratio
from dlmtrt.runtime.generate import generate_ids, generate_text
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
    # rows computed in each layer over every layer's full canvas at every step: rows_fraction, plus the prefix rows
    # BiCache's deep layers recompute at its refresh steps (which enter at layer b, so count in L - b layers)
    layer_rows_fraction: float | None = None
    shared_prefix: str | None = None  # the shared earlier turns (evals/shared_prefix.py), None: the bare prompt
    prefix_tokens: float | None = None  # mean shared-prefix length P
    bicache_depths: dict | None = None  # BiCache depth -> problems ("none": below the table, decoded without reuse)
    store_misses: int | None = None  # BiCache: prefix-only forwards, each over one prefix

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _CountedBiCache(BiCache):
    """BiCache, counting the prefix rows its deep layers recompute (every sequence's, at each refresh step)."""

    deep_rows: int = field(default=0, init=False)

    def deep(self, session, step: int):
        rows = super().deep(session, step)
        if rows is not None:
            self.deep_rows += rows.position_ids.numel()
        return rows


def evaluate(backend, tokenizer, task_spec: str, n: int, policies: list[str], *, seed: int = 1234,
             batch_size: int = 64, steps: int | None = None, blocks: int | None = None, remasking: str | None = None,
             block_length: int | None = None, progress=None, prefix_store_bytes: int = 0,
             prefix_block: int = PREFIX_BLOCK, shared_prefix: SharedPrefix | None = None,
             bicache: BiCacheSetting | None = None, warm: int = 0, max_positions: int | None = None,
             answer_start: int = 0) -> tuple[list[PolicyResult], list[dict]]:
    """Run every policy on the same problems; returns the summary rows and per-problem records. `blocks` or
    `block_length` (not both) split the answer into blocks (`greedy_params`). `progress(k)` is told of k more
    problems done, in fractions as the steps of a batch go by. With `prefix_store_bytes` > 0 each policy gets
    a fresh prefix store (runtime/prefix.py) shared by its batches, so later batches start from the prompt
    blocks earlier ones stored.

    `shared_prefix` asks each problem as the last turn of a chat whose earlier turns all problems share
    (evals/shared_prefix.py; tokenized as the authors' BiCache and the server do). `bicache` reuses that prefix
    with BiCache (runtime/bicache.py; a fresh store per policy): a batch is decoded in parts of one reuse depth
    (BiCache decodes one depth at a time), and a problem whose prefix ratio lies below the depth table's first
    entry without reuse, as a server would. `warm` requests (problems of another draw) are decoded through the
    policy's store first and not counted, so that the first batch already finds what an earlier request stored,
    as in a server that has run a while: the all-layer freeze stores prompts only after a request's first step.
    `max_positions` refuses canvases beyond the model's positions before any work. A `+prophet` policy averages
    its gaps over the five answer positions from `answer_start`: the tiny tasks' answers are the answer itself
    from position 0 (no "The answer is" before it), so by default their first five tokens."""
    if n < 1 or batch_size < 1 or warm < 0:
        raise UsageError(f"n and batch_size must be >= 1 and warm >= 0, got {n}, {batch_size} and {warm}")
    if bicache is not None and prefix_store_bytes > 0:
        raise UsageError("one prefix store at a time: BiCache (bicache) or the all-layer freeze (prefix_store_bytes)")
    if bicache is not None and shared_prefix is None:
        raise UsageError("BiCache reuses the shared earlier turns of a chat: give a shared prefix "
                         "(for example 'instruction,shots=2')")
    if warm and bicache is None and prefix_store_bytes <= 0:
        raise UsageError("warm-up requests fill a prefix store: give bicache or prefix_store_bytes, or warm=0")
    name, diff = parse_task(task_spec)
    task = get_task(name)
    problems = task.problems(n, seed, **diff)
    warmups = task.problems(warm, WARM_SEED, **diff) if warm else []
    family = backend.info.family
    params = greedy_params(family, task.answer_tokens, steps=steps, blocks=blocks, remasking=remasking,
                           block_length=block_length, attention=backend.info.attention)
    schedule = get_family(family).schedule_name(params)
    new_tokens = get_family(family).new_tokens(params)
    if shared_prefix is not None:
        encoded = shared_prefix.encode(tokenizer, task, diff, problems, max_positions)
        warm_encoded = shared_prefix.encode(tokenizer, task, diff, warmups, max_positions) if warmups else []
    else:
        encoded = [(tokenizer(p.prompt, add_special_tokens=False)["input_ids"], 0) for p in problems]
        warm_encoded = [(tokenizer(p.prompt, add_special_tokens=False)["input_ids"], 0) for p in warmups]
    layers = backend.info.num_layers

    def depth_of(ids: list[int], P: int) -> int | None:
        """The problem's BiCache depth, None below the table's first ratio (no reuse)."""
        r = prefix_ratio(P, len(ids) + new_tokens)
        return bicache.table.depth(r, layers) if r >= bicache.table.depths[0][0] else None

    def parts(idx: list[int], items: list[tuple[list[int], int]], store):
        """(indices, the generation's prefix store, BiCache depth) of each generation of a batch."""
        if bicache is None:
            return [(idx, store, None)]
        by: dict = {}
        for i in idx:
            by.setdefault(depth_of(*items[i]), []).append(i)
        return [(part, None if d is None else _CountedBiCache(store, bicache.table, [items[i][1] for i in part],
                                                             bicache.interval), d) for d, part in by.items()]

    def run(items, prompts, part, reuse, on_step=None):
        span = {"answer_start": answer_start} if policy.prophet is not None else {}
        if shared_prefix is None:
            return generate_text(backend, tokenizer, [prompts[i].prompt for i in part], policy=policy,
                                 prefix_store=reuse, on_step=on_step, max_positions=max_positions, **span, **params)
        return generate_ids(backend, tokenizer, [items[i][0] for i in part], policy=policy, prefix_store=reuse,
                            on_step=on_step, max_positions=max_positions, **span, **params)

    results, records = [], []
    for spec in policies:
        policy = parse_policy(spec)
        spec = policy.spec
        correct, fwd, rows, rows_full, wall, toks, early, layer_rows, served = 0, 0, 0, 0, 0.0, 0, 0, 0, 0
        depths: dict[str, int] = {}
        store = (BiCacheStore(bicache.store_tokens) if bicache is not None
                 else PrefixStore(prefix_store_bytes, prefix_block) if prefix_store_bytes > 0 else None)
        for start in range(0, len(warmups), batch_size):
            for part, reuse, _ in parts(list(range(start, min(start + batch_size, warm))), warm_encoded, store):
                run(warm_encoded, warmups, part, reuse)
        misses = store.stats.misses if bicache is not None else None
        for start in range(0, n, batch_size):
            batch: dict[int, dict] = {}  # the batch's records, put back in problem order after its parts
            for part, reuse, depth in parts(list(range(start, min(start + batch_size, n))), encoded, store):
                t0 = time.perf_counter()
                done = [0.0]

                def on_step(i: int, total: int, k: int = len(part)) -> None:
                    if progress is not None and total:
                        frac = k * min(i, total) / total
                        progress(frac - done[0])
                        done[0] = frac
                g = run(encoded, problems, part, reuse, on_step)
                wall += time.perf_counter() - t0
                st = g.stats
                fwd += st.seq_forward_passes
                rows += st.rows_computed
                rows_full += st.rows_full
                toks += st.batch * st.new_tokens
                early += st.early_committed
                served += st.prefix_rows
                layer_rows += st.rows_computed * layers
                if isinstance(reuse, _CountedBiCache):
                    layer_rows += reuse.deep_rows * (layers - depth)
                if bicache is not None:
                    key = "none" if depth is None else str(depth)
                    depths[key] = depths.get(key, 0) + len(part)
                for i, out in zip(part, g.texts):
                    p = problems[i]
                    ok = task.check(p, out)
                    correct += ok
                    batch[i] = {"task": task_spec, "policy": spec, "schedule": schedule, "prompt": p.prompt,
                                "output": out, "correct": ok, "prefix_tokens": encoded[i][1],
                                **({"bicache_depth": depth} if bicache is not None else {}),
                                **{k: v for k, v in p.meta.items() if isinstance(v, (int, str))}}
                if progress is not None:
                    progress(len(part) - done[0])
            records += [batch[i] for i in sorted(batch)]
        prompt_rows = sum(len(ids) for ids, _ in encoded)
        results.append(PolicyResult(
            task_spec, spec, schedule, n, correct / n, fwd / n, rows / max(rows_full, 1), rows / max(toks, 1),
            early / n, wall, toks / wall if wall else None, correct,
            served / max(prompt_rows, 1) if store is not None else None,
            layer_rows / max(rows_full * layers, 1), shared_prefix.spec if shared_prefix is not None else None,
            sum(P for _, P in encoded) / n if shared_prefix is not None else None,
            dict(sorted(depths.items())) if bicache is not None else None,
            store.stats.misses - misses if bicache is not None else None))
    return results, records


def write_results(path: Path, model: str, results: list[PolicyResult], extra: dict | None = None) -> None:
    """The results as strict JSON (no NaN), written whole or not at all."""
    from dlmtrt.paths import write_text_atomic
    doc = {"model": model, "torch": torch.__version__, "device": extra.get("device") if extra else None,
           "results": [r.to_dict() for r in results], **(extra or {})}
    write_text_atomic(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
