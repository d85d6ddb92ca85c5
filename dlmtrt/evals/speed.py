"""Speed at a named model shape with random weights (nothing downloaded): the library behind `dlmtrt bench`.

For each policy it runs one whole generation (batch, prompt, answer and steps as asked; greedy, temperature
0) and reports tokens/s, the median time of a step, rows computed per step and the peak memory; beside
them, measured in the same process, the device's copy bandwidth and the *weight-read floor*: the time to read
every weight once at that bandwidth, which no step can beat at batch 1. The step times come from CUDA events
recorded at every step, so measuring adds no synchronisation to the loop.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from dlmtrt.dtypes import DTYPES
from dlmtrt.errors import UsageError
from dlmtrt.evals.memory import proc_status, reset_hwm, vm_hwm
from dlmtrt.models.tiny import DEFAULT_SIZES, shaped_like, tiny_args
from dlmtrt.models.transformer import DiffusionLM, ModelArgs, rope_inv_freq
from dlmtrt.runtime.params import DreamParams, LLaDAParams

SHAPES = ("dream-7b", "llada-8b", "tiny-dream", "tiny-llada")


def shape_args(shape: str) -> ModelArgs:
    if shape not in SHAPES:
        raise UsageError(f"unknown shape '{shape}'; choose from {', '.join(SHAPES)}")
    family = shape.split("-")[-1] if shape.startswith("tiny") else shape.split("-")[0]
    if shape.startswith("tiny"):
        ids = {"mask": 259, "eos": 256, "pad": 256} if family == "dream" else {"mask": 261, "eos": 257, "pad": 257}
        return tiny_args(family, 264, ids, **DEFAULT_SIZES)
    return shaped_like(family)


def random_model(args: ModelArgs, device: str, dtype: torch.dtype, seed: int = 0) -> DiffusionLM:
    """Random weights straight on the device in the target dtype: built on the meta device, allocated once,
    filled in place (no second copy, no fp32 detour)."""
    with torch.device("meta"):
        m = DiffusionLM(args).to(dtype)
    m = m.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif n.endswith(".bias"):
                p.normal_(0, 0.02, generator=g)
            else:
                p.normal_(0, 0.02, generator=g)
    m.inv_freq = rope_inv_freq(args, device=device)
    return m.eval()


def median_ms(fn, device, repeats: int = 30, warmup: int = 3, *, graph: bool = False) -> float:
    """Median milliseconds of `fn()` after `warmup` calls: CUDA events around each call on a GPU (the time of
    the queued work, not of queueing it), wall time on the CPU. `graph` (CUDA only): call `fn` once, capture
    one call in a CUDA graph and time the graph's replays instead, i.e. the work without its launches, as a
    captured step runs it (`fn` then runs in Python twice, whatever `repeats`)."""
    cuda = torch.device(device).type == "cuda"
    if graph:
        if not cuda:
            raise ValueError(f"median_ms: graph=True times a CUDA graph; the device is {device}")
        fn()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device (on the CPU: memory-to-memory) copy, counting the bytes read and
    the bytes written (median). 2 GiB on a GPU; 256 MiB on the CPU, well beyond its caches."""
    if nbytes is None:
        nbytes = 2 * 2**30 if str(device).startswith("cuda") else 256 * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    src.random_()
    return 2 * nbytes / (median_ms(lambda: dst.copy_(src), device, repeats) / 1e3)


class PeakMemory:
    """Peak memory of a run: allocated device memory on a GPU; on the CPU the process's peak resident memory
    above what it held before the model was built (`baseline`), so both count weights, K/V and activations.
    `peak()` is None where the CPU figure cannot be measured (no Linux /proc). The baseline is the resident
    size (VmRSS), not the high-water mark, which an earlier peak of the process would have raised."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda")
        self.baseline = None if self.cuda else proc_status().get("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif not reset_hwm():
            self.baseline = None

    def peak(self) -> int | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        hwm = vm_hwm()
        return None if hwm is None or self.baseline is None else max(hwm - self.baseline, 0)


@dataclass
class RunResult:
    policy: str
    schedule: str
    batch: int
    new_tokens: int
    steps: int
    tokens_per_s: float
    step_ms_median: float
    rows_per_step: float
    peak_bytes: int | None  # PeakMemory: None where it cannot be measured
    floor_ratio: float | None = None  # median step time over the weight-read floor


@dataclass
class BenchReport:
    shape: str
    device: str
    gpu: str | None
    dtype: str
    backend: str
    torch: str
    params: int
    weight_bytes: int
    kv_bytes: int
    copy_bytes_per_s: float
    floor_ms: float
    single_row_step_ms: float | None = None
    runs: list[RunResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """Strict JSON: a figure that could not be measured is null, never NaN."""
        import json
        return json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def step_ms(backend, B: int, active: int, length: int, repeats: int = 30) -> float:
    """Median time of one backend step with `active` rows over a canvas of `length` rows, the rest stable."""
    s = step_inputs(backend, B, active, length)
    return median_ms(lambda: backend.step(s), backend.info.device, repeats)


def step_inputs(backend, B: int, active: int, length: int):
    """The step `step_ms` times: random ids in the last `active` rows of a canvas of `length`, every other row
    stable (read from a fresh cache), all attended, one logit row where the backend selects them."""
    from dlmtrt.runtime.contract import StepInputs
    dev = backend.info.device
    keys, values = backend.new_cache(B, length)
    ids = torch.randint(0, 200, (B, active), device=dev)
    pos = torch.arange(length - active, length, device=dev).expand(B, active).contiguous()
    stable = torch.ones(B, length, dtype=torch.bool, device=dev)
    stable[:, length - active:] = False
    am = torch.ones(B, length, dtype=torch.bool, device=dev)
    rows = torch.zeros(B, 1, dtype=torch.long, device=dev) if getattr(backend, "selects_logit_rows", False) else None
    return StepInputs(ids, pos, keys, values, stable, am, logit_rows=rows, need_drift=False)


def run_policy(backend, family: str, B: int, prompt: int, answer: int, steps: int, policy: str,
               block_length: int | None, seed: int = 0, memory: PeakMemory | None = None) -> RunResult:
    """One whole generation of random prompts; tokens/s over its wall time, per-step times from events."""
    from dlmtrt.runtime.generate import dream_generate, llada_generate
    dev = backend.info.device
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (B, prompt), generator=g).to(dev)
    events: list = []

    def mark(i, n):
        if cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.append(e)
        else:
            events.append(time.perf_counter())
    memory = memory or PeakMemory(str(dev))
    memory.reset()
    _sync(dev)
    start = torch.cuda.Event(enable_timing=True) if cuda else None
    if cuda:
        start.record()
    t0 = time.perf_counter()
    if family == "dream":
        _, st = dream_generate(backend, ids, max_new_tokens=answer, steps=steps, alg="maskgit_plus", temperature=0.0,
                               block_length=block_length, policy=policy, on_step=mark)
    else:
        _, st = llada_generate(backend, ids, steps=steps, gen_length=answer, block_length=block_length or answer,
                               policy=policy, on_step=mark)
    _sync(dev)
    wall = time.perf_counter() - t0
    if cuda:
        marks = [start] + events
        durs = [a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:])]
    else:
        marks = [t0] + events
        durs = [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:])]
    peak = memory.peak()
    schedule = "dream" if family == "dream" and block_length is None else f"blocks of {block_length or answer}"
    return RunResult(policy, schedule, B, answer, st.steps, B * answer / wall, statistics.median(durs),
                     st.rows_computed / max(st.steps, 1), peak)


def bench(shape: str, *, device: str = "cpu", dtype: str = "float32", backend: str = "torch-graph",
          compile: bool = False, attention: str = "sdpa", batch: int = 1,
          prompt: int = 512, answer: int = 256, steps: int | None = None, policies=("none", "decode", "dual"),
          block_length: int | None = 32, seed: int = 0, quant: str | None = None, quantize_head: bool = False,
          keep_blocks: int = 0, log=print) -> BenchReport:
    """Build the shape with random weights on `device`, measure the floor, then every policy. With `quant`
    (fp8, int8-wo, w8a8) the random model is quantised first, its activation scales calibrated on a few
    random canvases (the numbers are meaningless, the speed is not); `quantize_head` quantises the head too;
    `keep_blocks` leaves the first N blocks unquantised (the bytes of `calibrate --keep-blocks N`; which blocks
    is meaningless with random weights)."""
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    from dlmtrt.runtime.backends.torch_graph_backend import TorchGraphBackend
    from dlmtrt.runtime.policies import parse_policy

    args = shape_args(shape)
    steps = steps or answer
    if (quantize_head or keep_blocks) and quant is None:
        raise UsageError("--quantize-head and --keep-blocks change how --quant quantises: give --quant too")
    if not 0 <= keep_blocks < args.num_layers:
        raise UsageError(f"--keep-blocks must be between 0 and {args.num_layers - 1} for {shape}, got {keep_blocks}")
    if prompt + answer > args.max_position_embeddings:
        raise UsageError(f"prompt + answer = {prompt + answer} exceeds the shape's {args.max_position_embeddings} "
                         "positions")
    if attention != "sdpa" and backend != "torch-graph":
        raise UsageError("--attention kernel applies to the torch-graph backend")
    runs = []
    for p in policies:
        plan = parse_policy(p)
        plan.check(args.family, "low_confidence")
        blocks = _policy_blocks(args.family, p, block_length)
        _check_schedule(args.family, answer, steps, blocks, p)
        runs.append((p, blocks))
    memory = PeakMemory(device)
    log(f"building {shape} ({count(args.param_count)} parameters) with random {dtype} weights on {device}")
    model = random_model(args, device, DTYPES[dtype], seed)
    if quant is not None:
        log(f"quantising to {quant}" + (" (head included)" if quantize_head else ""))
        quantize_random(model, quant, prompt + answer, seed, head=quantize_head, keep_blocks=keep_blocks)
    be = TorchGraphBackend(model, compile=compile, attention=attention) if backend == "torch-graph" else TorchBackend(model)
    elem = DTYPES[dtype].itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    L = prompt + answer
    kv_bytes = 2 * args.num_layers * batch * args.num_kv_heads * L * args.head_dim * elem
    log("measuring the device copy bandwidth")
    bw = copy_bandwidth(device)
    floor_ms = weight_bytes / bw * 1e3
    gpu = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None
    name = be.name + ("+compile" if compile else "") + ("+kernel" if attention == "kernel" else "") + \
        (f"+{quant}" if quant else "") + ("+head" if quantize_head else "") + \
        (f"+keep{keep_blocks}" if keep_blocks else "")
    rep = BenchReport(shape, device, gpu, dtype, name, torch.__version__, args.param_count, weight_bytes,
                      kv_bytes, bw, floor_ms)
    log("timing a one-active-row step")
    rep.single_row_step_ms = step_ms(be, batch, 1, L)
    for k, (p, blocks) in enumerate(runs):
        log(f"running {p} ({k + 1}/{len(runs)})")
        run_policy(be, args.family, batch, prompt, answer, steps, p, blocks, seed, memory)  # warm-up: graphs
        r = run_policy(be, args.family, batch, prompt, answer, steps, p, blocks, seed, memory)
        rep.runs.append(replace(r, floor_ratio=r.step_ms_median / floor_ms))
    return rep


def count(n: int) -> str:
    """1234 -> '1.23 K', 7.6e9 -> '7.62 B': parameter counts of any size, readable."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def _policy_blocks(family: str, policy: str, block_length: int | None) -> int | None:
    """The block length a policy decodes with: LLaDA always (its schedule is blocks); Dream only under the
    block-wise caches (Fast-dLLM's block decoding), else Dream's own schedule."""
    if family == "llada" or policy.split("+")[0].split(":")[0] in ("block", "dual"):
        return block_length
    return None


def _check_schedule(family: str, answer: int, steps: int, block_length: int | None, policy: str) -> None:
    """The parameters `run_policy` will generate with, validated before anything is built or run."""
    try:
        if family == "dream":
            DreamParams(max_new_tokens=answer, steps=steps, alg="maskgit_plus", temperature=0.0,
                        block_length=block_length).validate()
        else:
            LLaDAParams(gen_length=answer, steps=steps, block_length=block_length or answer).validate()
    except UsageError as e:
        raise UsageError(f"policy {policy}: {e} (bench: --answer {answer}, --steps {steps}, --block-length "
                         f"{block_length})", field=e.field) from None


def quantize_random(model: DiffusionLM, fmt: str, length: int, seed: int = 0, canvases: int = 4,
                    head: bool = False, keep_blocks: int = 0) -> None:
    """`calibration.quantize` of a random-weight model, with statistics from random fully masked canvases."""
    from dlmtrt.calibration.canvases import Canvas
    from dlmtrt.calibration.quantize import quantize
    from dlmtrt.calibration.sensitivity import block_names
    from dlmtrt.calibration.statistics import collect
    g = torch.Generator().manual_seed(seed)
    cs = [Canvas(torch.randint(0, 250, (length,), generator=g).tolist(), 1.0) for _ in range(canvases)]
    with torch.inference_mode():
        stats = collect(model, cs, strata=1, pad_id=model.args.pad_token_id, batch=1, head=head)
    with torch.no_grad():
        keep = frozenset(n for i in range(keep_blocks) for n in block_names(model, i))
        quantize(model, fmt, stats, head=head, keep=keep)
