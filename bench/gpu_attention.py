"""The cached-attention kernel on the GPU (run on the device: `python3 bench/gpu_attention.py OUT.json`), called
through `torch.ops.dlmtrt.cached_attention_cuda`, i.e. the same C-ABI launcher the TensorRT plugin's enqueue
calls. Accuracy against an fp64 reference of the ONNX node's semantics at Dream-7B's attention shape (28 query
heads, 4 K/V heads, head_dim 128) and at head_dim 64, for A in {1, 32, 256, 768} active rows, canvas 768 and
2048, batch 1 and 8, with every key valid and with left padding plus stable/invalid keys; a query with no valid
key must give 0; a CUDA-graph capture of the op must replay to the same result; block-causal cases (blocks of 4
and 32 over a 544-row canvas) against the same reference with `may_attend`'s mask. Speed: median of CUDA-event
timings against PyTorch's fused attention (`scaled_dot_product_attention` with GQA and the boolean mask, what
the torch-graph backend runs) at the same shapes. Exit 1 if an accuracy bound is missed."""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import dlmtrt.plugins.torch_op  # noqa: F401  registers torch.ops.dlmtrt.cached_attention_cuda
from dlmtrt.evals.speed import median_ms
from dlmtrt.models.attention_kinds import AttentionKind, may_attend

BIDIRECTIONAL = AttentionKind()

BOUND = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def positions(B, A, L):
    """Queries at the last A slots of the canvas, keys at every slot (sequence positions)."""
    k_pos = torch.arange(L, device="cuda").expand(B, L).contiguous()
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


def sdpa(q, k, v, valid):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], enable_gqa=True)


def timed(fn, reps=50):
    """Median microseconds."""
    return 1e3 * median_ms(fn, "cuda", reps, warmup=5)


def case(B, H, Hkv, A, L, D, dtype, masked, speed, gen, kind=BIDIRECTIONAL):
    q = torch.randn(B, H, A, D, generator=gen, device="cuda").to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").to(dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    if masked:  # left padding growing with the batch index, and a tenth of the rest invalid
        for b in range(B):
            valid[b, : (37 * b) % (L // 2)] = False
        valid &= torch.rand(B, L, generator=gen, device="cuda") > 0.1
        valid[0, 3] = True
    o = kernel(q, k, v, valid, kind)
    ref = reference(q, k, v, valid, kind)
    err = ((o.double() - ref).abs().max() / ref.abs().max()).item()
    row = dict(B=B, H=H, Hkv=Hkv, A=A, L=L, D=D, dtype=str(dtype).removeprefix("torch."), masked=masked,
               kind=kind.spec, rel_err=err, bound=BOUND[dtype], ok=err <= BOUND[dtype])
    if dtype != torch.float32:
        row["sdpa_rel_err"] = ((sdpa(q, k, v, valid).double() - ref).abs().max() / ref.abs().max()).item()
    if speed:
        row["kernel_us"] = timed(lambda: kernel(q, k, v, valid, kind))
        row["sdpa_us"] = timed(lambda: sdpa(q, k, v, valid))
        row["kernel_over_sdpa"] = row["kernel_us"] / row["sdpa_us"]
    return row


def special_cases(gen) -> dict:
    """No valid key -> 0; CUDA-graph capture and replay of the op; bad input -> a clear error."""
    out = {}
    q = torch.randn(2, 28, 3, 128, generator=gen, device="cuda").bfloat16()
    k = torch.randn(2, 4, 64, 128, generator=gen, device="cuda").bfloat16()
    v = torch.randn_like(k)
    valid = torch.ones(2, 64, dtype=torch.bool, device="cuda")
    valid[1] = False
    o = kernel(q, k, v, valid)
    out["no_valid_key_gives_zero"] = bool((o[1] == 0).all()) and bool(torch.isfinite(o).all())
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
    out["graph_replay_matches"] = bool(torch.equal(static_o, kernel(new_q, k, v, valid)))
    try:
        kernel(q[..., :96].contiguous(), k[..., :96].contiguous(), v[..., :96].contiguous(), valid)
        out["head_dim_96_refused"] = False
    except Exception as e:  # noqa: BLE001
        out["head_dim_96_refused"] = "head_dim 96 is not supported" in str(e)
    return out


def main(path: str) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for B in (1, 8):
            for L in (768, 2048):
                for A in (1, 32, 256, 768):
                    for masked in (False, True):
                        rows.append(case(B, 28, 4, A, L, 128, dtype, masked, speed=not masked, gen=gen))
                        r = rows[-1]
                        print(f"{r['dtype']:8s} B={B} L={L:4d} A={A:3d} D=128 masked={masked!s:5s} rel err "
                              f"{r['rel_err']:.2e} {'ok' if r['ok'] else 'FAIL'}"
                              + (f"  kernel {r['kernel_us']:8.1f} us  sdpa {r['sdpa_us']:7.1f} us  "
                                 f"x{r['kernel_over_sdpa']:.2f}" if "kernel_us" in r else ""))
        for A in (1, 32, 256):
            rows.append(case(2, 16, 4, A, 768, 64, dtype, True, speed=False, gen=gen))
            print(f"{str(dtype):15s} D=64 A={A} rel err {rows[-1]['rel_err']:.2e}")
    rows.append(case(2, 16, 4, 17, 300, 64, torch.float16, True, speed=False, gen=gen))
    for block in (4, 32):  # block-causal: the kernel's mask from positions, against the same reference
        for dtype in (torch.bfloat16, torch.float32):
            for A in (1, 4, 32):
                rows.append(case(2, 28, 4, A, 544, 128, dtype, True, speed=False, gen=gen,
                                 kind=AttentionKind("block_causal", block)))
                print(f"{str(dtype):15s} block_causal:{block} A={A} rel err {rows[-1]['rel_err']:.2e}")
    special = special_cases(gen)
    print(special)
    bad = sum(not r["ok"] for r in rows) + sum(not v for v in special.values())
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "special": special,
               "failed": bad}, open(path, "w"), indent=1)
    print(f"{len(rows) - sum(not r['ok'] for r in rows)}/{len(rows)} accuracy cases within bounds; failed {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "gpu_attention.json"))
