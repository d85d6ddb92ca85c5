"""Why a cache policy loses accuracy: ablations that isolate which cached rows cost it (README, "Decode
policies"). Runs on the CPU (accuracy and rows do not depend on the device).

    python -m bench.policy_ablation --out bench/results/policy-ablation.json

For LLaDA countdown (the task where Decode, prefix and dual caches lose points) it varies the refresh
interval and the rows that may be cached: only the prompt, only the answer, or both (Decode as published).
For Dream it compares dKV-Cache's shift types on sudoku, which differ in whether a row whose own token is
still masked may be cached.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from dlmtrt.evals.evaluate import evaluate
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.policies import DecodePlan, DecodeState, DKVDecode, _exact


@dataclass
class DecodeOnly(DKVDecode):
    """Diagnostic: LLaDA's Decode restricted to prompt rows (`rows='prompt'`) or to answer rows ('answer')."""

    rows: str = "prompt"
    name: str = field(default="decode-only", init=False)

    def plan(self, s: DecodeState):
        active, stable = super().plan(s)
        if s.block_step <= 1 or s.block_step % self.cache_steps == 0:
            return active, stable
        prompt = s.decoded_at < 0
        keep = prompt if self.rows == "prompt" else ~prompt
        return _exact(s, stable & keep)


def spec(policy, label: str) -> DecodePlan:
    return DecodePlan(policy, spec=label)


@click.command()
@click.option("--n", default=200, show_default=True)
@click.option("--batch-size", default=200, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(__file__).resolve().parent / "results" / "policy-ablation.json", show_default=True)
def main(n, batch_size, device, out):
    console = Console()
    runs = []
    be, tok, _ = make_backend("torch", "tiny-llada-tasks", dtype="float32", device=device)
    llada = [spec(DKVDecode(c), f"decode:cache_steps={c}") for c in (2, 4, 8)]
    llada += [spec(DecodeOnly(4, rows="prompt"), "decode, prompt rows only"),
              spec(DecodeOnly(4, rows="answer"), "decode, answer rows only"), "none"]
    for blocks in (2, 1):
        res, _ = evaluate(be, tok, "countdown:numbers=3", n, llada, batch_size=batch_size, blocks=blocks)
        runs += [{"model": "tiny-llada-tasks", **r.to_dict()} for r in res]
    be, tok, _ = make_backend("torch", "tiny-dream-tasks", dtype="float32", device=device)
    dream = ["none", "decode", "decode:shift=un_right", "decode:cache_steps=2", "pd", "pd:shift=un_right", "delayed"]
    res, _ = evaluate(be, tok, "sudoku4:clues=8-12", n, dream, batch_size=batch_size)
    runs += [{"model": "tiny-dream-tasks", **r.to_dict()} for r in res]
    t = Table(title=f"policy ablations · {device} · n={n}")
    for col in ("model", "schedule", "task", "policy", "acc", "rows/tok"):
        t.add_column(col)
    for r in runs:
        t.add_row(r["model"], r["schedule"], r["task"], str(r["policy"]), f"{r['accuracy']:.3f}",
                  f"{r['rows_per_token']:.1f}")
    console.print(t)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "n": n, "runs": runs}, indent=1) + "\n")
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
