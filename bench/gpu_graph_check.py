"""GPU check of the fast path (run on the device, bench/gpu_fastpath.sh): the torch-graph backend (in-place
cache, row buckets, CUDA graphs) decodes the same tokens as the eager torch backend, for every policy, on the
shipped tiny checkpoints and a tiny random SDAR (block-causal, the append-only cache); fp32 must be token-identical, bf16 within tolerance (the step logits' relative error
and the share of tokens that agree are reported). Writes JSON to argv[1]. COMPILE=1 checks the graph backend
with `torch.compile` instead (the compiled in-place K/V write). FAMILIES=sdar (a comma list) checks only those
families' cases and read-backs."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.params import greedy_params

POLICIES = {"dream": ["none", "decode", "decode:shift=un_right", "prefill", "pd", "adaptive", "delayed",
                      "none+parallel", "decode+early"],
            "llada": ["none", "decode", "block", "dual", "adaptive", "delayed", "dual+parallel", "decode+early"]}
BLOCKS = {"dream": [None, 2], "llada": [2]}
SDAR = [dict(block_length=4, denoising_steps=4, remasking="low_confidence_static"),
        dict(block_length=8, denoising_steps=4, remasking="low_confidence_dynamic"),
        dict(block_length=4, denoising_steps=2, remasking="sequential")]
FAMILIES = os.environ.get("FAMILIES", "dream,llada,sdar").split(",")
PROMPTS = ["sudoku\n0120\n4231\n2000\n0040\n", "countdown 3 4 5 -> 17\n", "sudoku\n1000\n0200\n0030\n0004\n"]


def agree(ref, fast, tok, pol: str, params: dict, dtype: str) -> tuple[float, bool, bool]:
    """(token agreement, identical, within tolerance) of the graph backend against eager on PROMPTS: fp32 must be
    token-identical, bf16 agree on at least 90% of the tokens."""
    a = generate_text(ref, tok, PROMPTS, policy=pol, **params)
    b = generate_text(fast, tok, PROMPTS, policy=pol, **params)
    same = (a.sequences == b.sequences).double().mean().item()
    identical = bool(torch.equal(a.sequences, b.sequences))
    return same, identical, identical if dtype == "float32" else same >= 0.9


def main(out: str) -> int:
    rows, bad = [], 0
    for dtype in ("float32", "bfloat16"):
        for fam in [f for f in ("dream", "llada") if f in FAMILIES]:
            ref, tok, _ = make_backend("torch", f"tiny-{fam}-tasks", dtype=dtype, device="cuda")
            if os.environ.get("COMPILE") == "1":
                from dlmtrt.models.loading import load
                from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
                fast = TorchGraphBackend(load(f"tiny-{fam}-tasks", dtype=dtype, device="cuda")[0], compile=True)
            else:
                fast, _, _ = make_backend("torch-graph", f"tiny-{fam}-tasks", dtype=dtype, device="cuda")
            for blocks in BLOCKS[fam]:
                pols = POLICIES[fam] if blocks is None or fam == "llada" else ["none", "block", "dual", "dual+parallel"]
                for pol in pols:
                    p = greedy_params(fam, 20, blocks=blocks)
                    same, identical, ok = agree(ref, fast, tok, pol, p, dtype)
                    bad += not ok
                    rows.append(dict(dtype=dtype, family=fam, blocks=blocks, policy=pol, token_agreement=same,
                                     identical=identical, ok=ok))
                    print(f"{dtype:8s} {fam:5s} blocks={blocks} {pol:24s} agreement {same:.3f} {'ok' if ok else 'FAIL'}")
            print(f"{fam} {dtype}: {fast.captures} graphs captured, {fast.replays} replays")
        if "sdar" in FAMILIES:
            bad += check_sdar(dtype, rows)
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "failed": bad,
               "compile": os.environ.get("COMPILE") == "1"},
              open(out, "w"), indent=1)
    print(f"{len(rows) - bad}/{len(rows)} passed")
    return 1 if bad else 0


def sdar_checkpoint() -> str:
    from dlmtrt.models.tiny import make_tiny
    global _SDAR
    if "_SDAR" not in globals():
        _SDAR = str(make_tiny("sdar", os.path.join(tempfile.mkdtemp(), "tiny-sdar"), seed=3))
    return _SDAR


def check_sdar(dtype: str, rows: list) -> int:
    """SDAR's block steps on the graph backend (graphs per row bucket over the in-place cache) against eager,
    with both the append-only cache and no cache."""
    from dlmtrt.runtime.params import family_params
    ckpt, bad = sdar_checkpoint(), 0
    ref, tok, _ = make_backend("torch", ckpt, dtype=dtype, device="cuda")
    fast, _, _ = make_backend("torch-graph", ckpt, dtype=dtype, device="cuda")
    for kw in SDAR:
        for pol in ("append", "none"):
            p = family_params("sdar", ckpt, max_new_tokens=24, top_k=1, **kw)
            same, identical, ok = agree(ref, fast, tok, pol, p, dtype)
            bad += not ok
            rows.append(dict(dtype=dtype, family="sdar", blocks=kw["block_length"], policy=pol,
                             remasking=kw["remasking"], token_agreement=same, identical=identical, ok=ok))
            print(f"{dtype:8s} sdar  block={kw['block_length']} {kw['remasking']:22s} {pol:6s} "
                  f"agreement {same:.3f} {'ok' if ok else 'FAIL'}")
    print(f"sdar {dtype}: {fast.captures} graphs captured, {fast.replays} replays")
    return bad


def count_syncs(out: str) -> int:
    """Device read-backs per step of the loop with the graph backend (torch's sync debug mode warns at each).
    A generation also reads back a fixed few at its start and end (tokenising, the answer's length, the final
    text), so the per-step figure is the difference between a 32- and a 16-step generation over 16 steps:
    it must be at most 1 for the deterministic schedules. Parallel decoding reads back per sequence by design."""
    import warnings
    res, bad = {}, 0

    def syncs(be, tok, fam, pol, n):
        p = greedy_params(fam, n, blocks=None if fam == "dream" and pol in ("none", "decode") else 2)
        generate_text(be, tok, PROMPTS, policy=pol, **p)  # capture first
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            g = generate_text(be, tok, PROMPTS, policy=pol, **p)
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(x.message) for x in w), g.stats.steps

    for fam, pol in [(f, p) for f, p in (("dream", "none"), ("dream", "decode"), ("dream", "dual"), ("llada", "decode"),
                                         ("llada", "dual"), ("llada", "dual+parallel")) if f in FAMILIES]:
        be, tok, _ = make_backend("torch-graph", f"tiny-{fam}-tasks", dtype="bfloat16", device="cuda")
        (n16, s16), (n32, s32) = syncs(be, tok, fam, pol, 16), syncs(be, tok, fam, pol, 32)
        per = (n32 - n16) / max(s32 - s16, 1)
        ok = per <= 1.0 or "parallel" in pol
        bad += not ok
        res[f"{fam} {pol}"] = {"syncs_16": n16, "steps_16": s16, "syncs_32": n32, "steps_32": s32, "per_step": per,
                               "ok": ok}
        print(f"syncs {fam:5s} {pol:14s}: {n16} in {s16} steps, {n32} in {s32} steps -> {per:.2f} per step "
              f"{'ok' if ok else 'FAIL'}")
    # SDAR: the host predicts static/sequential blocks (a read-back for the rule and one for the row count where
    # a block ends: 2 per block of 4 steps, for each distinct block end of the batch's prompts: their tails differ);
    # the dynamic threshold reads back both at every step
    one = PROMPTS[:1]
    for remasking, prompts, limit in (("low_confidence_static", one, 0.5), ("sequential", one, 0.5),
                                      ("low_confidence_static", PROMPTS, 0.5 * len(PROMPTS)),
                                      ("low_confidence_dynamic", PROMPTS, 2.0)):
        if "sdar" not in FAMILIES:
            break
        be, tok, _ = make_backend("torch-graph", sdar_checkpoint(), dtype="bfloat16", device="cuda")

        def sdar_syncs(n):
            from dlmtrt.runtime.params import family_params
            p = family_params("sdar", sdar_checkpoint(), max_new_tokens=n, top_k=1, block_length=4,
                              denoising_steps=4, remasking=remasking)
            generate_text(be, tok, prompts, policy="append", **p)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                g = generate_text(be, tok, prompts, policy="append", **p)
                torch.cuda.set_sync_debug_mode("default")
            return sum("synchroniz" in str(x.message) for x in w), g.stats.steps
        (n16, s16), (n32, s32) = sdar_syncs(16), sdar_syncs(32)
        per = (n32 - n16) / max(s32 - s16, 1)
        ok = per <= limit
        bad += not ok
        res[f"sdar append {remasking} x{len(prompts)}"] = {"syncs_16": n16, "steps_16": s16, "syncs_32": n32, "steps_32": s32,
                                           "per_step": per, "limit": limit, "ok": ok}
        print(f"syncs sdar  append {remasking} x{len(prompts)}: {n16} in {s16} steps, {n32} in {s32} steps -> {per:.2f} per step "
              f"{'ok' if ok else 'FAIL'}")
    json.dump(res, open(out, "w"), indent=1)
    return bad


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else "graph_check.json"
    bad = main(path)
    sys.exit(count_syncs(path.replace(".json", "-syncs.json")) or bad)
