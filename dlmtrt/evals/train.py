"""Training of the tiny task models: masked diffusion (Dream-style with logits shift, or LLaDA-style) for the
bidirectional families, block diffusion (block_diffusion.py) for the block-causal ones (SDAR's layout).

Objective (LLaDA / Dream SFT): per sequence t ~ U(0, 1); every answer token (EOS padding included) is
masked with probability t; cross-entropy on the masked answer tokens, weighted 1/t, normalised by the
answer length. The prompt is never masked. Problems are drawn fresh from the task generators, so the
models never see a fixed training set. Reproducible with --seed; one run is bounded by --minutes.

    python -m dlmtrt.evals.train --family dream --out checkpoints/tiny-dream-tasks --minutes 8
    python -m dlmtrt.evals.train --family sdar --block-size 4 --out checkpoints/tiny-sdar-tasks --minutes 8

Block diffusion masks the same way with the same weighting, but each block of the noisy canvas is predicted while
attending to itself and to the clean earlier blocks only (one pass over [x_t | x_0]).
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from dlmtrt.evals.block_diffusion import NOISE, block_diffusion_logits, masking_rates
from dlmtrt.evals.tasks import TASKS
from dlmtrt.models.families import FAMILIES
from dlmtrt.models.tiny import build_tokenizer, save_checkpoint, tiny_args, tiny_vocabulary
from dlmtrt.models.transformer import DiffusionLM

console = Console()
MIX = {"sudoku4": 0.15, "countdown": 0.5, "shift128": 0.35}
MAX_POSITIONS = 512
CHAT_SHOTS = 2  # solved problems before a chat's last turn, at most (the shared-prefix workload's)
SIZES = dict(hidden_size=256, intermediate_size=768, num_layers=6, num_heads=8, head_dim=32)
# block-causal task models are compared with tiny-llada-tasks at its size: as many K/V heads as query heads
BLOCK_SIZES = {**SIZES, "num_kv_heads": SIZES["num_heads"]}


class Encoder:
    """Byte-level encoding of task text with the tiny tokenizer (every byte is one token), and of chats with the
    family's chat template exactly as a served or evaluated chat is tokenized (runtime/bicache._template)."""

    def __init__(self, family: str):
        self.family = family
        self.tok = build_tokenizer(family)
        self.vocab, self.ids = tiny_vocabulary(family, self.tok)
        self._hf = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def chat(self, messages: list[dict]) -> list[int]:
        from transformers import PreTrainedTokenizerFast

        from dlmtrt.runtime.bicache import _template
        if self._hf is None:
            fam = FAMILIES[self.family]
            self._hf = PreTrainedTokenizerFast(tokenizer_object=self.tok, chat_template=fam.CHAT_TEMPLATE,
                                               **{k: v for k, v in fam.TOKEN_ROLES.items() if v is not None})
        return _template(self._hf, messages)


def chat_prompt(task, problem, rng: random.Random, room: int, enc: Encoder) -> list[int]:
    """A chat prompt for `problem` in the shapes the shared-prefix workloads ask (evals/shared_prefix.py,
    evals/bicache_profile.py): an optional system instruction (the workload's, the profiler's or none), then 0-2
    solved problems of the task as earlier turns, then the problem; shots are dropped while the canvas (prompt
    + `room` answer tokens) would pass the model's positions."""
    from dlmtrt.evals.bicache_profile import INSTRUCTIONS as PROFILE_INSTRUCTIONS
    from dlmtrt.evals.shared_prefix import INSTRUCTIONS
    u = rng.random()
    system = INSTRUCTIONS.get(task.name) if u < 0.4 else rng.choice(PROFILE_INSTRUCTIONS) if u < 0.7 else None
    shots = [task.sample(rng) for _ in range(rng.randint(0, CHAT_SHOTS))]
    while True:
        msgs = [{"role": "system", "content": system}] if system else []
        for s in shots:
            msgs += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}]
        ids = enc.chat(msgs + [{"role": "user", "content": problem.prompt}])
        if len(ids) + room <= MAX_POSITIONS or not shots:
            return ids
        shots.pop()


def make_batch(enc: Encoder, task, rng: random.Random, batch: int, device, chat: bool = False
               ) -> tuple[torch.Tensor, ...]:
    """(x0 [B, P+A], attention_mask, answer_mask) with prompts left-padded and answers EOS-padded to A; `chat`:
    every prompt a chat (chat_prompt), else the bare task prompt."""
    A = task.answer_tokens
    rows = []
    for _ in range(batch):
        p = task.sample(rng)
        a = enc.encode(p.answer)[:A]
        prompt = chat_prompt(task, p, rng, A, enc) if chat else enc.encode(p.prompt)
        rows.append((prompt, a + [enc.ids["eos"]] * (A - len(a))))
    P = max(len(r[0]) for r in rows)
    x = torch.full((batch, P + A), enc.ids["pad"], dtype=torch.long)
    am = torch.zeros(batch, P + A, dtype=torch.bool)
    for i, (pr, an) in enumerate(rows):
        x[i, P - len(pr): P] = torch.tensor(pr)
        x[i, P:] = torch.tensor(an)
        am[i, P - len(pr):] = True
    ans = torch.zeros_like(am)
    ans[:, P:] = True
    return x.to(device), am.to(device), ans.to(device)


class Batches(torch.utils.data.IterableDataset):
    """Endless batches of freshly generated problems; each DataLoader worker draws from its own seed."""

    def __init__(self, family: str, batch: int, seed: int, chats: float = 0.0):
        self.family, self.batch, self.seed, self.chats = family, batch, seed, chats

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(f"{self.seed}:{info.id if info else 0}")
        enc = Encoder(self.family)
        names, weights = list(MIX), list(MIX.values())
        while True:
            task = TASKS[rng.choices(names, weights)[0]]
            chat = rng.random() < self.chats
            yield (*make_batch(enc, task, rng, self.batch, "cpu", chat), task.name + (" chat" if chat else ""))


def diffusion_loss(logits_fn, shift: bool, x0, am, ans, mask_id: int, g: torch.Generator, block: int | None = None,
                   noise: str = "sequence") -> torch.Tensor:
    """The loss of either objective. `logits_fn(xt, x0, am)` gives the noisy canvas's logits: the model's cache-free
    full pass (`DiffusionLM.full_logits`, masked diffusion) or `block_diffusion_logits` (block diffusion, `block`
    its block size), possibly compiled. Answer tokens are masked with their row's rate (`masking_rates`: one per
    sequence, or per block), the prompt never."""
    t = masking_rates(ans, am, block, noise, g)
    masked = (torch.rand(x0.shape, device=x0.device, generator=g) < t) & ans
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = logits_fn(xt, x0, am)
    if shift:  # row p-1 predicts token p
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")
    return ((ce * masked / t).sum(1) / ans.sum(1)).mean()


def objective(model: DiffusionLM):
    """The model's training pass `(xt, x0, am) -> logits`: block diffusion for a block-causal model (its cache is
    exact because it was trained so), masked diffusion over the whole canvas otherwise."""
    if model.args.attention_kind.block:
        return lambda xt, x0, am: block_diffusion_logits(model, xt, x0, am)
    return lambda xt, x0, am: model.full_logits(xt, am)


@click.command()
@click.option("--family", type=click.Choice(list(FAMILIES)), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--minutes", default=8.0, show_default=True, help="Wall-clock budget of the training loop.")
@click.option("--max-steps", default=100_000, show_default=True)
@click.option("--batch", default=1024, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--workers", default=8, show_default=True, help="Processes generating problems.")
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="torch.compile the training pass on CUDA (falls back to eager if compilation fails).")
@click.option("--block-size", type=click.IntRange(1, 512), default=None,
              help="Block-causal families (sdar): the block size trained for, which the checkpoint records "
                   "[default: the family's tiny block, 4]. The objective is block diffusion.")
@click.option("--noise", type=click.Choice(NOISE), default="sequence", show_default=True,
              help="Block diffusion: one masking rate per sequence (SDAR's) or per block (BD3-LM's).")
@click.option("--init", "init", default=None,
              help="Fine-tune this checkpoint (directory or alias: a task model of the same family and shape) instead of starting "
                   "from random weights.")
@click.option("--chats", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of batches whose prompts are chats (an optional system instruction and 0-2 solved "
                   "problems as earlier turns, in the family's chat template): the shared-prefix workloads.")
def main(family, out, minutes, max_steps, batch, lr, seed, device, workers, compile_, block_size, noise, init,
         chats):
    """Train one tiny task model and save it (bf16, HF layout, with tokenizer) to OUT: masked diffusion for a
    bidirectional family, block diffusion (dlmtrt/evals/block_diffusion.py) for a block-causal one."""
    from dlmtrt.errors import UsageError
    try:
        train(family, out, minutes=minutes, max_steps=max_steps, batch=batch, lr=lr, seed=seed, device=device,
              workers=workers, compile_=compile_, block_size=block_size, noise=noise, init=init, chats=chats)
    except UsageError as e:
        raise click.UsageError(str(e)) from None


def model_args(family: str, enc: Encoder, block_size: int | None = None, noise: str = "sequence", sizes=None):
    """The task model's architecture; `block_size` sets a block-causal family's block (refused for the others)."""
    from dataclasses import replace

    from dlmtrt.errors import UsageError
    args = tiny_args(family, enc.vocab, enc.ids, max_position_embeddings=MAX_POSITIONS, **(sizes or SIZES))
    block_causal = bool(args.attention_kind.block)
    if block_causal and sizes is None:
        args = replace(args, num_kv_heads=BLOCK_SIZES["num_kv_heads"])
    if block_size is not None and not block_causal:
        raise UsageError(f"--block-size is for block-causal families; {family} attends bidirectionally and trains "
                         "with masked diffusion", field="block_size")
    if noise != "sequence" and not block_causal:
        raise UsageError(f"--noise {noise} is for block diffusion; {family} trains with masked diffusion",
                         field="noise")
    return replace(args, attention=f"block_causal:{block_size}") if block_size else args


def initial_model(args, init: str | None, family: str, device: str) -> DiffusionLM:
    """Random weights (normal, std 0.02), or the weights of `init`, whose family and shape must be the ones this
    run trains (refused in one line otherwise, before any training). A special id that `init`'s config does not
    record (tiny-llada-tasks predates bos_token_id in the config) is taken from the tokenizer."""
    from dlmtrt.errors import UsageError
    from dlmtrt.models.loading import load_weights, open_checkpoint
    if init is None:
        model = DiffusionLM(args).to(device)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() == 2:
                    torch.nn.init.normal_(p, std=0.02)
                elif "bias" in n:
                    p.zero_()
        return model
    ck = open_checkpoint(str(init))
    diff = sorted(k for k in vars(args) if getattr(ck.args, k, None) != getattr(args, k)
                  and not (k.endswith("_token_id") and getattr(ck.args, k, None) is None))  # older configs lack bos
    if ck.family != family or diff:
        raise UsageError(f"--init {init} is a {ck.family} model that differs from the {family} task model this run "
                         f"trains in {', '.join(diff) or 'its family'}: fine-tune a checkpoint of the same family "
                         "and shape", field="init")
    return load_weights(ck, torch.float32, torch.device(device)).requires_grad_(True).train()  # loaded for inference


def train(family: str, out: Path, *, minutes: float = 8.0, max_steps: int = 100_000, batch: int = 1024,
          lr: float = 2e-3, seed: int = 0, device: str = "cuda", workers: int = 8, compile_: bool = True,
          block_size: int | None = None, noise: str = "sequence", sizes: dict | None = None,
          init: str | None = None, chats: float = 0.0) -> dict:
    """One training run (from random weights, or fine-tuning `init`); returns what it writes to
    OUT/training.json."""
    torch.manual_seed(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    enc = Encoder(family)
    args = model_args(family, enc, block_size, noise, sizes)
    block = args.attention_kind.block
    model = initial_model(args, init, family, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    loader = iter(torch.utils.data.DataLoader(Batches(family, batch, seed, chats), batch_size=None, num_workers=workers,
                                              prefetch_factor=4 if workers else None, persistent_workers=bool(workers)))
    eager = objective(model)
    logits_fn = torch.compile(eager, dynamic=True) if compile_ and torch.device(device).type == "cuda" else eager
    budget = minutes * 60
    warmup = 300
    log, t0, step = [], time.perf_counter(), 0
    what = f"block diffusion, blocks of {block}, noise per {noise}" if block else "masked diffusion"
    console.print(f"[bold]{family}[/]: {args.param_count / 1e6:.2f} M parameters, {what}, batch {batch}, "
                  f"budget {minutes} min")
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as prog:
        bar = prog.add_task("training", total=budget)
        while step < max_steps:
            elapsed = time.perf_counter() - t0
            if elapsed > budget:
                break
            frac = min(1.0, elapsed / budget)
            cur = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = cur
            x0, am, ans, task_name = next(loader)
            x0, am, ans = x0.to(device, non_blocking=True), am.to(device), ans.to(device)
            loss_of = lambda fn: diffusion_loss(fn, args.logits_shift, x0, am, ans, args.mask_token_id, g,  # noqa: E731
                                                block, noise)
            with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                                enabled=torch.device(device).type == "cuda"):
                try:
                    loss = loss_of(logits_fn)
                except Exception as e:  # noqa: BLE001
                    if logits_fn is eager:
                        raise
                    console.print(f"[yellow]torch.compile failed ({type(e).__name__}: {e}); training eagerly")
                    logits_fn = eager
                    loss = loss_of(logits_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if step % 100 == 0:
                log.append({"step": step, "s": round(elapsed, 1), "task": task_name, "loss": round(loss.item(), 4),
                            "lr": cur})
                prog.update(bar, completed=elapsed, description=f"step {step} loss {loss.item():.3f}")
    train_s = time.perf_counter() - t0
    sd = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items() if k != "inv_freq"}
    save_checkpoint(out, args, sd, enc.tok)
    info = {"family": family, "params": args.param_count, "steps": step, "batch": batch, "lr": lr, "seed": seed,
            "objective": "block diffusion" if block else "masked diffusion", "block_size": block,
            "noise": noise if block else None, "init": str(init) if init else None, "chats": chats,
            "train_seconds": round(train_s, 1), "mix": MIX,
            "sizes": sizes or (BLOCK_SIZES if block else SIZES), "compiled": logits_fn is not eager,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "log": log}
    (Path(out) / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    console.print(f"saved {out}: {step} steps in {train_s:.0f} s, last loss {log[-1]['loss'] if log else 'n/a'}")
    return info


if __name__ == "__main__":
    main()
