"""Serving at Dream-7B shape on a GPU, random bf16 weights (nothing downloaded). One device call:

    python3 bench/serve_gpu.py OUT.json [--quick]

1. **Throughput under load**: the same requests (random prompt ids, 128 prompt + 64 new tokens, 64 steps,
   greedy) answered one at a time, then 8 and 32 in flight, through the server's `Scheduler` in this process:
   the worker, cohorts and step-level batching that `dlmtrt serve` runs (HTTP and JSON add nothing on the GPU
   side, and a 15 GB checkpoint would have to be written to disk first to start a real server). Per backend
   (`torch`: many cohorts, each with its own cache; `torch-graph`: CUDA graphs, one cohort at a time) and per
   policy (`none`: every row every step; `dual`: Fast-dLLM's dual cache, blocks of 32).
2. **Shared system prompt**: a 400-token prefix shared by every request and a different 40-token question
   each, 32 new tokens in 32 steps under `pd`, requests one after another, with and without the prefix store.
   Prefill rows = the first step's computed rows; time to first token = submit to the first canvas event (sent
   after the first step, which reads the canvas back, so the GPU's work is included). Medians over requests
   2..N (request 1 fills the store).

Random weights have no trained tokenizer: answers are decoded with a word-level tokenizer over the shape's
vocabulary (`<123>` per id), which costs the same per token as any fast tokenizer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlmtrt.evals.speed import random_model, shape_args  # noqa: E402
from dlmtrt.runtime.policies import parse_policy  # noqa: E402
from dlmtrt.runtime.families.dream import FAMILY as DREAM, DreamParams  # noqa: E402
from dlmtrt.runtime.prefix import PrefixStore  # noqa: E402
from dlmtrt.serve.scheduler import Job, Scheduler  # noqa: E402


def word_tokenizer(vocab: int, eos: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token=f"<{eos}>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<{eos}>", pad_token=f"<{eos}>")


class Client:
    """Submits jobs to the scheduler and records when each got its first event and its answer."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.lock = threading.Lock()
        self.first: dict[int, float] = {}
        self.errors: list[str] = []
        self.done: dict[int, tuple[float, dict]] = {}
        self.all_done = threading.Condition(self.lock)

    def sink(self, job: Job, kind: str, payload) -> None:
        now = time.perf_counter()
        with self.lock:
            self.first.setdefault(job.id, now)
            if kind == "error":
                self.errors.append(f"request {job.id} failed: {payload}")
            if kind in ("done", "error"):
                self.done[job.id] = (now, payload)
                self.all_done.notify_all()

    def run(self, prompts: list[list[int]], params: dict, policy: str, in_flight: int, canvas: bool = False,
            family=DREAM, **job_fields):
        """Keep `in_flight` requests outstanding until all are answered; per request (submit, first event, done,
        answer dict). `job_fields` go to every Job (a chat's prefix_len and BiCache depth)."""
        plan = parse_policy(policy)
        new = family.new_tokens(params)
        jobs = [Job(p, params, plan, 0, family.draws_random(params), new, self.sink, canvas=canvas, **job_fields)
                for p in prompts]
        submitted: dict[int, float] = {}
        nxt = 0
        with self.lock:
            while len(self.done) < len(jobs) or nxt < len(jobs):
                room = in_flight - (nxt - sum(j.id in self.done for j in jobs[:nxt]))
                if room > 0 and nxt < len(jobs):  # the ones that fit go in together, as a burst of clients would
                    batch = jobs[nxt:nxt + room]
                    now = time.perf_counter()
                    submitted.update((j.id, now) for j in batch)
                    self.sched.submit(batch)
                    nxt += len(batch)
                if self.errors:
                    raise RuntimeError("; ".join(self.errors))
                if all(j.id in self.done for j in jobs):
                    break
                self.all_done.wait(1.0)
        out = [(submitted[j.id], self.first[j.id], *self.done[j.id]) for j in jobs]
        for j in jobs:
            self.first.pop(j.id), self.done.pop(j.id)
        return out


def throughput(model, tok, backend_name: str, policies: list[str], n_seq: int, loads: list[int], prompt: int,
               answer: int, vocab: int) -> list[dict]:
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    be = TorchBackend(model) if backend_name == "torch" else TorchGraphBackend(model)
    sched = Scheduler(be, tok, "dream", max_positions=model.args.max_position_embeddings, max_batch=max(loads),
                      max_queue=4096, max_cohorts=max(loads))
    sched.start()
    client = Client(sched)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(max(loads))]
    rows = []
    try:
        for policy in policies:
            params = DreamParams(max_new_tokens=answer, steps=answer, alg="entropy", temperature=0.0,
                                 block_length=32 if policy == "dual" else None).validate().to_dict()
            client.run(prompts[:2], params, policy, 1)  # warm-up (allocator, graphs of the B=1 shapes)
            res = {}
            t = time.perf_counter()
            seq = client.run(prompts[:n_seq], params, policy, 1)
            res[1] = (time.perf_counter() - t, seq)
            for n in loads:
                client.run(prompts[:n], params, policy, n)  # warm-up of this batch's shapes
                t = time.perf_counter()
                r = client.run(prompts[:n], params, policy, n)
                res[n] = (time.perf_counter() - t, r)
            base = n_seq / res[1][0]
            seq_text = [x[3]["text"] for x in seq]
            for n, (wall, r) in res.items():
                same = sum(x[3]["text"] == y for x, y in zip(r, seq_text))
                row = dict(backend=backend_name, policy=policy, in_flight=n, requests=len(r), wall_s=round(wall, 3),
                           req_per_s=round(len(r) / wall, 3), tok_per_s=round(len(r) * answer / wall, 1),
                           ratio=round(len(r) / wall / base, 2),
                           latency_p50_s=round(statistics.median(x[2] - x[0] for x in r), 3),
                           answers_equal_to_sequential=f"{same}/{min(len(r), len(seq_text))}",
                           rows_fraction=round(r[0][3]["dlmtrt"]["rows_computed"] / r[0][3]["dlmtrt"]["rows_full"], 3))
                rows.append(row)
                print(f"{backend_name:11s} {policy:5s} in flight {n:3d}: {row['req_per_s']:7.3f} req/s "
                      f"{row['tok_per_s']:8.1f} tok/s  x{row['ratio']:.2f}  p50 {row['latency_p50_s']:.2f} s  "
                      f"same {row['answers_equal_to_sequential']}", flush=True)
    finally:
        sched.stop(60)
    return rows


def shared_prompt(model, tok, backend_name: str, requests: int, prefix: int, question: int, answer: int,
                  vocab: int, bursts: list[int]) -> dict:
    """TTFT with and without the prefix store: requests one at a time (latency-bound: one step of 472 rows
    against one of 72), then bursts of `bursts` requests arriving together (one cohort; compute-bound, as a
    loaded server is). The store is filled by earlier traffic (the first request of the sequential run)."""
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    g = torch.Generator().manual_seed(1)
    system = torch.randint(0, vocab, (prefix,), generator=g).tolist()
    n = max([requests, *bursts])
    prompts = [system + torch.randint(0, vocab, (question,), generator=g).tolist() for _ in range(n)]
    other = torch.randint(0, vocab, (prefix,), generator=g).tolist()  # warm-up: shares nothing with the workload
    warm = [other + torch.randint(0, vocab, (question,), generator=g).tolist() for _ in range(n)]
    params = DreamParams(max_new_tokens=answer, steps=answer, alg="maskgit_plus", temperature=0.0).validate().to_dict()
    out = {"backend": backend_name}
    for label, store in (("no reuse", None), ("reuse", PrefixStore(8 << 30, 16))):
        be = TorchBackend(model) if backend_name == "torch" else TorchGraphBackend(model)
        sched = Scheduler(be, tok, "dream", max_positions=model.args.max_position_embeddings,
                          max_batch=max(bursts), max_queue=256, max_cohorts=1, prefix_store=store)
        sched.start()
        client = Client(sched)
        client.run(warm[:2], params, "pd", 1)  # the second one reuses the first's prefix: the B=1 shapes are warm
        res = client.run(prompts[:requests], params, "pd", 1, canvas=True)
        ttft = [x[1] - x[0] for x in res]
        total = [x[2] - x[0] for x in res]
        rows = [x[3]["dlmtrt"]["rows_computed"] for x in res]
        out[label] = {"ttft_ms": round(1e3 * statistics.median(ttft[1:]), 2),
                      "request_ms": round(1e3 * statistics.median(total[1:]), 2),
                      "rows_computed_per_request": statistics.median(rows[1:]),
                      "ttft_ms_first": round(1e3 * ttft[0], 2)}
        for k in bursts:
            client.run(warm[:k], params, "pd", k)  # this batch's shapes
            res = client.run(prompts[:k], params, "pd", k, canvas=True)
            out[label][f"burst{k}_ttft_ms"] = round(1e3 * statistics.median(x[1] - x[0] for x in res), 2)
            out[label][f"burst{k}_request_ms"] = round(1e3 * statistics.median(x[2] - x[0] for x in res), 2)
        sched.stop(60)
        if store is not None:
            out[label]["store_bytes"] = store.bytes
            out[label]["prompt_rows_served"] = store.stats.hit_rows
        del be, sched
    # prefill rows: the first step computes every unserved prompt row plus the answer; measured from one request
    out["prefill_rows"] = prefill_rows(model, prompts, params)
    o = out["prefill_rows"]
    out["prefill_rows_cut"] = round(1 - o["reuse"] / o["no reuse"], 4)
    nr, r = out["no reuse"], out["reuse"]
    out["ttft_speedup"] = round(nr["ttft_ms"] / r["ttft_ms"], 2)
    out["request_speedup"] = round(nr["request_ms"] / r["request_ms"], 2)
    for k in bursts:
        out[f"burst{k}_ttft_speedup"] = round(nr[f"burst{k}_ttft_ms"] / r[f"burst{k}_ttft_ms"], 2)
    print(f"{backend_name:11s} shared {prefix}-token prefix + {question}-token question, {answer} new tokens, pd: "
          f"prefill rows {o['no reuse']} -> {o['reuse']} (-{100 * out['prefill_rows_cut']:.1f}%), TTFT one at a time "
          f"{nr['ttft_ms']:.1f} -> {r['ttft_ms']:.1f} ms ({out['ttft_speedup']:.2f}x), request "
          f"{nr['request_ms']:.1f} -> {r['request_ms']:.1f} ms ({out['request_speedup']:.2f}x); " +
          "; ".join(f"burst of {k}: TTFT {nr[f'burst{k}_ttft_ms']:.1f} -> {r[f'burst{k}_ttft_ms']:.1f} ms "
                    f"({out[f'burst{k}_ttft_speedup']:.2f}x)" for k in bursts), flush=True)
    return out


def ttft_parts(model, backend_name: str, requests: int, prefix: int, question: int, answer: int, vocab: int) -> dict:
    """Where the time to the first token goes, one request at a time outside the scheduler: building the
    session (prefix lookup and attach included), the first step, reading the canvas back (medians, ms)."""
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    from dlmtrt.serve.scheduler import build_session
    dev = model.inv_freq.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, vocab, (prefix,), generator=g).tolist()
    prompts = [system + torch.randint(0, vocab, (question,), generator=g).tolist() for _ in range(requests + 2)]
    params = DreamParams(max_new_tokens=answer, steps=answer, alg="maskgit_plus", temperature=0.0).validate().to_dict()
    out = {"backend": backend_name}
    for label, store in (("no reuse", None), ("reuse", PrefixStore(4 << 30, 16))):
        be = TorchBackend(model) if backend_name == "torch" else TorchGraphBackend(model)
        parts, forward = [], []
        inner = be.step

        def timed(inputs, inner=inner, forward=forward):  # the backend's share of the first step
            sync()
            t = time.perf_counter()
            o = inner(inputs)
            sync()
            forward.append(time.perf_counter() - t)
            return o
        be.step = timed
        with torch.inference_mode():
            for p in prompts:
                ids = torch.tensor([p], device=dev)
                sync()
                t0 = time.perf_counter()
                s = build_session(be, "dream", ids, torch.ones_like(ids), params, parse_policy("pd"), store)
                sync()
                t1 = time.perf_counter()
                s.step()
                sync()
                t2 = time.perf_counter()
                s.x.tolist()
                t3 = time.perf_counter()
                parts.append((t1 - t0, t2 - t1, forward[-1], t3 - t2, s.stats.per_step_rows[0]))
        parts = parts[2:]  # the first two warm the shapes (and fill the store)
        out[label] = {k: round(1e3 * statistics.median(x[j] for x in parts), 3)
                      for j, k in enumerate(("session_ms", "first_step_ms", "backend_ms", "readback_ms"))}
        out[label]["first_step_rows"] = parts[0][4]
        del be
    print(f"{backend_name:11s} TTFT parts (ms): " + "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in out[k].items()
                                                                                   if n != "backend")
                                                               for k in ("no reuse", "reuse")), flush=True)
    return out


def prefill_rows(model, prompts: list[list[int]], params: dict) -> dict:
    """The first step's computed rows for the second request, with and without a store the first one filled."""
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    from dlmtrt.runtime.generate import dream_generate
    be = TorchBackend(model)
    out = {}
    for label, store in (("no reuse", None), ("reuse", PrefixStore(4 << 30, 16))):
        for p in prompts[:2]:
            _, st = dream_generate(be, torch.tensor([p], device=model.inv_freq.device), policy="pd",
                                   prefix_store=store, **params)
        out[label] = st.per_step_rows[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--shape", default="dream-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small loads (a smoke run of the script itself)")
    ap.add_argument("--backends", default="torch,torch-graph")
    ap.add_argument("--policies", default="none,dual")
    ap.add_argument("--parts", default="throughput,shared", help="which measurements: throughput, shared, parts (where the time to first token goes)")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    args = shape_args(a.shape)
    t0 = time.perf_counter()
    model = random_model(args, a.device, dtype)
    tok = word_tokenizer(args.vocab_size, args.eos_token_id)
    ordinary = min(args.eos_token_id, args.mask_token_id, args.pad_token_id)  # prompt ids are drawn below it
    doc = {"what": "dlmtrt serving at 7B shape: step-level batching and shared-prefix reuse (random weights)",
           "shape": a.shape, "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device,
           "dtype": str(dtype), "torch": torch.__version__, "build_s": round(time.perf_counter() - t0, 1)}
    loads = [2, 4] if a.quick else [8, 32]
    n_seq = 2 if a.quick else 8
    doc["throughput"] = {"prompt": 128, "answer": 64, "steps": 64, "sequential_requests": n_seq, "rows": []}
    for b in a.backends.split(",") if "throughput" in a.parts else []:
        doc["throughput"]["rows"] += throughput(model, tok, b, a.policies.split(","), n_seq, loads, 128, 64, ordinary)
        Path(a.out).write_text(json.dumps(doc, indent=1))
    doc["shared_prompt"] = [] if "shared" not in a.parts else [shared_prompt(model, tok, b, 4 if a.quick else 10, 400, 40, 32, ordinary,
                                          [2, 4] if a.quick else [8, 32])
                            for b in a.backends.split(",")]
    doc["ttft_parts"] = [] if "parts" not in a.parts else [ttft_parts(model, b, 4 if a.quick else 10, 400, 40, 32,
                                                                      ordinary) for b in a.backends.split(",")]
    if a.device.startswith("cuda"):
        doc["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
