"""Markdown tables of `bench/gpu_attention.py`'s JSON (docs/results/attention-kernel.md):
`python3 -m bench.attention_table RESULT.json [FLEX.json]`. Ratios are kernel time over SDPA's (or flex's)."""
from __future__ import annotations

import json
import sys


def bidirectional(rows: list[dict]) -> str:
    bi = [r for r in rows if r["kind"] == "bidirectional"]
    As = sorted({r["A"] for r in bi})
    out = ["| B, L | " + " | ".join(f"A={a}" for a in As) + " |", "| --- |" + " --- |" * len(As)]
    for B, L in sorted({(r["B"], r["L"]) for r in bi}, key=lambda x: (x[1], x[0])):
        cells = []
        for a in As:
            r = next((r for r in bi if (r["B"], r["L"], r["A"]) == (B, L, a)), None)
            if r is None:
                cells.append("-")
                continue
            x = r["kernel_over_sdpa"]
            cells.append(f"{r['kernel_us']:.0f}/{r['sdpa_us']:.0f} " + (f"**{x:.2f}x**" if x <= 1 else f"{x:.2f}x")
                         + (f", {r['kernel_tflops']:.0f} TF" if a >= 256 else ""))
        out.append(f"| B={B}, L={L} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def block_causal(rows: list[dict]) -> str:
    bc = [r for r in rows if r["kind"] != "bidirectional"]
    out = ["| kind | B | A | L | kernel µs | SDPA µs (masked) | kernel/SDPA | flex µs | kernel/flex |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in bc:
        flex = f"{r['flex_us']:.0f} | {r['kernel_over_flex']:.2f}x" if "flex_us" in r else "- | -"
        out.append(f"| {r['kind']} | {r['B']} | {r['A']} | {r['L']} | {r['kernel_us']:.0f} | {r['sdpa_us']:.0f} | "
                   f"{r['kernel_over_sdpa']:.2f}x | {flex} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    d = json.load(open(argv[0]))
    print(bidirectional(d["speed"]))
    print()
    print(block_causal(json.load(open(argv[1]))["speed"] if len(argv) > 1 else d["speed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
