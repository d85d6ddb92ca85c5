"""What cross-request prefix reuse (runtime/prefix.py) costs and buys, on the CPU (`python -m bench.prefix_reuse`,
about 10 minutes; writes bench/results/prefix-reuse-cpu.json and prints two tables).

1. Accuracy: the shipped trained tiny models on their tasks (n=200, batches of 50, so the first batch fills
   the store and the other three reuse its prompt blocks), with and without reuse, under the policies that
   cache prompt rows (Dream `pd`, LLaDA `dual`); reuse across different problems is an approximation for these
   bidirectional models, and this is its measured cost.
2. The shared-system-prompt workload: a 400-token prefix shared by every request, a different 40-token question
   each, 32 new tokens in 32 steps (`pd`), requests one after another at tiny-Dream shape with random weights.
   Prefill rows (the first step's rows), time to the first committed tokens (end of the first step) and whole
   request time, medians over requests 2..N (request 1 fills the store), with and without reuse.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dlmtrt.evals.evaluate import evaluate
from dlmtrt.evals.speed import random_model, shape_args
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.generate import dream_generate
from dlmtrt.runtime.prefix import PrefixStore

TASKS = {"dream": ["sudoku4", "countdown"], "llada": ["sudoku4", "countdown"]}  # shift128: 129 steps, too slow here
POLICY = {"dream": "pd", "llada": "dual"}


def accuracy(n: int = 200, batch: int = 50) -> list[dict]:
    rows = []
    for fam in ("dream", "llada"):
        be, tok, _ = make_backend("torch", f"tiny-{fam}-tasks")
        for task in TASKS[fam]:
            blocks = 2 if fam == "llada" else None
            base, _ = evaluate(be, tok, task, n, [POLICY[fam]], batch_size=batch, blocks=blocks)
            reuse, _ = evaluate(be, tok, task, n, [POLICY[fam]], batch_size=batch, blocks=blocks,
                                prefix_store_bytes=1 << 28, prefix_block=4)
            r = dict(family=fam, task=task, policy=POLICY[fam], n=n, accuracy=base[0].accuracy,
                     accuracy_reuse=reuse[0].accuracy, rows_fraction=base[0].rows_fraction,
                     rows_fraction_reuse=reuse[0].rows_fraction, prompt_rows_served=reuse[0].prefix_rows_served)
            rows.append(r)
            print(f"{fam:5s} {task:10s} {POLICY[fam]:4s} accuracy {r['accuracy']:.3f} -> {r['accuracy_reuse']:.3f}, "
                  f"rows {r['rows_fraction']:.3f} -> {r['rows_fraction_reuse']:.3f}, prompt rows served "
                  f"{r['prompt_rows_served']:.2f}")
    return rows


def shared_prompt(requests: int = 12, prefix: int = 400, question: int = 40, answer: int = 32) -> dict:
    torch.manual_seed(0)
    model = random_model(shape_args("tiny-dream"), "cpu", torch.float32)
    be = TorchBackend(model)
    g = torch.Generator().manual_seed(1)
    system = torch.randint(0, 250, (1, prefix), generator=g)
    qs = [torch.randint(0, 250, (1, question), generator=g) for _ in range(requests)]
    out = {}
    for label, store in (("no reuse", None), ("reuse", PrefixStore(1 << 28, 16))):
        ttft, total, prefill = [], [], []
        for q in qs:
            ids = torch.cat([system, q], 1)
            first = []
            t0 = time.perf_counter()
            _, st = dream_generate(be, ids, max_new_tokens=answer, steps=answer, alg="maskgit_plus", temperature=0.0,
                                   policy="pd", prefix_store=store,
                                   on_step=lambda i, n: first.append(time.perf_counter()) if i == 1 else None)
            total.append(time.perf_counter() - t0)
            ttft.append(first[0] - t0)
            prefill.append(st.per_step_rows[0])
        out[label] = {"prefill_rows": statistics.median(prefill[1:]), "ttft_ms": 1e3 * statistics.median(ttft[1:]),
                      "request_ms": 1e3 * statistics.median(total[1:]), "prefill_rows_first": prefill[0]}
    out["prefill_rows_cut"] = 1 - out["reuse"]["prefill_rows"] / out["no reuse"]["prefill_rows"]
    out["ttft_speedup"] = out["no reuse"]["ttft_ms"] / out["reuse"]["ttft_ms"]
    out["request_speedup"] = out["no reuse"]["request_ms"] / out["reuse"]["request_ms"]
    print(f"shared {prefix}-token prefix + {question}-token question, {answer} new tokens, pd, tiny-dream shape, CPU:")
    for k in ("no reuse", "reuse"):
        v = out[k]
        print(f"  {k:9s} prefill rows {v['prefill_rows']:.0f}  TTFT {v['ttft_ms']:.1f} ms  request {v['request_ms']:.1f} ms")
    print(f"  prefill rows cut {100 * out['prefill_rows_cut']:.1f}%, TTFT {out['ttft_speedup']:.2f}x, "
          f"request {out['request_speedup']:.2f}x")
    return out


def main(path: str) -> None:
    res = {"device": "cpu", "torch": torch.__version__, "shared_prompt": shared_prompt()}
    Path(path).write_text(json.dumps(res, indent=1))
    res["accuracy"] = accuracy()
    Path(path).write_text(json.dumps(res, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/prefix-reuse-cpu.json")
