"""Serving throughput on the CPU: 64 concurrent clients against the same 64 requests sent one at a time, through
`dlmtrt serve` (a subprocess, torch backend, one CPU thread) on the shipped tiny checkpoints.

    python -m bench.serve_throughput [--out bench/results/serve-cpu.json] [--clients 64] [--threads 1]

For each workload (family, policy, answer length, steps) the same greedy requests (task prompts: Sudoku and
Countdown) are answered twice: sequentially (one request in flight) and all at once (one client per request);
the answers must be identical, and the ratio of the wall times is the batching gain. The figures depend on
the machine and on what else runs on it (the README's table is from a 2-core machine shared with other jobs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]

# (name, family, server dtype, request fields): greedy decoding, so that requests share cohorts
WORKLOADS = [
    ("llada none", "llada", "float32", dict(max_tokens=32, steps=32, block_length=32, policy="none")),
    ("llada dual, blocks of 8", "llada", "float32", dict(max_tokens=32, steps=32, block_length=8, policy="dual")),
    ("llada dual, blocks of 8, bf16", "llada", "bfloat16",
     dict(max_tokens=32, steps=32, block_length=8, policy="dual")),
    ("dream none", "dream", "float32", dict(max_tokens=32, steps=32, temperature=0.0, alg="entropy", policy="none")),
    ("dream decode", "dream", "float32",
     dict(max_tokens=32, steps=32, temperature=0.0, alg="entropy", policy="decode")),
    ("dream decode, bf16", "dream", "bfloat16",
     dict(max_tokens=32, steps=32, temperature=0.0, alg="entropy", policy="decode")),
    # sampling (Dream's defaults: temperature 1, alg origin), one seed per request: batched, each request with its
    # own generator (runtime/row_rng.py), so its draws are those it makes alone
    ("dream sampled, seed each", "dream", "float32", dict(max_tokens=32, steps=32, policy="none", seed="each")),
]


def prompts(n: int) -> list[str]:
    from dlmtrt.evals.tasks import TASKS
    half = n // 2
    return [p.prompt for p in TASKS["sudoku4"].problems(half, 11)] + \
        [p.prompt for p in TASKS["countdown"].problems(n - half, 11)]


def start(model: str, dtype: str, threads: int, max_batch: int, device: str, backend: str,
          cohorts: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "-m", model, "--port", "0", "--threads",
                             str(threads), "--max-batch", str(max_batch), "--max-queue", "4096", "--dtype", dtype,
                             "--device", device, "--backend", backend, "--max-cohorts", str(cohorts)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1)
    raise RuntimeError(f"{model}: the server did not start")


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, float, dict]:
    t = time.perf_counter()
    r = await client.post(url + "/v1/completions", json=body)
    r.raise_for_status()
    d = r.json()
    return d["choices"][0]["text"], time.perf_counter() - t, d["dlmtrt"][0]


async def sequential(url: str, bodies: list[dict]):
    async with httpx.AsyncClient(timeout=600) as c:
        t = time.perf_counter()
        res = [await one(c, url, b) for b in bodies]
        return res, time.perf_counter() - t


async def concurrent(url: str, bodies: list[dict]):
    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=len(bodies) + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        t = time.perf_counter()
        res = await asyncio.gather(*(one(c, url, b) for b in bodies))
        return res, time.perf_counter() - t


def verify(family: str, dtype: str, device: str, bodies: list[dict], answers: list[str]) -> int:
    """How many answers equal `generate_text` for the same prompt, parameters and seed, one request at a time
    (as `dlmtrt generate` runs it)."""
    import torch

    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.params import family_params
    be, tok, src = make_backend("torch", f"tiny-{family}-tasks", dtype=dtype, device=device)
    same = 0
    for b, ans in zip(bodies, answers):
        f = dict(b)
        prompt, policy, seed = f.pop("prompt"), f.pop("policy", "none"), f.pop("seed", 0)
        f["max_new_tokens"] = f.pop("max_tokens")
        torch.manual_seed(seed)
        res = generate_text(be, tok, [prompt], policy=policy, max_positions=src.args.max_position_embeddings,
                            **family_params(family, src.path, **f))
        same += res.texts[0] == ans
    return same


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {k: float(v) for k, v in re.findall(r"^(dlmtrt_\S+) (\S+)$", text, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu.json"))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker")
    ap.add_argument("--only", default=None, help="run the workloads whose name contains this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="torch", choices=["torch", "torch-graph"])
    ap.add_argument("--max-cohorts", type=int, default=128,
                    help="the server's --max-cohorts (sampling requests need one cohort each)")
    ap.add_argument("--verify", action="store_true",
                    help="also compare every answer with generate_text run here, request by request")
    a = ap.parse_args()
    texts = prompts(a.clients)
    rows = []
    servers: dict[str, tuple] = {}
    try:
        for name, family, dtype, fields in WORKLOADS:
            if a.only and a.only not in name:
                continue
            if (family, dtype) not in servers:
                for proc, _ in servers.values():  # one server at a time: they would share the CPU
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(60)
                servers.clear()
                servers[family, dtype] = start(f"tiny-{family}-tasks", dtype, a.threads, a.clients, a.device,
                                               a.backend, a.max_cohorts)
            url = servers[family, dtype][1]
            bodies = [{"prompt": p, **fields} for p in texts]
            for k, b in enumerate(bodies):
                if b.get("seed") == "each":
                    b["seed"] = k
            asyncio.run(sequential(url, bodies[:2]))  # warm-up
            seq, seq_s = asyncio.run(sequential(url, bodies))
            m0 = metrics(url)
            con, con_s = asyncio.run(concurrent(url, bodies))
            m1 = metrics(url)
            same = sum(x[0] == y[0] for x, y in zip(seq, con))
            tokens = sum(x[2]["params"].get("max_new_tokens") or x[2]["params"]["gen_length"] for x in seq)
            cohorts = m1["dlmtrt_cohort_size_count"] - m0["dlmtrt_cohort_size_count"]
            rows.append({
                "workload": name, "family": family, "dtype": dtype, "request": fields, "requests": len(bodies),
                "sequential_s": round(seq_s, 3), "concurrent_s": round(con_s, 3),
                "sequential_req_per_s": round(len(bodies) / seq_s, 2), "concurrent_req_per_s": round(len(bodies) / con_s, 2),
                "sequential_canvas_tok_per_s": round(tokens / seq_s, 1),
                "concurrent_canvas_tok_per_s": round(tokens / con_s, 1),
                "throughput_ratio": round(seq_s / con_s, 2),
                "latency_sequential_p50_s": round(statistics.median(x[1] for x in seq), 4),
                "latency_concurrent_p50_s": round(statistics.median(x[1] for x in con), 4),
                "latency_concurrent_max_s": round(max(x[1] for x in con), 4),
                "cohorts_concurrent": int(cohorts), "identical_answers": same,
                "rows_fraction": round(seq[0][2]["rows_computed"] / seq[0][2]["rows_full"], 3),
            })
            if a.verify:
                rows[-1]["equal_to_generate_text"] = verify(family, dtype, a.device, bodies, [x[0] for x in seq])
            r = rows[-1]
            print(f"{name:28s} " + (f"generate_text-equal {r['equal_to_generate_text']}/{len(bodies)} "
                                    if a.verify else "") + f"seq {r['sequential_s']:7.2f} s  conc {r['concurrent_s']:6.2f} s  "
                  f"ratio {r['throughput_ratio']:5.2f}x  cohorts {r['cohorts_concurrent']}  same {same}/{len(bodies)}",
                  flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    doc = {"what": "dlmtrt serve throughput: concurrent clients vs one request at a time (tiny checkpoints)",
           "clients": a.clients, "server_threads": a.threads, "device": a.device, "backend": a.backend,
           "max_cohorts": a.max_cohorts, "machine": platform.platform(),
           "python": platform.python_version(), "cpus": __import__("os").cpu_count(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"dlmtrt serve, {a.clients} concurrent clients vs one at a time ({a.device}, {a.backend}, "
                    f"{a.threads} thread)")
    for col in ("workload", "rows/full", "one at a time", "concurrent", "req/s 1 -> N", "ratio", "cohorts",
                "p50 latency 1 / N", "same answers"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["workload"], f"{r['rows_fraction']:.2f}", f"{r['sequential_s']:.2f} s", f"{r['concurrent_s']:.2f} s",
                  f"{r['sequential_req_per_s']:.1f} -> {r['concurrent_req_per_s']:.1f}",
                  f"{r['throughput_ratio']:.2f}x", str(r["cohorts_concurrent"]),
                  f"{r['latency_sequential_p50_s']:.3f} / {r['latency_concurrent_p50_s']:.3f} s",
                  f"{r['identical_answers']}/{r['requests']}")
    Console(width=160).print(t)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
