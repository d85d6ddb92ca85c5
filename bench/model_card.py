"""Write the model card (README.md) of a shipped task checkpoint from its training.json and eval results.

    python -m bench.model_card tiny-dream-tasks

Every figure in the card is read from files under the checkpoint and bench/results/, never typed by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from dlmtrt.models.loading import SHIPPED_ALIASES, load

RESULTS = Path(__file__).resolve().parent / "results"


def _table(doc: dict, policy: str = "none") -> list[str]:
    rows = ["| task | n | accuracy | forward passes | tokens/s |", "| --- | --- | --- | --- | --- |"]
    for r in doc["results"]:
        if r["policy"] == policy:
            rows.append(f"| `{r['task']}` | {r['n']} | {r['accuracy']:.3f} | {r['forward_passes']:.0f} | "
                        f"{r['tokens_per_s']:.0f} |")
    return rows


def card(name: str, notes: str = "") -> str:
    path = SHIPPED_ALIASES[name]
    tr = json.loads((path / "training.json").read_text())
    cfg = json.loads((path / "config.json").read_text())
    args = load(name)[2].args
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    fam = tr["family"]
    block = tr.get("block_size")
    s = tr["sizes"]
    lines = [
        f"# {name}",
        "",
        f"A {tr['params'] / 1e6:.2f} M-parameter {'block' if block else 'masked'}-diffusion LM in the **{fam}** "
        f"layout ({cfg['architectures'][0]}; {'row p-1 predicts token p' if args.logits_shift else 'row p predicts token p'}"
        f"{f'; attention bidirectional inside blocks of {block} and causal across them' if block else ''}), "
        "trained by this project to give the cache-policy benchmarks a model whose confidences mean something. "
        "Loaded by alias: `dlmtrt eval -m " + name + " --task sudoku4`.",
        "",
        "## Model",
        f"- hidden {s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} heads of {s['head_dim']} "
        f"({args.num_kv_heads} K/V heads), MLP {s['intermediate_size']}, "
        f"byte-level tokenizer (vocab {args.vocab_size}) with a chat template and the mask token.",
        f"- weights: bf16 safetensors, {size / 2**20:.1f} MiB.",
        "",
        "## Data",
        "Problems drawn fresh from the task generators in `dlmtrt/evals/tasks/` (no fixed training set), mixed per batch "
        "with weights " + ", ".join(f"`{k}` {v}" for k, v in tr["mix"].items()) + ": 4x4 Sudoku with 4-12 clues, "
        "Countdown with 3-5 numbers (target last; any valid chain of operations counts), and `shift128`: copy 128 "
        "letters applying the Caesar shift given in the prompt (the long-canvas task).",
        "",
        "## Training",
        (f"Block diffusion (`dlmtrt/evals/block_diffusion.py`, SDAR's objective in BD3-LM's vectorized form): the "
         f"noisy and the clean sequence in one pass of length 2L, each noisy block of {block} attending to itself "
         "and to the clean earlier blocks; t ~ U(0, 1) per sequence (SDAR's; `--noise block` gives BD3-LM's rate per "
         "block), each answer token masked with probability t, cross-entropy on masked tokens of the noisy half "
         "weighted 1/t; the prompt is never masked. The 2L pass costs about twice a masked-diffusion step, so "
         "the GPU minutes of tiny-llada-tasks buy about half its steps." if block else
         "Masked diffusion: t ~ U(0, 1) per sequence, each answer token (EOS padding included) masked with "
         "probability t, cross-entropy on masked tokens weighted 1/t; the prompt is never masked."),
        f"- {tr['steps']} steps of batch {tr['batch']}, AdamW lr {tr['lr']} (warm-up, cosine to 10%), seed {tr['seed']}, "
        f"bf16 autocast{', torch.compile' if tr.get('compiled') else ''}.",
        f"- {tr['train_seconds'] / 60:.1f} minutes on one {tr['device']} (torch {tr['torch']}), {RUNS[fam][0]}.",
        f"- Reproduce (on the GPU machine): `OUT=out/gpu {RUNS[fam][1]} bash bench/gpu_train.sh`, or "
        f"`python -m dlmtrt.evals.train --family {fam}{f' --block-size {block}' if block else ''} --out DIR --minutes {RUNS[fam][2]}`. The budget is wall-clock, so the step "
        f"count depends on the machine; `--max-steps {tr['steps']} --minutes 60` fixes it.",
        "",
        "## Accuracy",
        (f"SDAR's greedy decoding (top_k=1, static low-confidence remasking) in blocks of {block}, one step per "
         "answer token, with the exact block cache (`append`)" if block else
         "Greedy confidence-ordered decoding of the whole answer in one block, one step per answer token, no cache")
        + f" (`dlmtrt/evals/evaluate.py`), seed 1234 of the problem generator.",
        "",
    ]
    policy = "append" if block else "none"
    cpu = [RESULTS / f"eval-{name}-cpu.json", RESULTS / f"eval-{name}-cpu-long.json"]
    if any(f.exists() for f in cpu):
        docs = [json.loads(f.read_text()) for f in cpu if f.exists()]
        rows = [r for d in docs for r in d["results"]]
        files = ", ".join(f"`bench/results/{f.name}`" for f in cpu if f.exists())
        lines += [f"On CPU (fp32, `bash bench/eval_shipped.sh`; {files}; tokens/s measured on 2 cores shared with other jobs, not a speed figure):", "", *_table({"results": rows}, policy), ""]
    gpu = RESULTS / f"eval-{name}-gpu.json"
    if gpu.exists():
        doc = json.loads(gpu.read_text())
        lines += [f"On the training GPU right after training (fp32; `bench/results/{gpu.name}`):", "",
                  *_table(doc, policy), ""]
    if block:
        lines += ["Against the bidirectional tiny-llada-tasks under dKV-Cache and Fast-dLLM's caches, and a model "
                  "trained for blocks of 16: docs/results/block-vs-cache.md.", ""]
    if notes:
        lines += ["## Known limitations", notes, ""]
    return "\n".join(lines)


# How each shipped model was trained: (GPU sharing, gpu_train.sh variables, minutes)
RUNS = {"dream": ("alone on the GPU (a second run: the first, shared with the LLaDA model, had not learnt "
                  "shift128's first letter in 8.3 minutes)", "FAMILIES=dream MINUTES=8.6", 8.6),
        "llada": ("side by side with the first Dream model on the same GPU", 'FAMILIES="dream llada" MINUTES=8.3',
                  8.3),
        "sdar": ("side by side with the blocks-of-16 model on the same GPU: the GPU minutes of tiny-llada-tasks (8.3 on an H100, "
                 "5280 steps), "
                 "which in the 2L objective are about half its steps (this model is that run's tiny-sdar-b4-tasks)", 'FAMILIES="sdar:4 sdar:16" MINUTES=8.3', 8.3)}


@click.command()
@click.argument("name", type=click.Choice(sorted(SHIPPED_ALIASES)))
@click.option("--notes", default="", help="Known limitations paragraph.")
def main(name: str, notes: str) -> None:
    (SHIPPED_ALIASES[name] / "README.md").write_text(card(name, notes))
    click.echo(f"wrote {SHIPPED_ALIASES[name] / 'README.md'}")


if __name__ == "__main__":
    main()
