"""Compact markdown of the policy tables (bench/results/policies-<model>-<device>.json) for the README.

    python -m bench.policy_markdown --device cuda > /tmp/table.md

One table per model, one row per (schedule, policy), one cell per task: accuracy · forward passes ·
rows/token · tokens/s.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from dlmtrt.runtime.policies import CACHE_POLICIES

RESULTS = Path(__file__).resolve().parent / "results"


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


@click.command()
@click.option("--device", default="cuda", show_default=True)
@click.option("--model", "models", multiple=True, default=["tiny-dream-tasks", "tiny-llada-tasks"], show_default=True)
def main(device, models):
    for model in models:
        d = json.loads((RESULTS / f"policies-{model}-{device}.json").read_text())
        tasks = list(dict.fromkeys(r["task"] for r in d["results"]))
        by = {(r["schedule"], r["task"], r["policy"]): r for r in d["results"]}
        n = d["results"][0]["n"]
        click.echo(f"**{model}** ({d.get('gpu') or device}, torch {d['torch']}, fp32, n={n} per task, batch "
                   f"{d.get('batch_size', '?')}): accuracy · forward passes · rows/token · tokens/s\n")
        click.echo("| schedule | policy | " + " | ".join(tasks) + " |")
        click.echo("| --- | --- |" + " --- |" * len(tasks))
        measured = dict.fromkeys((r["schedule"], r["policy"]) for r in d["results"])
        dropped = list(dict.fromkeys(p for _, p in measured if p.split("+")[0].split(":")[0] not in CACHE_POLICIES))
        for sched, pol in measured:
            if pol in dropped:
                continue
            cells = []
            for t in tasks:
                r = by.get((sched, t, pol))
                cells.append("" if r is None else f"{r['accuracy']:.3f} · {r['forward_passes']:.1f} · "
                             f"{r['rows_per_token']:.1f} · {_k(r['tokens_per_s'])}")
            click.echo(f"| {sched} | `{pol}` | " + " | ".join(cells) + " |")
        if dropped:
            click.echo(f"\nMeasured in the same run, then dropped (no longer a policy): {', '.join(dropped)}.")
        click.echo("")


if __name__ == "__main__":
    main()
