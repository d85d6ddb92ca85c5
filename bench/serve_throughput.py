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
]


def prompts(n: int) -> list[str]:
    from dlmtrt.evals.tasks import TASKS
    half = n // 2
    return [p.prompt for p in TASKS["sudoku4"].problems(half, 11)] + \
        [p.prompt for p in TASKS["countdown"].problems(n - half, 11)]


def start(model: str, dtype: str, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "-m", model, "--port", "0", "--threads",
                             str(threads), "--max-batch", str(max_batch), "--max-queue", "4096", "--dtype", dtype],
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


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {k: float(v) for k, v in re.findall(r"^(dlmtrt_\S+) (\S+)$", text, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu.json"))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server's worker")
    ap.add_argument("--only", default=None, help="run the workloads whose name contains this")
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
                servers[family, dtype] = start(f"tiny-{family}-tasks", dtype, a.threads, a.clients)
            url = servers[family, dtype][1]
            bodies = [{"prompt": p, **fields} for p in texts]
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
            r = rows[-1]
            print(f"{name:28s} seq {r['sequential_s']:7.2f} s  conc {r['concurrent_s']:6.2f} s  "
                  f"ratio {r['throughput_ratio']:5.2f}x  cohorts {r['cohorts_concurrent']}  same {same}/{len(bodies)}",
                  flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    doc = {"what": "dlmtrt serve throughput: concurrent clients vs one request at a time (CPU, tiny checkpoints)",
           "clients": a.clients, "server_threads": a.threads, "machine": platform.platform(),
           "python": platform.python_version(), "cpus": __import__("os").cpu_count(), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"dlmtrt serve, {a.clients} concurrent clients vs one at a time (CPU, {a.threads} thread)")
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
