"""Where a 7B step's time goes (run on the device, bench/gpu_fastpath.sh with PROFILE=1): torch.profiler over
(a) twenty one-active-row steps and (b) a short decode-policy generation, for the graph backend (compiled) and
the eager baseline, at Dream-7B shape with random bf16 weights. Reports the kernels with the most GPU time,
grouped (matmul, attention, the rest), and how busy the GPU was: the union of kernel intervals over the wall
time, so host gaps between launches show up as idle time. Writes JSON to argv[1]."""
from __future__ import annotations

import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import os

from dlmtrt.evals.speed import _sync, random_model, shape_args, step_inputs, step_ms
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
from dlmtrt.runtime.generate import dream_generate

GROUPS = (("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "matmul", "splitk")),
          ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
          ("copy/fill", ("memcpy", "memset", "copy", "fill")))


def group(name: str) -> str:
    low = name.lower()
    for g, keys in GROUPS:
        if any(k in low for k in keys):
            return g
    return "elementwise/other"


def kernels(prof) -> list:
    out = []
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            out.append((e.name, e.time_range.start, e.time_range.end))
    return out


def busy_us(ks: list) -> float:
    tot, cur_s, cur_e = 0.0, None, None
    for _, s, e in sorted(ks, key=lambda k: k[1]):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                tot += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return tot + ((cur_e - cur_s) if cur_e is not None else 0.0)


def summarise(prof, wall_s: float, label: str, n: int) -> dict:
    ks = kernels(prof)
    by_name, by_group, count = {}, {}, {}
    for name, s, e in ks:
        by_name[name] = by_name.get(name, 0.0) + (e - s)
        count[name] = count.get(name, 0) + 1
        by_group[group(name)] = by_group.get(group(name), 0.0) + (e - s)
    total = sum(by_name.values()) or 1.0
    span = (max(k[2] for k in ks) - min(k[1] for k in ks)) if ks else 0.0
    busy = busy_us(ks)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:int(os.environ.get("TOP", 12))]
    res = {"label": label, "units": n, "wall_ms": wall_s * 1e3, "kernel_span_ms": span / 1e3,
           "gpu_busy_ms": busy / 1e3, "busy_fraction_of_span": busy / span if span else None,
           "busy_fraction_of_wall": busy / 1e3 / (wall_s * 1e3) if wall_s else None, "kernels": len(ks),
           "kernels_per_unit": len(ks) / n,
           "groups": {g: {"ms_per_unit": t / 1e3 / n, "share": t / total} for g, t in sorted(by_group.items())},
           "top": [{"kernel": k[:120], "ms_per_unit": t / 1e3 / n, "share": t / total, "per_unit": count[k] / n}
                   for k, t in top]}
    print(f"\n== {label}: {n} units, wall {wall_s * 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms "
          f"({100 * res['busy_fraction_of_wall']:.0f}% of wall), {len(ks) / n:.0f} kernels per unit")
    for g, v in res["groups"].items():
        print(f"   {g:18s} {v['ms_per_unit']:8.3f} ms/unit  {100 * v['share']:5.1f}%")
    for t in res["top"][:8]:
        print(f"   {t['ms_per_unit']:8.3f} ms/unit {100 * t['share']:5.1f}%  {t['kernel'][:90]}")
    return res


def profile_steps(be, label: str, L: int, n: int = 20) -> dict:
    step_ms(be, 1, 1, L, repeats=3)  # captures / compiles outside the profile
    dev = be.info.device
    s = step_inputs(be, 1, 1, L)  # the one-row step that step_ms times
    be.step(s)
    _sync(dev)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            be.step(s)
        _sync(dev)
        wall = time.perf_counter() - t0
    return summarise(prof, wall, f"{label}: one-row step", n)


def profile_generation(be, label: str, prompt: int, answer: int, steps: int) -> dict:
    ids = torch.randint(0, 250, (1, prompt), generator=torch.Generator().manual_seed(0)).to(be.info.device)
    kw = dict(max_new_tokens=answer, steps=steps, alg="maskgit_plus", temperature=0.0, policy="decode")
    dream_generate(be, ids, **kw)
    _sync(be.info.device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        _, st = dream_generate(be, ids, **kw)
        _sync(be.info.device)
        wall = time.perf_counter() - t0
    return summarise(prof, wall, f"{label}: decode policy, {steps} steps", st.steps)


def main(out: str) -> None:
    """SHAPE (dream-7b), DEVICE (cuda), TOP (kernels listed, 12); QUANT=fp8 profiles only the compiled one-row step of the bf16 model and
    of its fp8 quantisation (bench/gpu_quant.py's `speed_compile` models)."""
    shape, dev = os.environ.get("SHAPE", "dream-7b"), os.environ.get("DEVICE", "cuda")
    if os.environ.get("QUANT"):
        return main_quant(out, shape, dev, os.environ["QUANT"])
    args = shape_args(shape)
    cuda = dev.startswith("cuda")
    prompt, answer, steps = (512, 256, 32) if cuda else (32, 16, 4)
    L = prompt + answer
    res = {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__, "shape": shape,
           "prompt": prompt, "answer": answer, "runs": []}
    be = TorchGraphBackend(random_model(args, dev, torch.bfloat16), compile=cuda)
    res["runs"].append(profile_steps(be, "torch-graph+compile" if cuda else "torch-graph", L))
    res["runs"].append(profile_generation(be, res["runs"][-1]["label"].split(":")[0], prompt, answer, steps))
    del be
    if cuda:
        torch.cuda.empty_cache()
    be = TorchBackend(random_model(args, dev, torch.bfloat16))  # a fresh, unfused model for the eager baseline
    res["runs"].append(profile_steps(be, "torch (eager)", L))
    res["runs"].append(profile_generation(be, "torch (eager)", prompt, answer, steps))
    json.dump(res, open(out, "w"), indent=1)


def main_quant(out: str, shape: str, dev: str, quant: str) -> None:
    from dlmtrt.evals.speed import quantize_random
    if quant == "fp8" and dev.startswith("cuda"):
        import dlmtrt.plugins.fp8_linear  # noqa: F401  (routes few-row fp8 products to our kernel)
    args = shape_args(shape)
    L = 768
    res = {"gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else None, "torch": torch.__version__,
           "shape": shape, "quant": quant, "length": L, "runs": []}
    for q in (None, quant):
        model = random_model(args, dev, torch.bfloat16)
        if q is not None:
            quantize_random(model, q, L)
        be = TorchGraphBackend(model, compile=dev.startswith("cuda"))
        res["runs"].append(profile_steps(be, f"torch-graph+compile{'+' + q if q else ''}", L))
        res["runs"][-1]["step_ms"] = step_ms(be, 1, 1, L)
        print(f"   one-row step {res['runs'][-1]['step_ms']:.3f} ms", flush=True)
        del be, model
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "profile.json")
