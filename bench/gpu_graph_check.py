"""GPU check of the fast path (run on the device, bench/gpu_fastpath.sh): the torch-graph backend (in-place
cache, row buckets, CUDA graphs) decodes the same tokens as the eager torch backend, for every policy, on the
shipped tiny checkpoints; fp32 must be token-identical, bf16 within tolerance (the step logits' relative error
and the share of tokens that agree are reported). Writes JSON to --out."""
from __future__ import annotations

import json
import sys

import torch

from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.params import greedy_params

POLICIES = {"dream": ["none", "decode", "decode:shift=un_right", "prefill", "pd", "adaptive", "delayed",
                      "none+parallel", "decode+early"],
            "llada": ["none", "decode", "block", "dual", "adaptive", "delayed", "dual+parallel", "decode+early"]}
BLOCKS = {"dream": [None, 2], "llada": [2]}
PROMPTS = ["sudoku\n0120\n4231\n2000\n0040\n", "countdown 3 4 5 -> 17\n", "sudoku\n1000\n0200\n0030\n0004\n"]


def main(out: str) -> int:
    rows, bad = [], 0
    for dtype in ("float32", "bfloat16"):
        for fam in ("dream", "llada"):
            ref, tok, _ = make_backend("torch", f"tiny-{fam}-tasks", dtype=dtype, device="cuda")
            fast, _, _ = make_backend("torch-graph", f"tiny-{fam}-tasks", dtype=dtype, device="cuda")
            for blocks in BLOCKS[fam]:
                pols = POLICIES[fam] if blocks is None or fam == "llada" else ["none", "block", "dual", "dual+parallel"]
                for pol in pols:
                    p = greedy_params(fam, 20, blocks=blocks)
                    a = generate_text(ref, tok, PROMPTS, policy=pol, **p)
                    b = generate_text(fast, tok, PROMPTS, policy=pol, **p)
                    same = float((a.sequences == b.sequences).float().mean())
                    ok = same == 1.0 if dtype == "float32" else same >= 0.9
                    bad += not ok
                    rows.append(dict(dtype=dtype, family=fam, blocks=blocks, policy=pol, token_agreement=same,
                                     identical=bool(torch.equal(a.sequences, b.sequences)), ok=ok))
                    print(f"{dtype:8s} {fam:5s} blocks={blocks} {pol:24s} agreement {same:.3f} {'ok' if ok else 'FAIL'}")
            print(f"{fam} {dtype}: {fast.captures} graphs captured, {fast.replays} replays")
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "failed": bad},
              open(out, "w"), indent=1)
    print(f"{len(rows) - bad}/{len(rows)} passed")
    return 1 if bad else 0




def count_syncs(out: str) -> None:
    """Device read-backs per step of the loop with the graph backend (torch's sync debug mode warns at each)."""
    import warnings
    res = {}
    for fam, pol in (("dream", "decode"), ("dream", "dual"), ("llada", "decode"), ("llada", "dual+parallel")):
        be, tok, _ = make_backend("torch-graph", f"tiny-{fam}-tasks", dtype="bfloat16", device="cuda")
        p = greedy_params(fam, 20, blocks=None if fam == "dream" else 2)
        generate_text(be, tok, PROMPTS, policy=pol, **p)  # capture first
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            g = generate_text(be, tok, PROMPTS, policy=pol, **p)
            torch.cuda.set_sync_debug_mode("default")
        n = sum("synchroniz" in str(x.message) for x in w)
        res[f"{fam} {pol}"] = {"syncs": n, "steps": g.stats.steps, "per_step": n / g.stats.steps}
        print(f"syncs {fam} {pol}: {n} over {g.stats.steps} steps ({n / g.stats.steps:.2f} per step)")
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "graph_check.json"
    count_syncs(path.replace(".json", "-syncs.json"))
    sys.exit(main(path))
