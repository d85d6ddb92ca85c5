"""BiCache's serving throughput at LLaDA-8B shape on a GPU (issue 29's goal), random bf16 weights. One device call:

    python3 -m bench.bicache_throughput --out OUT.json [--requests 16] [--in-flight 8]

The shared-system-prompt workload: a 400-token prefix shared by every request, a different 40-token question
each, 256 new tokens in 128 steps (LLaDA's plain generation in one block, as the authors' `LLaDAEngine`),
greedy, through the server's `Scheduler` in this process (its worker, cohorts of one BiCache depth and the
BiCache store that `dlmtrt serve --prefix-cache-mb` runs; bench/serve_gpu.py says why in process). Each request
is a chat whose shared prefix ends at token 400, as `chat_prefix` would cut it.

Rows: no reuse, then BiCache with the refresh interval of the authors' run script (16) at the depth the tiny
trained LLaDA's profile picks for this workload's ratio (dlmtrt/checkpoints/tiny-llada-tasks/bicache.json),
taken as a fraction of its layers, and at b = L/4, L/2, 3L/4 and L (random weights cannot profile a meaningful
depth). For each: requests/s with `in_flight` requests outstanding, its ratio to no reuse, median time to first
token (submit to the first canvas event, sent after the first step) and median request time. Before the first
timed run the batch shape is warmed on another prefix; before each BiCache run one request fills the store with
the workload's prefix (the steady state of a server whose system prompt earlier traffic stored). `rows` count
canvas rows computed in the first layer; BiCache's deep layers also recompute the prefix at refresh steps. The torch backend serves both (BiCache
needs deep rows, which torch-graph does not take), so the ratio compares like with like.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_gpu import Client, word_tokenizer  # noqa: E402
from dlmtrt.evals.speed import random_model, shape_args  # noqa: E402
from dlmtrt.runtime.bicache import BiCacheStore, DepthTable, prefix_ratio  # noqa: E402
from dlmtrt.runtime.bicache_table import read_table  # noqa: E402
from dlmtrt.runtime.families.llada import FAMILY as LLADA, LLaDAParams  # noqa: E402
from dlmtrt.serve.reuse import BiCacheServing  # noqa: E402
from dlmtrt.serve.scheduler import Scheduler  # noqa: E402

PROFILE = ROOT / "dlmtrt" / "checkpoints" / "tiny-llada-tasks" / "bicache.json"


def profiled_depth(prefix: int, prompt: int, answer: int, layers: int, profile: Path = PROFILE) -> tuple[int, dict]:
    """The tiny model's profiled depth (its table `profile`) for this workload's ratio, scaled to `layers`."""
    tiny_layers = json.loads(Path(profile).read_text())["layers"]
    table, _ = read_table(profile, tiny_layers)
    ratio = prefix_ratio(prefix, prompt + answer)
    d = table.serving_depth(ratio, tiny_layers)
    return round(layers * d / tiny_layers), dict(table_file=str(profile), ratio=ratio, tiny_depth=d, tiny_layers=tiny_layers,
                                                 table={str(r): b for r, b in table.depths})


def run(model, tok, depth: int | None, prompts, warm, params, in_flight: int, prefix: int, interval: int) -> dict:
    """One row: requests/s, TTFT and request time with `in_flight` outstanding; depth None = no reuse. `warm`
    (None: already warm) are run first at the timed batch size."""
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    be = TorchBackend(model)
    L = model.args.num_layers
    serving = None
    if depth is not None:
        store = BiCacheStore(max_tokens=4 * prefix)
        serving = BiCacheServing(store, DepthTable.of({0: depth}), interval, L)
    sched = Scheduler(be, tok, "llada", max_positions=model.args.max_position_embeddings, max_batch=in_flight,
                      max_queue=4096, max_cohorts=1, bicache=serving)
    sched.start()
    client = Client(sched)
    fields = lambda: dict(prefix_len=prefix, depth=depth) if depth else {}  # noqa: E731
    try:
        if warm:
            client.run(warm[:in_flight], params, "none", in_flight, canvas=True, family=LLADA, **fields())
        if depth:
            client.run(prompts[-1:], params, "none", 1, canvas=True, family=LLADA, **fields())  # fills the store
        t = time.perf_counter()
        res = client.run(prompts[:-1], params, "none", in_flight, canvas=True, family=LLADA, **fields())
        wall = time.perf_counter() - t
    finally:
        sched.stop(120)
    info = [x[3]["dlmtrt"] for x in res]
    row = dict(depth=depth, requests=len(res), in_flight=in_flight, wall_s=round(wall, 3),
               req_per_s=round(len(res) / wall, 4),
               ttft_ms=round(1e3 * statistics.median(x[1] - x[0] for x in res), 1),
               request_ms=round(1e3 * statistics.median(x[2] - x[0] for x in res), 1),
               rows_computed=statistics.median(i["rows_computed"] for i in info),
               rows_full=statistics.median(i["rows_full"] for i in info))
    if serving is not None:
        st = serving.store.stats
        row.update(store_hits=st.hits, store_misses=st.misses,
                   depths=sorted({i.get("bicache_depth", 0) for i in info}))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llada-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=400)
    ap.add_argument("--question", type=int, default=40)
    ap.add_argument("--answer", type=int, default=256)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--interval", type=int, default=16)
    ap.add_argument("--depths", default="profile,L/4,L/2,3L/4,L",
                    help="BiCache depths after the no-reuse row: 'profile', fractions of L, or layer counts.")
    ap.add_argument("--table", type=Path, default=PROFILE,
                    help="The tiny model's bicache.json whose depth 'profile' scales [default: tiny-llada-tasks'].")
    a = ap.parse_args()
    from dlmtrt.paths import check_output_file
    check_output_file(a.out)
    args = shape_args(a.shape)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    L = args.num_layers
    prof_b, prof = profiled_depth(a.prefix, a.prefix + a.question, a.answer, L, a.table)
    depths = []
    for d in a.depths.split(","):
        if d == "profile":
            depths.append(("profile", prof_b))
        elif "L" in d:
            num, _, den = d.partition("/")
            depths.append((d, round(L * float(num.replace("L", "") or 1) / float(den or 1))))
        else:
            depths.append((d, int(d)))
    t0 = time.perf_counter()
    model = random_model(args, a.device, dtype).eval()
    tok = word_tokenizer(args.vocab_size, args.eos_token_id)
    g = torch.Generator().manual_seed(1)
    vocab = min(args.vocab_size, args.mask_token_id)  # ids below the mask id: never a mask
    system = torch.randint(0, vocab, (a.prefix,), generator=g).tolist()
    other = torch.randint(0, vocab, (a.prefix,), generator=g).tolist()
    prompts = [system + torch.randint(0, vocab, (a.question,), generator=g).tolist() for _ in range(a.requests + 1)]
    warm = [other + torch.randint(0, vocab, (a.question,), generator=g).tolist() for _ in range(a.in_flight)]
    params = LLaDAParams(gen_length=a.answer, steps=a.steps, block_length=a.answer).validate().to_dict()
    rows = []
    for label, b in [("no reuse", None)] + depths:
        r = run(model, tok, b, prompts, None if rows else warm, params, a.in_flight, a.prefix, a.interval)
        r["label"] = label if b is None else f"BiCache b={b} ({label})"
        r["ratio"] = round(r["req_per_s"] / rows[0]["req_per_s"], 3) if rows else 1.0
        rows.append(r)
        print(f"{r['label']:28s} {r['req_per_s']:7.3f} req/s x{r['ratio']:.2f}  TTFT {r['ttft_ms']:8.1f} ms  "
              f"request {r['request_ms']:8.1f} ms  rows {r['rows_computed']}/{r['rows_full']}", flush=True)
        write(a, rows, prof, prof_b, L, dtype, t0, done=len(rows) == len(depths) + 1)
    print(f"results: {a.out}")


def write(a, rows: list[dict], prof: dict, prof_b: int, L: int, dtype, t0: float, done: bool) -> None:
    """The results so far, rewritten after every row (`complete` false until the last)."""
    from dlmtrt.paths import write_text_atomic
    doc = dict(shape=a.shape, gpu=torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
               torch=torch.__version__, dtype=str(dtype).removeprefix("torch."), backend="torch", layers=L,
               workload=dict(prefix=a.prefix, question=a.question, answer=a.answer, steps=a.steps,
                             interval=a.interval, requests=a.requests, in_flight=a.in_flight),
               profile=dict(prof, depth_at_shape=prof_b), rows=rows, seconds=round(time.perf_counter() - t0, 1),
               complete=done, command="python3 -m bench.bicache_throughput " + " ".join(sys.argv[1:]))
    write_text_atomic(a.out, json.dumps(doc, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
