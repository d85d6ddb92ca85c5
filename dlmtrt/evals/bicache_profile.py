"""The samples BiCache's offline profile measures (runtime/bicache.profile), and the profile run behind
`dlmtrt bicache-profile`.

A sample is a conversation cut just before a user turn: the earlier turns are the shared prefix (P tokens), the
user turn the rest (U tokens), tokenized exactly as the server tokenizes a chat (runtime/bicache.chat_prefix, the
authors' tokenization). Its bucket is the authors' profile ratio round(100 P / (P + U)) (no answer counted). The
samples come from one of two sources:

- a conversations file, a JSON list of conversations, each a list of {"role", "content"} messages: every user
  turn with messages before it is a sample, in file order (the authors profile WildChat conversations cut at
  chosen turns); a sample longer than the model's positions is skipped, as the authors' max_sequence_length does;
- the task generators (the default, for the tiny task models, which know no other text): a system instruction
  and k solved problems as user/assistant turns are the shared prefix; the last user turn holds j solved problems
  and then the problem to answer. Three instructions of different lengths, k and j span the ratios; which task
  each problem comes from is drawn at random, so the lengths vary enough to fill every bucket in reach. Every
  sample leaves room for its problem's answer within the model's positions, so each is a request the model could
  be served. The shortest prefix (the shortest instruction alone) over the longest last turn that fits bounds
  the lowest bucket they reach (5 on the 512-position tiny models: ratio 0 would need a last turn ~200 times the
  prefix).

Which buckets are profiled: every bucket from the lowest to the highest one holding `per_bucket` samples (or
the range asked for), each with its first `per_bucket` samples; a bucket inside the range with fewer is refused,
naming it. The authors' profiler requires every bucket from 0; a table that starts higher serves requests of
lower ratios without reuse (DepthTable.serving_depth), which is exact, never a guess of their depth.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from dlmtrt.errors import UsageError
from dlmtrt.runtime.bicache import chat_prefix

from .tasks import get_task

DEFAULT_TASKS = ("sudoku4", "countdown")  # shift128's 137-token prompts and 128-token answers fill a 512-token model
INSTRUCTIONS = ("Solve it.", "Solve the puzzle.", "Solve each puzzle; answer with the solution only.")
MAX_EXAMPLES = 16  # solved problems in the prefix, and in the last turn


@dataclass(frozen=True)
class Sample:
    prefix: list[int]
    rest: list[int]
    source: str  # where it came from, for the record: "conversation 3 turn 4", "tasks k=2 j=0"

    @property
    def ratio(self) -> int:
        """The authors' profile ratio (no answer counted)."""
        return round(len(self.prefix) / (len(self.prefix) + len(self.rest)) * 100)


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a JSON file, checked: a list of lists of {"role": str, "content": str}."""
    p = Path(path)
    where = f"--conversations {p}"
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{where}: cannot read it as JSON ({e})") from None
    if not isinstance(doc, list) or not doc:
        raise UsageError(f"{where}: expected a non-empty JSON list of conversations (lists of "
                         "{\"role\", \"content\"} messages)")
    for i, conv in enumerate(doc):
        if not isinstance(conv, list):
            raise UsageError(f"{where}: conversation {i} is not a list of messages")
        for k, m in enumerate(conv):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise UsageError(f"{where}: conversation {i} message {k} is not a {{\"role\": str, \"content\": str}} "
                                 "object")
    return [[{"role": m["role"], "content": m["content"]} for m in conv] for conv in doc]


def conversation_samples(tokenizer, conversations: list[list[dict]], max_positions: int) -> tuple[list[Sample], int]:
    """(samples, how many were skipped as longer than the model's positions): one per user turn that has
    messages before it."""
    out, skipped = [], 0
    for i, conv in enumerate(conversations):
        for t in range(1, len(conv)):
            if conv[t]["role"] != "user":
                continue
            ids, P = chat_prefix(tokenizer, conv[:t + 1])
            if len(ids) > max_positions:
                skipped += 1
                continue
            out.append(Sample(ids[:P], ids[P:], f"conversation {i} turn {t}"))
    return out, skipped


def _task_conversation(rng: random.Random, tasks: list, instruction: str, k: int, j: int) -> tuple[list[dict], int]:
    """(messages, the answer tokens of the problem asked) of one task-built conversation."""
    def draw():
        return rng.choice(tasks).problems(1, rng.randrange(1 << 30))[0]
    msgs = [{"role": "system", "content": instruction}]
    for _ in range(k):
        e = draw()
        msgs += [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.answer}]
    shown = "".join(e.prompt + e.answer + "\n\n" for e in (draw() for _ in range(j)))
    task = rng.choice(tasks)
    q = task.problems(1, rng.randrange(1 << 30))[0]
    msgs.append({"role": "user", "content": shown + q.prompt})
    return msgs, task.answer_tokens


def task_samples(tokenizer, task_names: list[str], max_positions: int, per_bucket: int, seed: int = 0,
                 lo: int | None = None, hi: int | None = None, rounds: int = 200) -> list[Sample]:
    """Samples built from the task generators (module docstring), deterministic for a seed: first one
    conversation per shape (instruction, k, j) that fits to estimate its ratio, then rounds over the shapes
    whose estimate lies within 3 of a bucket still short of `per_bucket`, until none is (or `rounds` pass)."""
    tasks = [get_task(n) for n in task_names]
    rng = random.Random(f"bicache-profile:{seed}")
    out: list[Sample] = []
    filled: dict[int, int] = {}

    def make(shape) -> Sample | None:
        i, k, j = shape
        msgs, answer = _task_conversation(rng, tasks, INSTRUCTIONS[i], k, j)
        ids, P = chat_prefix(tokenizer, msgs)
        if len(ids) + answer > max_positions:
            return None
        return Sample(ids[:P], ids[P:], f"tasks instruction={i} k={k} j={j}")

    estimate = {}
    for shape in ((i, k, j) for i in range(len(INSTRUCTIONS)) for k in range(MAX_EXAMPLES + 1)
                  for j in range(MAX_EXAMPLES + 1)):
        s = make(shape)
        if s is not None:
            estimate[shape] = s.ratio
    if not estimate:
        raise UsageError(f"no task conversation fits the model's {max_positions} positions with its answer; "
                         "profile with --conversations")
    low = max(min(estimate.values()), lo if lo is not None else 0)
    high = min(max(estimate.values()), hi if hi is not None else 100)
    for _ in range(rounds):
        want = [r for r in range(low, high + 1) if filled.get(r, 0) < per_bucket]
        if not want:
            break
        for shape, r0 in estimate.items():
            if not any(abs(r0 - w) <= 3 for w in want):
                continue
            s = make(shape)
            if s is not None and low <= s.ratio <= high and filled.get(s.ratio, 0) < per_bucket:
                out.append(s)
                filled[s.ratio] = filled.get(s.ratio, 0) + 1
    return out


@dataclass(frozen=True)
class Buckets:
    first: int  # the lowest bucket profiled
    samples: list[list[Sample]]  # samples[k]: bucket first + k
    available: dict[int, int]  # every bucket's count before the cut to per_bucket

    @property
    def last(self) -> int:
        return self.first + len(self.samples) - 1


def bucket(samples: list[Sample], per_bucket: int, lo: int | None = None, hi: int | None = None,
           reach: str = "") -> Buckets:
    """The buckets to profile (module docstring): [lo, hi], by default the lowest and highest buckets holding
    `per_bucket` samples; every bucket between must hold that many. `reach` says what the source can reach,
    for the refusal."""
    by: dict[int, list[Sample]] = {}
    for s in samples:
        by.setdefault(s.ratio, []).append(s)
    full = sorted(r for r, v in by.items() if len(v) >= per_bucket)
    if not full and (lo is None or hi is None):
        raise UsageError(f"no ratio bucket has {per_bucket} samples ({len(samples)} samples in {len(by)} buckets"
                         f"{reach}): lower --per-bucket or give more conversations")
    lo = full[0] if lo is None else lo
    hi = full[-1] if hi is None else hi
    if lo > hi:
        raise UsageError(f"--min-ratio {lo} is above --max-ratio {hi}; give a range of buckets low to high")
    for r in range(lo, hi + 1):
        n = len(by.get(r, []))
        if n < per_bucket:
            raise UsageError(f"ratio bucket {r} (a shared prefix of {r - 0.5:g}-{r + 0.5:g}% of the prompt) has {n} "
                             f"of {per_bucket} samples{reach}: every bucket from {lo} to {hi} needs them; add "
                             "conversations with such prefixes, lower --per-bucket, or narrow --min-ratio/--max-ratio")
    return Buckets(lo, [by[r][:per_bucket] for r in range(lo, hi + 1)], {r: len(v) for r, v in sorted(by.items())})


def leading_layers(means: list[float], threshold: float) -> int:
    """The layers from the first whose mean similarity is strictly above `threshold` (a bucket's reusable
    depth before the table's only-growing rule)."""
    n = 0
    for x in means:
        if not x > threshold:
            break
        n += 1
    return n


def profile_document(*, model: str, family: str, layers: int, dtype: str, threshold: float,
                     table: dict[int, int], buckets: Buckets, means: list[list[float]], source: dict) -> dict:
    """What bicache.json records (runtime/bicache_table.py reads it)."""
    return {
        "model": model, "family": family, "layers": layers, "dtype": dtype,
        "threshold": threshold,
        "table": {str(r): b for r, b in sorted(table.items())},
        "ratio": "round(100 * P / (P + U)): P shared-prefix tokens, U last-turn tokens (requests look their depth "
                 "up at round(100 * P / (P + U + answer)), as the authors' engine)",
        "buckets": {"first": buckets.first, "last": buckets.last, "per_bucket": len(buckets.samples[0])},
        "bucket_means": {str(buckets.first + k): [round(x, 6) for x in m] for k, m in enumerate(means)},
        "leading_layers": {str(buckets.first + k): leading_layers(m, threshold) for k, m in enumerate(means)},
        "samples": {**source, "available": {str(r): n for r, n in buckets.available.items()},
                    "profiled": sum(len(b) for b in buckets.samples)},
    }
