"""Step inputs from a real denoising trajectory, for comparing backends (Polygraphy) and for calibration.

Random step inputs (dlmtrt/export/checks.py) exercise shapes; they do not look like what a backend sees when it
decodes: a cache whose rows hold the K/V of real tokens, stable masks chosen by a cache policy, a few
active rows late in a block, left padding. `record_feeds` runs the PyTorch backend through the real decode
loop (`dlmtrt.runtime.generate.generate_text`) under a `RecordingBackend`, which forwards every step unchanged and
keeps its `StepInputs` as a feed dict: numpy arrays keyed by the graph's input names, in the graph's order
(`dlmtrt.runtime.contract.input_names`), which is the form Polygraphy runners and ONNX Runtime take.

Default prompts: a checkpoint trained on the task generators (the shipped `tiny-*-tasks`, recognised by the
`mix` in its training.json) gets one `sudoku4` and one 3-number `countdown` problem in one batch (different
prompt lengths, so the batch is left padded), decoded greedily over sudoku4's 20-token answer canvas; any other
model gets two short generic prompts. Each policy's trajectory is recorded whole, then `steps_per_policy`
steps evenly spaced over it are kept (first and last included), so early steps (nothing stable, every row
active) and late ones (mostly stable cache, few active rows) both occur.

Feeds are saved in Polygraphy's JSON format (`save_feeds`), so the same file also works with
`polygraphy run --load-inputs FILE`.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from dlmtrt.errors import UsageError
from dlmtrt.runtime.contract import StepInputs, StepOutputs, named_inputs

DEFAULT_POLICIES = ("none", "decode", "dual+parallel")  # full and partial active sets, empty and filled stable masks


def default_policies(family: str) -> tuple[str, ...]:
    """The policies whose trajectories a comparison records: DEFAULT_POLICIES, or for a block-causal family
    (whose cache is exact) no cache and its own."""
    from dlmtrt.runtime.families import get
    fam = get(family)
    return ("none", fam.default_policy) if fam.block_causal else DEFAULT_POLICIES
DEFAULT_STEPS_PER_POLICY = 6
# different prompt lengths (the batch is left padded); the canvas is sudoku4's 20 answer tokens, which also
# holds every 3-number countdown answer
TASK_PROMPTS = ("sudoku4", "countdown:numbers=3")
GENERIC_PROMPTS = ("The capital of France is", "Hello")
GENERIC_NEW_TOKENS = 16


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy().copy()  # the loop may reuse or overwrite its buffers after the step


def feed_of(s: StepInputs) -> OrderedDict:
    """A `StepInputs` as a feed dict of numpy arrays in the graph's input order."""
    return OrderedDict((name, _numpy(t)) for name, t in named_inputs(s).items())


class RecordingBackend:
    """A `StepBackend` that forwards every step to `backend` and keeps each step's inputs as a feed dict."""

    selects_logit_rows = False  # every active row's logits: the feed is the whole step

    def __init__(self, backend, limit: int | None = None):
        self.backend = backend
        self.shares_cache = backend.shares_cache  # its caches are the wrapped backend's
        self.info = backend.info
        self.name = f"recording({backend.name})"
        self.limit = limit
        self.feeds: list[OrderedDict] = []

    def new_cache(self, batch: int, length: int):
        return self.backend.new_cache(batch, length)

    def step(self, inputs: StepInputs) -> StepOutputs:
        if self.limit is None or len(self.feeds) < self.limit:
            self.feeds.append(feed_of(inputs))
        return self.backend.step(inputs)


def _trained_on_tasks(ck) -> bool:
    try:
        mix = json.loads((Path(ck.path) / "training.json").read_text()).get("mix", {})
    except (OSError, ValueError, AttributeError):
        return False
    return all(spec.split(":")[0] in mix for spec in TASK_PROMPTS)


def default_prompts(ck, family: str, seed: int = 0) -> tuple[list[str], dict]:
    """(prompts, generation params) for a checkpoint: task problems for task-trained models, else generic."""
    from dlmtrt.evals.tasks import get_task, parse_task
    from dlmtrt.runtime.params import greedy_params
    if ck is not None and _trained_on_tasks(ck):
        prompts = []
        for spec in TASK_PROMPTS:
            name, diff = parse_task(spec)
            prompts.append(get_task(name).problems(1, seed, **diff)[0].prompt)
        return prompts, greedy_params(family, get_task(parse_task(TASK_PROMPTS[0])[0]).answer_tokens)
    # block-wise schedules (LLaDA) in two blocks, so block policies see a block change
    from dlmtrt.runtime.families import get
    blocks = 2 if get(family).blockwise_schedule else None
    return list(GENERIC_PROMPTS), greedy_params(family, GENERIC_NEW_TOKENS, steps=GENERIC_NEW_TOKENS // 2,
                                                blocks=blocks, alg="entropy")


def spread(items: list, k: int | None) -> list:
    """`k` items evenly spaced over `items` (first and last included); all of them when k is None or larger."""
    if k is None or k >= len(items):
        return list(items)
    if k <= 0:
        return []
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in idx]


def record_feeds(backend, tokenizer, ck=None, *, policies=DEFAULT_POLICIES,
                 steps_per_policy: int | None = DEFAULT_STEPS_PER_POLICY, prompts: list[str] | None = None,
                 params: dict | None = None, seed: int = 0, log=None) -> list[OrderedDict]:
    """Feed dicts of the steps of real trajectories: one greedy decode per policy over the same prompts."""
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.policies import parse_policy
    for p in policies:
        parse_policy(p)
    if prompts is None or params is None:
        dp, dparams = default_prompts(ck, backend.info.family, seed)
        prompts = list(prompts) if prompts is not None else dp
        params = params if params is not None else dparams
    max_positions = ck.args.max_position_embeddings if ck is not None else None
    feeds: list[OrderedDict] = []
    for spec in policies:
        rec = RecordingBackend(backend)
        torch.manual_seed(seed)
        g = generate_text(rec, tokenizer, list(prompts), policy=spec, max_positions=max_positions, **params)
        kept = spread(rec.feeds, steps_per_policy)
        if log is not None:
            log(f"policy {spec}: {g.stats.steps} steps recorded, {len(kept)} kept "
                f"(active rows {sorted({f['input_ids'].shape[1] for f in kept})}, canvas "
                f"{kept[0]['stable_mask'].shape[1] if kept else 0})")
        feeds += kept
    return feeds


def trajectory_feeds(model: str, *, policies=DEFAULT_POLICIES,
                     steps_per_policy: int | None = DEFAULT_STEPS_PER_POLICY, prompts: list[str] | None = None,
                     seed: int = 0, device: str = "cpu", log=None) -> list[OrderedDict]:
    """Load `model` in fp32 with the torch backend and record the feeds of its trajectories."""
    from dlmtrt.models.loading import load
    from dlmtrt.runtime.backends.torch_backend import TorchBackend
    m, tok, ck = load(model, dtype="float32", device=device)
    return record_feeds(TorchBackend(m), tok, ck, policies=policies, steps_per_policy=steps_per_policy,
                        prompts=prompts, seed=seed, log=log)


def save_feeds(path: str | Path, feeds: list) -> Path:
    """Polygraphy's JSON input format (a list of feed dicts): also readable by `polygraphy run --load-inputs`."""
    from polygraphy.json import save_json
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json([OrderedDict(f) for f in feeds], str(path), description="dlmtrt trajectory step inputs")
    return path


def load_feeds(path: str | Path) -> list[OrderedDict]:
    from polygraphy.json import load_json
    try:
        feeds = load_json(str(path), description="dlmtrt trajectory step inputs")
    except (ValueError, TypeError, KeyError, OSError) as e:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"{path} is not a readable step-inputs file ({type(e).__name__}: {str(e)[:200]}); write "
                         "it with `dlmtrt compare --save-inputs`") from None
    if not isinstance(feeds, list) or not all(isinstance(f, dict) for f in feeds):
        raise UsageError(f"{path} does not hold a list of feed dicts (write it with `dlmtrt compare "
                         "--save-inputs` or dlmtrt.evals.trajectory.save_feeds)")
    return [OrderedDict(f) for f in feeds]


def describe(feeds: list) -> dict:
    """Coverage of a feed list: counts of steps with partial active rows, stable rows, padding."""
    partial = sum(f["input_ids"].shape[1] < f["stable_mask"].shape[1] for f in feeds)
    stable = sum(bool(f["stable_mask"].any()) for f in feeds)
    padded = sum(bool((~f["attention_mask"]).any()) for f in feeds)
    return {"feeds": len(feeds), "partial_active": partial, "with_stable_rows": stable, "padded": padded}
