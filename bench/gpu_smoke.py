"""GPU check of the foundation on the lent device: CUDA + bf16 loading, step numerics against fp32,
and greedy generation agreeing between CPU fp32 and CUDA fp32. Prints one JSON document."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from dlmtrt.models.loading import load
from dlmtrt.models.tiny import make_tiny
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.generate import dream_generate, llada_generate


def main() -> None:
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    with tempfile.TemporaryDirectory() as d:
        for fam in ("dream", "llada"):
            path = make_tiny(fam, Path(d) / fam, seed=1, num_layers=4, hidden_size=256, intermediate_size=512,
                             head_dim=64)
            m32, _, ck = load(str(path), "float32", "cuda")
            m16, _, _ = load(str(path), "bfloat16", "cuda")
            B, L = 4, 96
            ids = torch.randint(0, 250, (B, L), device="cuda")
            am = torch.ones(B, L, dtype=torch.bool, device="cuda")
            pos = torch.arange(L, device="cuda").expand(B, L)
            st = torch.zeros_like(am)
            l32 = m32(ids, pos, *m32.empty_cache(B, L), st, am)[0]
            l16 = m16(ids, pos, *m16.empty_cache(B, L), st, am)[0]
            rel = ((l16.double() - l32.double()).abs().max() / l32.double().abs().max()).item()
            mcpu, _, _ = load(str(path), "float32", "cpu")
            prompt = torch.randint(0, 250, (2, 12))
            if fam == "dream":
                kw = dict(max_new_tokens=32, steps=16, alg="entropy")
                a, _ = dream_generate(TorchBackend(mcpu), prompt, **kw)
                b, _ = dream_generate(TorchBackend(m32), prompt.cuda(), **kw)
                c, st16 = dream_generate(TorchBackend(m16), prompt.cuda(), **kw)
            else:
                kw = dict(gen_length=32, steps=16, block_length=16)
                a, _ = llada_generate(TorchBackend(mcpu), prompt, **kw)
                b, _ = llada_generate(TorchBackend(m32), prompt.cuda(), **kw)
                c, st16 = llada_generate(TorchBackend(m16), prompt.cuda(), **kw)
            res[fam] = {"bf16_vs_fp32_logits_rel_err": rel, "greedy_cpu_fp32_equals_cuda_fp32": torch.equal(a, b.cpu()),
                        "bf16_tokens_agreeing_with_fp32": (c.cpu() == a).float().mean().item(),
                        "bf16_generate_stats": st16.to_dict()}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
