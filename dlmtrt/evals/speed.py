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
from dlmtrt.models.args import ModelArgs
from dlmtrt.models.tiny import DEFAULT_SIZES, shaped_like, tiny_args, tiny_vocabulary
from dlmtrt.models.transformer import DiffusionLM, rope_inv_freq



# Random prompts draw token ids below this: byte tokens of the tiny vocabularies (their specials start at 256),
# ordinary tokens of the real ones, never a mask or EOS id.
PROMPT_IDS = 250


def shape_names() -> tuple[str, ...]:
    """Every model family's released sizes (dream-7b, llada-8b, ...) and tiny-<family>."""
    from dlmtrt.models.families import shapes
    return tuple(shapes())


def shape_args(shape: str) -> ModelArgs:
    """ModelArgs of a named shape: a released size, or `tiny-<family>` (the tiny tokenizer's vocabulary and ids)."""
    from dlmtrt.models.families import shapes
    table = shapes()
    if shape not in table:
        raise UsageError(f"unknown shape '{shape}'; choose from {', '.join(table)}", field="shape")
    fam, fields = table[shape]
    if not fields:
        vocab, ids = tiny_vocabulary(fam.FAMILY)
        return tiny_args(fam.FAMILY, vocab, ids, **DEFAULT_SIZES)
    return shaped_like(shape)


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
    ids = torch.randint(0, PROMPT_IDS, (B, active), device=dev)
    pos = torch.arange(length - active, length, device=dev).expand(B, active).contiguous()
    stable = torch.ones(B, length, dtype=torch.bool, device=dev)
    stable[:, length - active:] = False
    am = torch.ones(B, length, dtype=torch.bool, device=dev)
    rows = torch.zeros(B, 1, dtype=torch.long, device=dev) if backend.selects_logit_rows else None
    return StepInputs(ids, pos, keys, values, stable, am, logit_rows=rows, need_drift=False)


def run_policy(backend, params: dict, B: int, prompt: int, policy: str, seed: int = 0,
               memory: PeakMemory | None = None) -> RunResult:
    """One whole generation of random prompts with the family's `params`; tokens/s over its wall time,
    per-step times from events."""
    from dlmtrt.runtime.families import get as family
    fam = family(backend.info.family)
    dev = backend.info.device
    cuda = dev.type == "cuda"
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, PROMPT_IDS, (B, prompt), generator=g).to(dev)
    answer = fam.new_tokens(params)
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
    _, st = fam.generate(backend, ids, policy=policy, on_step=mark, **params)
    _sync(dev)
    wall = time.perf_counter() - t0
    if cuda:
        marks = [start] + events
        durs = [a.elapsed_time(b) for a, b in zip(marks[:-1], marks[1:])]
    else:
        marks = [t0] + events
        durs = [(b - a) * 1e3 for a, b in zip(marks[:-1], marks[1:])]
    return RunResult(policy, fam.schedule_name(params), B, answer, st.steps, B * answer / wall,
                     statistics.median(durs), st.rows_computed / max(st.steps, 1), memory.peak())


def default_bench_policies(family: str) -> tuple[str, ...]:
    """No cache, dKV-Cache's Decode and Fast-dLLM's dual cache; for a block-causal family no cache and its own."""
    from dlmtrt.runtime.families import get
    fam = get(family)
    return ("none", fam.default_policy) if fam.block_causal else ("none", "decode", "dual")


def policy_params(family: str, policy: str, answer: int, steps: int | None, block_length: int | None) -> dict:
    """The greedy parameters a bench run of `policy` decodes with: blocks of `block_length` where the family's
    schedule is block-wise or the policy is defined over blocks, else the family's own schedule; validated
    (before anything is built or run)."""
    from dlmtrt.runtime.families import get
    from dlmtrt.runtime.policies import parse_policy
    fam = get(family)
    plan = parse_policy(policy)
    blocks = block_length if fam.blockwise_schedule or plan.cache.needs_blocks else None
    try:
        params = fam.greedy(answer, steps=steps, block_length=blocks)
        if fam.new_tokens(params) != answer:
            raise UsageError(f"the answer ({answer}) is not a multiple of block_length ({blocks})",
                             field="block_length")
    except UsageError as e:
        raise UsageError(f"policy {policy}: {e} (bench: --answer {answer}, --steps {steps}, --block-length "
                         f"{block_length})", field=e.field) from None
    return params


def bench(shape: str, *, device: str = "cpu", dtype: str = "float32", backend: str = "torch-graph",
          compile: bool = False, attention: str | None = None, batch: int = 1,
          prompt: int = 512, answer: int = 256, steps: int | None = None, policies=(),
          block_length: int | None = None, seed: int = 0, quant: str | None = None, quantize_head: bool = False,
          keep_blocks: int = 0, log=print) -> BenchReport:
    """Build the shape with random weights on `device`, measure the floor, then every policy. With `quant`
    (fp8, int8-wo, w8a8) the random model is quantised first, its activation scales calibrated on a few
    random canvases (the numbers are meaningless, the speed is not); `quantize_head` quantises the head too;
    `keep_blocks` leaves the first N blocks unquantised (the bytes of `calibrate --keep-blocks N`; which blocks
    is meaningless with random weights)."""
    from dlmtrt.runtime.backends import backend_class, names_with
    from dlmtrt.runtime.policies import parse_policy

    args = shape_args(shape)
    if (quantize_head or keep_blocks) and quant is None:
        raise UsageError("--quantize-head and --keep-blocks change how --quant quantises: give --quant too")
    if not 0 <= keep_blocks < args.num_layers:
        raise UsageError(f"--keep-blocks must be between 0 and {args.num_layers - 1} for {shape}, got {keep_blocks}")
    if prompt + answer > args.max_position_embeddings:
        raise UsageError(f"prompt + answer = {prompt + answer} exceeds the shape's {args.max_position_embeddings} "
                         "positions")
    cls = backend_class(backend)
    if cls.takes != "checkpoint":
        raise UsageError(f"bench runs random weights on a model in memory: use --backend "
                         f"{' or '.join(names_with(takes='checkpoint'))}", field="backend")
    step_options = {k: v for k, v in (("compile", compile), ("attention", attention))
                    if v != {"compile": False, "attention": None}[k]}
    refused = [k for k in step_options if k not in cls.step_options]
    if refused:
        takers = [n for n in names_with(takes="checkpoint") if set(refused) <= set(backend_class(n).step_options)]
        raise UsageError(f"--{' and --'.join(refused)} apply to the {', '.join(takers)} backend", field="backend")
    if block_length is None:
        block_length = args.attention_kind.block or 32
    runs = []
    for p in policies or default_bench_policies(args.family):
        parse_policy(p).check(args.family, "low_confidence")
        runs.append((p, policy_params(args.family, p, answer, steps, block_length)))
    memory = PeakMemory(device)
    log(f"building {shape} ({count(args.param_count)} parameters) with random {dtype} weights on {device}")
    model = random_model(args, device, DTYPES[dtype], seed)
    if quant is not None:
        log(f"quantising to {quant}" + (" (head included)" if quantize_head else ""))
        quantize_random(model, quant, prompt + answer, seed, head=quantize_head, keep_blocks=keep_blocks)
    be = cls(model, **step_options)
    elem = DTYPES[dtype].itemsize
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    L = prompt + answer
    kv_bytes = 2 * args.num_layers * batch * args.num_kv_heads * L * args.head_dim * elem
    log("measuring the device copy bandwidth")
    bw = copy_bandwidth(device)
    floor_ms = weight_bytes / bw * 1e3
    gpu = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else None
    name = be.name + ("+compile" if compile else "") + (f"+{attention}" if attention in ("kernel", "sdpa") else "") + \
        (f"+{quant}" if quant else "") + ("+head" if quantize_head else "") + \
        (f"+keep{keep_blocks}" if keep_blocks else "")
    rep = BenchReport(shape, device, gpu, dtype, name, torch.__version__, args.param_count, weight_bytes,
                      kv_bytes, bw, floor_ms)
    log("timing a one-active-row step")
    rep.single_row_step_ms = step_ms(be, batch, 1, L)
    for k, (p, params) in enumerate(runs):
        log(f"running {p} ({k + 1}/{len(runs)})")
        run_policy(be, params, batch, prompt, p, seed, memory)  # warm-up: captures graphs
        r = run_policy(be, params, batch, prompt, p, seed, memory)
        rep.runs.append(replace(r, floor_ratio=r.step_ms_median / floor_ms))
    return rep


def count(n: int) -> str:
    """1234 -> '1.23 K', 7.6e9 -> '7.62 B': parameter counts of any size, readable."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def quantize_random(model: DiffusionLM, fmt: str, length: int, seed: int = 0, canvases: int = 4,
                    head: bool = False, keep_blocks: int = 0) -> None:
    """`calibration.quantize` of a random-weight model, with statistics from random fully masked canvases."""
    from dlmtrt.calibration.canvases import Canvas
    from dlmtrt.calibration.quantize import quantize
    from dlmtrt.calibration.sensitivity import block_names
    from dlmtrt.calibration.statistics import collect
    g = torch.Generator().manual_seed(seed)
    cs = [Canvas(torch.randint(0, PROMPT_IDS, (length,), generator=g).tolist(), 1.0) for _ in range(canvases)]
    with torch.inference_mode():
        stats = collect(model, cs, strata=1, pad_id=model.args.pad_token_id, batch=1, head=head)
    with torch.no_grad():
        keep = frozenset(n for i in range(keep_blocks) for n in block_names(model, i))
        quantize(model, fmt, stats, head=head, keep=keep)
