"""The cached-attention kernel on the GPU (run on the device: `python3 bench/gpu_attention.py OUT.json [--flex]`),
called through `torch.ops.dlmtrt.cached_attention_cuda`, i.e. the same C-ABI launcher the TensorRT plugin's
enqueue calls.

Accuracy: against an fp64 reference of the ONNX node's semantics at Dream-7B's attention shape (28 query heads,
4 K/V heads, head_dim 128) and at head_dim 64, with every key valid and with left padding plus invalid keys,
few-row launches (key splits) and many-row ones, block-causal prefill and decode rows; a query with no valid key
must give 0; CUDA-graph captures (with and without key splits) must replay to the same result.

Speed (bf16, the issue's grid): every A in {1, 4, 32, 256, 768} active rows, L in {768, 2048, 8192} keys, B in
{1, 8, 32}, against PyTorch's fused attention as the torch-graph backend calls it (`scaled_dot_product_attention`,
GQA, the boolean key mask); block-causal shapes (blocks of 4 and 32, caches of 512 to 8192, the current block's
rows and a whole-cache prefill) against SDPA with the materialized block-causal mask and, with --flex, against
torch's compiled flex_attention with a block mask. Times are medians of CUDA-graph replays (the work without
Python's launch cost, as the captured step runs it); TFLOP/s count the attended (query, key) pairs only
(4 D FLOPs each). Exit 1 if an accuracy bound is missed."""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

import dlmtrt.plugins.torch_op  # noqa: F401  registers torch.ops.dlmtrt.cached_attention_cuda
from dlmtrt.evals.speed import median_ms
from dlmtrt.models.attention_kinds import AttentionKind, may_attend, sdpa_mask

BIDIRECTIONAL = AttentionKind()
BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
PEAK_TFLOPS = 790.0  # the H200 dense bf16 figure (datasheet 989 with sparsity-free boost clocks)


def positions(B, A, L, device="cuda"):
    """Queries at the last A slots of the canvas, keys at every slot (sequence positions)."""
    k_pos = torch.arange(L, device=device).expand(B, L).contiguous()
    return k_pos[:, L - A:].contiguous(), k_pos


def kernel(q, k, v, valid, kind=BIDIRECTIONAL):
    q_pos, k_pos = positions(q.shape[0], q.shape[2], k.shape[2])
    return torch.ops.dlmtrt.cached_attention_cuda(q, k, v, valid, q_pos, k_pos, kind.mask_type, kind.block)


def reference(q, k, v, valid, kind=BIDIRECTIONAL):
    """fp64, written out: softmax over the keys `may_attend` allows, 0 for a query without any."""
    B, H, A, D = q.shape
    g = H // k.shape[1]
    kk, vv = (t.double().repeat_interleave(g, dim=1) for t in (k, v))
    s = (q.double() @ kk.transpose(-1, -2)) / D ** 0.5
    s = s.masked_fill(~may_attend(kind, *positions(B, A, k.shape[2]), valid)[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ vv


def sdpa(q, k, v, valid, kind=BIDIRECTIONAL):
    mask = sdpa_mask(kind, valid, *positions(q.shape[0], q.shape[2], k.shape[2]))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def timed(fn, reps=30):
    """Median microseconds of CUDA-graph replays of `fn`."""
    return 1e3 * median_ms(fn, "cuda", reps, warmup=3, graph=True)


def tensors(B, H, Hkv, A, L, D, dtype, masked, gen, heads_inner=False):
    """`heads_inner`: q as a model's projection leaves it, [B, A, H, D] in memory viewed as [B, H, A, D]."""
    if heads_inner:
        q = torch.randn(B, A, H, D, generator=gen, device="cuda").to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, A, D, generator=gen, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").to(dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    if masked:  # left padding growing with the batch index (whole key tiles of it), a tenth of the rest invalid
        for b in range(B):
            valid[b, : (37 * b + 70 * (b % 2)) % (L // 2)] = False
        valid &= torch.rand(B, L, generator=gen, device="cuda") > 0.1
        valid[0, 3] = True
    return q, k, v, valid


def accuracy_case(B, H, Hkv, A, L, D, dtype, masked, gen, kind=BIDIRECTIONAL, heads_inner=False):
    q, k, v, valid = tensors(B, H, Hkv, A, L, D, dtype, masked, gen, heads_inner)
    ref = reference(q, k, v, valid, kind)
    o = kernel(q, k, v, valid, kind)
    err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
    same_layout = o.stride() == q.stride()  # o comes back in q's memory order, so o.transpose(1, 2) is free
    row = dict(B=B, H=H, Hkv=Hkv, A=A, L=L, D=D, dtype=str(dtype).removeprefix("torch."), masked=masked,
               kind=kind.spec, heads_inner=heads_inner, rel_err=err, bound=BOUND[dtype],
               ok=err <= BOUND[dtype] and same_layout)
    if dtype != torch.float32:
        row["sdpa_rel_err"] = ((sdpa(q, k, v, valid, kind).double() - ref).abs().max() / ref.abs().max()).item()
    print(f"{row['dtype']:8s} {kind.spec:15s} B={B} H={H}/{Hkv} A={A:4d} L={L:4d} D={D} masked={masked!s:5s} "
          f"{'[B,A,H,D] ' if heads_inner else ''}rel err {err:.2e} (sdpa {row.get('sdpa_rel_err', float('nan')):.2e}) "
          f"{'ok' if row['ok'] else 'FAIL'}")
    return row


def accuracy(gen) -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for B, L in ((1, 768), (8, 2048)):
            for A in (1, 4, 32, 256, 768):
                for masked in (False, True):
                    rows.append(accuracy_case(B, 28, 4, A, L, 128, dtype, masked, gen))
        for A in (1, 17, 256):
            rows.append(accuracy_case(2, 16, 4, A, 300, 64, dtype, True, gen))
        rows.append(accuracy_case(3, 8, 8, 5, 8192, 64, dtype, True, gen))  # no GQA, many key splits
    for block in (4, 32):
        for dtype in (torch.bfloat16, torch.float32):
            kind = AttentionKind("block_causal", block)
            for A in (1, block, 32, 200, 544):  # 544 = the whole cache: a prefill
                rows.append(accuracy_case(2, 28, 4, A, 544, 128, dtype, True, gen, kind))
            rows.append(accuracy_case(1, 16, 4, 96, 300, 64, dtype, False, gen, kind))
    for dtype in (torch.bfloat16, torch.float32):  # q and o in a model's [B, A, H, D] memory order
        for A in (1, 32, 768):
            rows.append(accuracy_case(8, 28, 4, A, 2048, 128, dtype, True, gen, heads_inner=True))
        rows.append(accuracy_case(2, 28, 4, 544, 544, 128, dtype, True, gen, AttentionKind("block_causal", 4), True))
    return rows


def attended_pairs(B, A, L, kind, valid=None):
    if not kind.causal_blocks:
        return B * A * L
    q_pos, k_pos = positions(B, A, L)
    return int(may_attend(kind, q_pos, k_pos, torch.ones(B, L, dtype=torch.bool, device="cuda")).sum())


def speed_case(B, A, L, gen, kind=BIDIRECTIONAL, flex=None, H=28, Hkv=4, D=128):
    q, k, v, valid = tensors(B, H, Hkv, A, L, D, torch.bfloat16, False, gen)
    o, s = kernel(q, k, v, valid, kind), sdpa(q, k, v, valid, kind)
    row = dict(B=B, H=H, Hkv=Hkv, A=A, L=L, D=D, dtype="bfloat16", kind=kind.spec,
               kernel_vs_sdpa=((o.float() - s.float()).abs().max() / s.float().abs().max()).item())
    row["kernel_us"] = timed(lambda: kernel(q, k, v, valid, kind))
    row["sdpa_us"] = timed(lambda: sdpa(q, k, v, valid, kind))
    row["kernel_over_sdpa"] = row["kernel_us"] / row["sdpa_us"]
    flops = 4 * D * H * attended_pairs(B, A, L, kind)
    row["kernel_tflops"] = flops / row["kernel_us"] / 1e6
    row["sdpa_tflops"] = flops / row["sdpa_us"] / 1e6
    row["kernel_peak_fraction"] = row["kernel_tflops"] / PEAK_TFLOPS
    if flex is not None:
        try:
            fx = flex(q, k, v, valid, kind)
            fx()
            try:
                row["flex_us"] = timed(fx)
            except RuntimeError:  # compiled flex may copy from the host in a call, which a capture refuses
                torch.cuda.synchronize()
                row["flex_us"] = 1e3 * median_ms(fx, "cuda", 30, warmup=3)
                row["flex_timing"] = "CUDA events around each call (graph capture refused)"
            row["kernel_over_flex"] = row["kernel_us"] / row["flex_us"]
        except Exception as e:  # noqa: BLE001  recorded, not fatal: flex's support of a shape is not ours
            row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(f"{kind.spec:15s} B={B:2d} A={A:4d} L={L:4d}  kernel {row['kernel_us']:9.1f} us "
          f"({row['kernel_tflops']:6.1f} TFLOP/s, {100 * row['kernel_peak_fraction']:4.1f}% peak)  sdpa "
          f"{row['sdpa_us']:9.1f} us  x{row['kernel_over_sdpa']:.2f}"
          + (f"  flex {row['flex_us']:8.1f} us x{row['kernel_over_flex']:.2f}" if "flex_us" in row else "")
          + (f"  flex: {row['flex_error']}" if "flex_error" in row else "") + f"  diff {row['kernel_vs_sdpa']:.1e}",
          flush=True)
    del q, k, v, valid, o, s
    torch.cuda.empty_cache()
    return row


def flex_factory():
    """(q, k, v, valid, kind) -> a call of compiled flex_attention with the block mask of `kind` over `valid`."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from dlmtrt.runtime.backends.torch_graph_backend import _allow_recompiles
    _allow_recompiles(256)  # one compile per shape; past dynamo's default limit it would run flex eagerly
    compiled = torch.compile(flex_attention, dynamic=False)

    def make(q, k, v, valid, kind):
        B, A, L = q.shape[0], q.shape[2], k.shape[2]
        q_pos, k_pos = positions(B, A, L)
        blk = kind.block or 1
        causal = kind.causal_blocks

        def mask_mod(b, h, qi, ki):
            ok = valid[b, ki]
            return ok & (k_pos[b, ki] // blk <= q_pos[b, qi] // blk) if causal else ok

        bm = create_block_mask(mask_mod, B, None, A, L, device="cuda")
        return lambda: compiled(q, k, v, block_mask=bm, enable_gqa=True)
    return make


def speed(gen, flex, kinds=("bidirectional", "block_causal")) -> list[dict]:
    rows = []
    for L in ((768, 2048, 8192) if "bidirectional" in kinds else ()):
        for B in (1, 8, 32):
            for A in (1, 4, 32, 256, 768):
                rows.append(speed_case(B, A, L, gen))
    for block in ((4, 32) if "block_causal" in kinds else ()):
        kind = AttentionKind("block_causal", block)
        for L in (512, 2048, 8192):
            for B, A in ((1, block), (8, block), (32, block), (1, L), (8, min(L, 2048))):
                rows.append(speed_case(B, A, L, gen, kind, flex))
    return rows


def special_cases(gen) -> dict:
    """No valid key -> 0; CUDA-graph capture and replay of the op (few rows: key splits; many rows: none)."""
    out = {}
    q = torch.randn(2, 28, 3, 128, generator=gen, device="cuda").bfloat16()
    k = torch.randn(2, 4, 64, 128, generator=gen, device="cuda").bfloat16()
    v = torch.randn_like(k)
    valid = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    valid[1] = False
    o = kernel(q, k, v, valid)
    out["no_valid_key_gives_zero"] = bool((o[1] == 0).all()) and bool(torch.isfinite(o).all())
    for name, (B, A, L) in {"graph_replay_matches": (2, 3, 64), "graph_replay_matches_split": (1, 1, 4096),
                            "graph_replay_matches_many_rows": (2, 300, 1024)}.items():
        q, k, v, valid = tensors(B, 28, 4, A, L, 128, torch.bfloat16, True, gen)
        static_q = q.clone()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            kernel(static_q, k, v, valid)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            static_o = kernel(static_q, k, v, valid)
        new_q = torch.randn_like(q)
        static_q.copy_(new_q)
        g.replay()
        torch.cuda.synchronize()
        out[name] = bool(torch.equal(static_o, kernel(new_q, k, v, valid)))
    try:
        kernel(q[..., :96].contiguous(), k[..., :96].contiguous(), v[..., :96].contiguous(), valid)
        out["head_dim_96_refused"] = False
    except Exception as e:  # noqa: BLE001
        out["head_dim_96_refused"] = "head_dim 96 is not supported" in str(e)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="gpu_attention.json")
    ap.add_argument("--flex", action="store_true", help="also time compiled flex_attention on block-causal shapes")
    ap.add_argument("--skip", choices=["speed", "accuracy"], action="append", default=[])
    ap.add_argument("--kinds", default="bidirectional,block_causal", help="attention kinds to time")
    args = ap.parse_args(argv)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    acc = [] if "accuracy" in args.skip else accuracy(gen)
    special = special_cases(gen)
    print(special, f"({time.time() - t0:.0f} s)")
    fast = [] if "speed" in args.skip else speed(gen, flex_factory() if args.flex else None,
                                                 tuple(args.kinds.split(",")))
    bad = sum(not r["ok"] for r in acc) + sum(not v for v in special.values())
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tflops": PEAK_TFLOPS,
               "accuracy": acc, "speed": fast, "special": special, "failed": bad, "seconds": time.time() - t0},
              open(args.out, "w"), indent=1)
    bi = [r for r in fast if r["kind"] == "bidirectional"]
    if bi:
        worst = max(bi, key=lambda r: r["kernel_over_sdpa"])
        print(f"bidirectional: kernel <= SDPA in {sum(r['kernel_over_sdpa'] <= 1 for r in bi)}/{len(bi)} shapes; "
              f"worst x{worst['kernel_over_sdpa']:.2f} at B={worst['B']} A={worst['A']} L={worst['L']}")
    print(f"{len(acc) - sum(not r['ok'] for r in acc)}/{len(acc)} accuracy cases within bounds; failed {bad}; "
          f"{time.time() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
