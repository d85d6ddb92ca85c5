"""Peak resident memory of loading a ~1B-parameter bf16 checkpoint into bfloat16 and into float32.

The loader promises that peak RSS stays near the bytes of the loaded weights (a bf16 model is never
materialised in fp32 first, and the shards' pages do not pile up on top). This measures it: a random
checkpoint with Dream's layout is written to a temp dir, then each case is loaded in a fresh interpreter
(so nothing else is resident) with `open_checkpoint` + `load_weights` (the tokenizer is not needed).

Peak is the kernel's high-water mark (VmHWM, equal to ru_maxrss) of that interpreter after loading *and
then reading every weight once*, as the first forward pass will: weights that are merely mmapped views of
the shards would otherwise look free at load time and become resident later. Baseline is the RSS after
`import torch` and the loader, just before loading. A sampler thread (`evals.memory.RssSampler`) also
records which part of RSS was anonymous memory (our tensors) and which was file pages (mmapped shards) at
the sampled peak.
The parent process imports no torch, so it cannot inflate its children's ru_maxrss through fork/exec.

    python -m bench.load_memory            # ~2 GB on disk, ~5 GB of RAM, a few minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dlmtrt.evals.memory import RssSampler, proc_status

RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"
SIZES = dict(hidden_size=2048, intermediate_size=5632, num_heads=16, num_kv_heads=2, head_dim=128, vocab_size=152064)
MiB = 2 ** 20


def make(out: Path, layers: int, shard_bytes: int) -> dict:
    """Write the random bf16 checkpoint. random_state_dict draws each tensor in fp32 and casts it at once,
    so only one bf16 copy of the model (plus one fp32 tensor) is ever held; save_file writes from it in place."""
    import torch

    from dlmtrt.models.tiny import random_state_dict, save_checkpoint, shaped_like
    args = shaped_like("dream-7b", num_layers=layers, max_position_embeddings=32768, **SIZES)
    t0 = time.perf_counter()
    sd = random_state_dict(args, seed=0, dtype=torch.bfloat16)
    save_checkpoint(out, args, sd, tokenizer=None, max_shard_bytes=shard_bytes)
    return {"params": args.param_count, "make_s": time.perf_counter() - t0,
            "make_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(path: Path, dtype: str) -> dict:
    """Load once in this (fresh) process and report memory and time."""
    import torch

    from dlmtrt.dtypes import DTYPES
    from dlmtrt.models.loading import load_weights, open_checkpoint
    base = proc_status()
    sampler = RssSampler(period_s=0.002, stage="load")  # the anon/file split of the sampled peak
    sampler.start()
    t0 = time.perf_counter()
    ck = open_checkpoint(str(path))
    model = load_weights(ck, DTYPES[dtype], torch.device("cpu"))
    load_s = time.perf_counter() - t0
    after_load = proc_status()
    params = list(model.parameters())
    assert all(p.dtype == DTYPES[dtype] for p in params)
    t0 = time.perf_counter()
    checksum = sum(float(p.sum()) for p in params)  # what a first forward pass does: read every weight once
    touch_s = time.perf_counter() - t0
    sampled = sampler.finish()["load"]
    end = proc_status()
    return {
        "dtype": dtype, "load_s": load_s, "touch_s": touch_s, "checksum": checksum,
        "baseline_rss": base["VmRSS"], "baseline_hwm": base["VmHWM"],
        "rss_after_load": after_load["VmRSS"], "peak_during_load": after_load["VmHWM"],
        "disk_bytes": sum(f.stat().st_size for f in ck.weight_files), "shards": len(ck.weight_files),
        "loaded_bytes": sum(p.numel() * p.element_size() for p in params),
        "peak_rss": end["VmHWM"], "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "end_rss": end["VmRSS"], "end_rss_file": end["RssFile"],
        "sampled_peak_anon": sampled["anon_at_max"], "sampled_peak_file": sampled["file_at_max"],
        "sampled_max_file": sampled["max_file"],
    }


def child(*argv: str) -> dict:
    """Run this module in a fresh interpreter; its last stdout line is the JSON result."""
    r = subprocess.run([sys.executable, "-m", "bench.load_memory", *argv], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    if r.returncode:
        raise SystemExit(f"child {argv} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(ck: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"Loading a {ck['params'] / 1e9:.3f}B-param bf16 checkpoint ({rows[0]['shards']} shards), CPU")
    cols = ("dtype", "disk MiB", "loaded MiB", "baseline MiB", "RSS after load MiB", "peak MiB", "peak-base MiB",
            "(peak-base)/loaded", "file pages @peak MiB", "load s", "touch s")
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["dtype"], *(f"{r[k] / MiB:.0f}" for k in ("disk_bytes", "loaded_bytes", "baseline_rss",
                                                              "rss_after_load", "peak_rss", "peak_minus_baseline")),
                  f"{r['ratio']:.3f}", f"{r['sampled_peak_file'] / MiB:.0f}", f"{r['load_s']:.1f}",
                  f"{r['touch_s']:.1f}")
    Console(width=200).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=9, help="9 layers of these sizes give 1.019e9 parameters")
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--tmp", default=None, help="parent of the temp checkpoint dir (default: system temp)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:
        return print(json.dumps(make(a.make, a.layers, a.shard_mb * 10 ** 6)))
    if a.measure:
        return print(json.dumps(measure(a.measure, a.dtype)))

    tmp = Path(tempfile.mkdtemp(prefix="load_memory.", dir=a.tmp))
    try:
        ck = child("--make", str(tmp / "ckpt"), "--layers", str(a.layers), "--shard-mb", str(a.shard_mb))
        rows = [child("--measure", str(tmp / "ckpt"), "--dtype", dt) for dt in ("bfloat16", "float32")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["peak_minus_baseline"] = r["peak_rss"] - r["baseline_rss"]
        r["ratio"] = r["peak_minus_baseline"] / r["loaded_bytes"]
    report(ck, rows)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m bench.load_memory " + " ".join(sys.argv[1:]), "checkpoint": ck, "sizes": SIZES,
            "layers": a.layers, "shard_mb": a.shard_mb, "cpus": os.cpu_count(),
            "ratio": "(peak_rss - baseline_rss) / loaded_bytes; peak_rss = VmHWM of the loading process"}
    a.out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
