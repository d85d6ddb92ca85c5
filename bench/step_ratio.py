"""The fp8 / bf16 one-row step ratio with every model resident and compiled in one process, timed in alternating
rounds (`python3 bench/step_ratio.py OUT.json [ROUNDS]` on the device; SHAPE, default dream-7b).

Why: the issue's speed goal is a ratio "measured in the same run", and `bench` measures its variants one after
the other, minutes apart, so clock and memory-temperature drift between them lands in the ratio (the bf16 step
moved from 4.86 to 5.22 ms between machines). Here bf16, fp8 and fp8 with the head quantised are built and
compiled first, then each round times every variant back to back (30 steps each, order rotated per round), and
the ratio is taken per round; the median over rounds is the figure. VARIANTS (comma-separated, default
bf16,fp8,fp8+head) picks the models; `+keepN` leaves the N most sensitive blocks in bf16 (`--keep-blocks N`);
bf16 is always measured, as the baseline. The weight-read floor of each model (its weight bytes over the
device's copy bandwidth, measured first in the same process, as `bench` does) is reported beside its step.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlmtrt.evals.speed import copy_bandwidth, quantize_random, random_model, shape_args, step_ms  # noqa: E402
from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend  # noqa: E402


def variants(spec: str) -> list[tuple[str, str | None, bool, int]]:
    """(name, format, head, kept blocks) for each name in `spec`; bf16 first."""
    out = [("bf16", None, False, 0)]
    for name in spec.split(","):
        name = name.strip()
        if name in ("", "bf16"):
            continue
        parts = name.split("+")
        if parts[0] != "fp8" or any(p != "head" and not (p.startswith("keep") and p[4:].isdigit()) for p in parts[1:]):
            raise SystemExit(f"unknown variant {name!r}: use fp8 with +head and/or +keepN, e.g. fp8+head+keep2")
        keep = next((int(p[4:]) for p in parts[1:] if p.startswith("keep")), 0)
        out.append((name, "fp8", "head" in parts[1:], keep))
    return out


def main(out: str, rounds: int = 7) -> dict:
    shape = os.environ.get("SHAPE", "dream-7b")
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    args = shape_args(shape)
    L = 768 if shape.endswith("7b") or shape.endswith("8b") else 48
    doc = {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__, "shape": shape,
           "length": L, "rounds": rounds, "ms": {}, "weight_bytes": {}}
    bw = copy_bandwidth(dev)
    doc["copy_bandwidth_Bps"] = bw
    bes = {}
    chosen = variants(os.environ.get("VARIANTS", "bf16,fp8,fp8+head"))
    for name, quant, head, keep in chosen:
        model = random_model(args, dev, dtype)
        if quant is not None:
            quantize_random(model, quant, L, head=head, keep_blocks=keep)
        doc["weight_bytes"][name] = sum(p.numel() * p.element_size() for p in model.parameters())
        bes[name] = TorchGraphBackend(model, compile=cuda)
        first = step_ms(bes[name], 1, 1, L, repeats=3)  # compiles and captures
        print(f"{name}: built, first steps {first:.2f} ms", flush=True)
    names = [v[0] for v in chosen]
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            doc["ms"].setdefault(name, []).append(step_ms(bes[name], 1, 1, L, repeats=30))
        print(f"round {r}: " + ", ".join(f"{n} {doc['ms'][n][-1]:.3f} ms" for n in names), flush=True)
        Path(out).write_text(json.dumps(doc, indent=1))
    base = doc["ms"]["bf16"]
    doc["median_ms"] = {n: statistics.median(doc["ms"][n]) for n in names}
    doc["ratio_per_round"] = {n: [a / b for a, b in zip(doc["ms"][n], base)] for n in names[1:]}
    doc["median_ratio"] = {n: statistics.median(v) for n, v in doc["ratio_per_round"].items()}
    doc["floor_ms"] = {n: doc["weight_bytes"][n] / bw * 1e3 for n in names}
    doc["median_over_floor"] = {n: doc["median_ms"][n] / doc["floor_ms"][n] for n in names}
    for n in names:
        print(f"{n}: median {doc['median_ms'][n]:.3f} ms, floor {doc['floor_ms'][n]:.3f} ms "
              f"({doc['median_over_floor'][n]:.2f}x floor)", flush=True)
    for n, v in doc["ratio_per_round"].items():
        print(f"{n} / bf16: median {doc['median_ratio'][n]:.3f} (rounds {min(v):.3f}-{max(v):.3f})", flush=True)
    Path(out).write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 7)
