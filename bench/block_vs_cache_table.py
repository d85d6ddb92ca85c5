"""The markdown table of issue 28's comparison, read from bench/block_vs_cache.py's JSON and the 8B-shape step
rates of bench/gpu_block_vs_cache.sh (`dlmtrt bench` JSON files), so that no figure is typed by hand.

    python -m bench.block_vs_cache_table bench/results/block-vs-cache-h200.json \
        --rates 'bench/results/block-vs-cache-rate-*-h200.json'

A cell's 8B step time is the bench run with the same schedule: the bidirectional policies from the LLaDA-8B run
in 2 blocks, a block model's cell from the SDAR-8B run with its block size and steps per block (the dynamic
threshold's step costs what the static step costs: the same rows, another commit rule). `8B ms/token` is that
step time times the cell's forward passes per answer token on the task: derived, not timed end to end.
"""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import click


def rates(paths: list[str]) -> dict[tuple, dict]:
    """(shape, block, steps, policy) -> the bench run, for every run in the files."""
    out = {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        for r in doc["runs"]:
            m = re.search(r"blocks of (\d+), (\d+) steps", r["schedule"])
            key = (doc["shape"], int(m[1]), int(m[2])) if m else (doc["shape"], None, None)
            out[key + (r["policy"],)] = dict(r, floor_ms=doc["floor_ms"], gpu=doc["gpu"], file=p)
    return out


def cell_rate(row: dict, table: dict) -> dict | None:
    """The bench run with this cell's schedule, or None where none was measured."""
    if row["objective"] == "masked diffusion":
        return table.get(("llada-8b", None, None, row["policy"]))
    m = re.match(r"blocks of (\d+)(?:, (\d+) steps/block)?", row["cell"])
    block = int(m[1])
    steps = int(m[2]) if m[2] else block
    return table.get(("sdar-8b", block, steps, "append"))


def markdown(doc: dict, table: dict, answer_tokens: dict[str, int]) -> str:
    lines = ["| task | model | objective | policy / schedule | accuracy | forward passes | rows / answer token | "
             "8B ms/step | 8B x floor | 8B ms/token (derived) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task in dict.fromkeys(r["task"] for r in doc["rows"]):
        for r in (r for r in doc["rows"] if r["task"] == task):
            rate = cell_rate(r, table)
            label = r["policy"] if r["objective"] == "masked diffusion" else r["cell"]
            if rate is None:
                step = ratio = per_tok = "not measured"
            else:
                step, ratio = f"{rate['step_ms_median']:.2f}", f"{rate['floor_ratio']:.2f}"
                per_tok = f"{rate['step_ms_median'] * r['forward_passes'] / answer_tokens[task]:.2f}"
            lines.append(f"| `{task}` | {Path(r['model']).name} | {r['objective']} | {label} | {r['accuracy']:.3f} | "
                         f"{r['forward_passes']:.1f} | {r['rows_per_token']:.1f} | {step} | {ratio} | {per_tok} |")
    return "\n".join(lines)


@click.command()
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--rates", "rate_glob", required=True, help="Glob of the 8B-shape bench JSON files.")
def main(results: Path, rate_glob: str) -> None:
    from dlmtrt.evals.tasks import get_task, parse_task
    doc = json.loads(results.read_text())
    paths = sorted(glob.glob(rate_glob))
    if not paths:
        raise click.UsageError(f"no bench JSON matches {rate_glob!r}: run bench/gpu_block_vs_cache.sh on the device")
    answer = {}
    for t in dict.fromkeys(r["task"] for r in doc["rows"]):
        name, diff = parse_task(t)
        task = get_task(name)
        task.problems(1, 0, **diff)
        answer[t] = task.answer_tokens
    click.echo(markdown(doc, rates(paths), answer))


if __name__ == "__main__":
    main()
