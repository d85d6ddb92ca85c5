"""Prophet's early exit (`+prophet`, the authors' algorithm) and our `+early` on the trained tiny task models
(issue 30's goal: forward passes and wall time saved against the same schedule without early exit, accuracy
within 1 point), both families:

    python -m bench.prophet_eval --device cuda --out bench/results/prophet-h200.json

Exact accuracy and forward passes for any thresholds from one decode: until it exits, a +prophet decode is
the decode without exit, so one `none` decode per problem that records, at every step, Prophet's mean answer
gap and the answer an exit there would give (`DecodeSession.prophet_trace`) says what every threshold triple
would have produced. The triples: the authors' defaults (7.5 / 5.0 / 2.5) and their multiples; the one
picked is the multiple with the fewest forward passes whose accuracy stays within 1 point of no exit on the
task of a *calibration* draw (seed 99), per task (thresholds are a request's parameters, and each of the
authors' evaluations runs with its own), reported on the evaluation draw (seed 1234, N problems). The span is
the answer's first five positions (the tasks' answers have no preamble: `answer_start` 0).

Wall time: the first `--timed` problems of each task decoded one at a time (a request's latency; a batch
would wait for its slowest sequence) with no exit, Prophet at its defaults and at the picked thresholds, and
`+early`; the timed Prophet runs must match the trace's exit steps and answers (checked). `+early`'s accuracy
and forward passes come from a batched decode of all N.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

TASKS = ("sudoku4:clues=8-12", "countdown:numbers=3", "shift128")
MODELS = ("tiny-llada-tasks", "tiny-dream-tasks")
DEFAULTS = (7.5, 5.0, 2.5)  # their early_exit_thresholds
SCALES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 16.0)
BOUND = 1.0  # points of accuracy (the goal)
CALIBRATION_SEED, EVAL_SEED = 99, 1234
console = Console(stderr=True)


def _prophet(thresholds) -> str:
    e, m, l = thresholds
    return f"none+prophet:early={e:g},mid={m:g},late={l:g}"


def trace(be, tok, task, problems, params, device, batch: int) -> list[dict]:
    """Per problem: the no-exit answer's correctness and forward passes, and per step (1-based) the mean gap and
    whether an exit there would be right."""
    from dlmtrt.runtime.decode import drive
    from dlmtrt.runtime.families import get
    from dlmtrt.runtime.generate import decode_answer
    from dlmtrt.runtime.policies import parse_policy
    fam = get(be.info.family)
    plan = parse_policy("none+prophet:early=inf,mid=inf,late=inf")
    stops = be.info.stop_ids or (be.info.eos_token_id,)
    out = []
    for start in range(0, len(problems), batch):
        part = problems[start:start + batch]
        enc = tok([p.prompt for p in part], return_tensors="pt", padding=True, padding_side="left",
                  add_special_tokens=False)
        ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        P = ids.shape[1]
        s = fam.session(be, ids, am, params, plan, answer_start_pos=P)
        s.prophet_trace = []
        x, _ = drive(s)
        final = [task.check(p, decode_answer(tok, row[P:], stops)) for p, row in zip(part, x)]
        steps_of = [int(v) for v in ((s.seq["decoded_at"][:, P:].max(1).values + 1).tolist())]
        for b, p in enumerate(part):
            per_step = []
            for step, gaps, filled in s.prophet_trace:
                if step > steps_of[b]:
                    break
                per_step.append((step, float(gaps[b]), task.check(p, decode_answer(tok, filled[b, P:], stops))))
            out.append({"final": bool(final[b]), "nfe": steps_of[b], "steps": per_step})
    return out


def simulate_one(t: dict, thresholds, total_steps: int) -> tuple[int | None, bool, int]:
    """(exit step or None, correct, forward passes) of one traced problem under +prophet at `thresholds`."""
    from dlmtrt.runtime.policies import Prophet
    p = Prophet(*thresholds)
    hit = next(((s, ok) for s, g, ok in t["steps"] if g >= p.threshold(s, total_steps)), None)
    return (None, t["final"], t["nfe"]) if hit is None else (hit[0], hit[1], hit[0])


def simulate(traced: list[dict], thresholds, total_steps: int) -> dict:
    """Accuracy, mean forward passes and exit rate of +prophet at `thresholds` from the traces."""
    runs = [simulate_one(t, thresholds, total_steps) for t in traced]
    n = len(runs)
    return {"accuracy": sum(r[1] for r in runs) / n, "forward_passes": sum(r[2] for r in runs) / n,
            "exit_rate": sum(r[0] is not None for r in runs) / n}


def timed(be, tok, task, problems, params, policy: str, device) -> dict:
    """Each problem alone: answers, exit steps, forward passes, and the median and total wall time."""
    from dlmtrt.runtime.generate import generate_text
    walls, right, nfe, exits = [], 0, 0, []
    spec = {"answer_start": 0} if "prophet" in policy else {}
    for p in problems:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        g = generate_text(be, tok, [p.prompt], policy=policy, **spec, **params)
        walls.append(time.perf_counter() - t0)
        right += task.check(p, g.texts[0])
        nfe += g.stats.seq_forward_passes
        exits.append(g.stats.exit_steps[0] if g.stats.exit_steps else None)
    n = len(problems)
    return {"n": n, "accuracy": right / n, "forward_passes": nfe / n, "median_ms": 1e3 * statistics.median(walls),
            "total_s": sum(walls), "exit_steps": exits}


def run(models, tasks, n: int, timed_n: int, device: str, batch: int, save=None) -> dict:
    from dlmtrt.evals.evaluate import evaluate
    from dlmtrt.evals.tasks import get_task, parse_task
    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.families import get
    from dlmtrt.runtime.params import greedy_params
    doc = {"models": {}}
    for model in models:
        be, tok, ck = make_backend("torch", model, device=device)
        fam = get(ck.family)
        per_task, calib = {}, {}
        for spec in tasks:
            name, diff = parse_task(spec)
            task = get_task(name)
            params = greedy_params(ck.family, task.answer_tokens, attention=be.info.attention)
            steps = params[fam.own("steps")]
            console.print(f"{model} {spec}: tracing {n} + {n} problems")
            calib[spec] = trace(be, tok, task, task.problems(n, CALIBRATION_SEED, **diff), params, device, batch)
            evald = task.problems(n, EVAL_SEED, **diff)
            per_task[spec] = {"params": params, "steps": steps, "problems": evald,
                              "trace": trace(be, tok, task, evald, params, device, batch), "task": task}
        grid = {s: tuple(round(s * d, 6) for d in DEFAULTS) for s in SCALES}
        calibration, picked = {}, {}
        for spec in tasks:
            steps = per_task[spec]["steps"]
            base = simulate(calib[spec], (float("inf"),) * 3, steps)
            scales = {str(s): simulate(calib[spec], th, steps) for s, th in grid.items()}
            ok = [s for s in SCALES if 100 * (base["accuracy"] - scales[str(s)]["accuracy"]) <= BOUND]
            picked[spec] = min(ok, key=lambda s: (scales[str(s)]["forward_passes"], s)) if ok else None
            calibration[spec] = {"no_exit": base, "scales": scales, "picked_scale": picked[spec],
                                 "picked": grid.get(picked[spec])}
        rows = {}
        for spec in tasks:
            t = per_task[spec]
            pk = picked[spec]
            cells = {"none": simulate(t["trace"], (float("inf"),) * 3, t["steps"]),
                     "prophet defaults": simulate(t["trace"], DEFAULTS, t["steps"])}
            if pk is not None:
                cells["prophet calibrated"] = {**simulate(t["trace"], grid[pk], t["steps"]), "scale": pk,
                                               "thresholds": grid[pk]}
            console.print(f"{model} {spec}: +early, N={n}")
            res, _ = evaluate(be, tok, spec, n, ["none+early"], seed=EVAL_SEED, batch_size=batch)
            cells["early"] = {"accuracy": res[0].accuracy, "forward_passes": res[0].forward_passes,
                              "early_committed": res[0].early_committed}
            sub = t["problems"][:timed_n]
            policies = {"none": "none", "prophet defaults": _prophet(DEFAULTS), "early": "none+early"}
            if pk is not None:
                policies["prophet calibrated"] = _prophet(grid[pk])
            timing = {}
            for label, pol in policies.items():
                console.print(f"{model} {spec}: {label}, {len(sub)} problems one at a time")
                timing[label] = timed(be, tok, t["task"], sub, t["params"], pol, device)
                if label.startswith("prophet"):  # the timed runs are the traced ones, exit for exit
                    th = DEFAULTS if label == "prophet defaults" else grid[pk]
                    want = [simulate_one(tr, th, t["steps"]) for tr in t["trace"][:timed_n]]
                    got = timing[label]
                    if [w[0] for w in want] != got["exit_steps"] or \
                            abs(sum(w[1] for w in want) / len(want) - got["accuracy"]) > 1e-9:
                        raise AssertionError(f"{model} {spec} {label}: the timed runs exited at {got['exit_steps']}, "
                                             f"the trace says {[w[0] for w in want]}")
            rows[spec] = {"params": t["params"], "steps": t["steps"], "cells": cells, "timed": timing}
        doc["models"][model] = {"family": ck.family, "calibration": {"seed": CALIBRATION_SEED, "n": n,
                                                                    "tasks": calibration},
                                "tasks": rows}
        if save is not None:
            save(doc)  # each model's rows as soon as they are measured
        del be
    return doc


@click.command()
@click.option("--model", "models", multiple=True, default=MODELS, show_default=True)
@click.option("--task", "tasks", multiple=True, default=TASKS, show_default=True)
@click.option("--n", default=200, show_default=True)
@click.option("--timed", "timed_n", default=50, show_default=True, help="Problems per task decoded one at a time.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=200, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="The JSON to write (required to run).")
@click.option("--render", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Run nothing: print a stored result as the Markdown table of docs/results/prophet.md.")
def main(models, tasks, n, timed_n, device, batch_size, out, render):
    if render is not None:
        click.echo(markdown(json.loads(render.read_text())))
        return
    if out is None:
        raise click.UsageError("give --out FILE to run, or --render FILE to print a stored result")
    from dlmtrt.paths import check_output_file
    check_output_file(out)
    t0 = time.perf_counter()

    def save(doc: dict) -> None:
        doc.update(device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                   torch=torch.__version__, n=n, timed=timed_n, eval_seed=EVAL_SEED, bound_points=BOUND,
                   defaults=DEFAULTS, scales=SCALES, wall_s=round(time.perf_counter() - t0, 1),
                   command="python -m bench.prophet_eval " + " ".join(sys.argv[1:]))
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")
    doc = run(list(models), list(tasks), n, timed_n, device, batch_size, save)
    print_table(doc)
    console.print(f"results: {out}")


def markdown(doc: dict) -> str:
    """The stored result as a Markdown table: N-problem accuracy and forward passes, and the timed subset."""
    lines = ["| model | task | cell | thresholds (early/mid/late) | accuracy | Δ pts | forward passes | saved | "
             f"timed ({doc['timed']} alone): median ms | total s | vs none |", "| --- " * 11 + "|"]
    for model, m in doc["models"].items():
        for spec, r in m["tasks"].items():
            base, tb = r["cells"]["none"], r["timed"]["none"]
            for label, c in r["cells"].items():
                tm = r["timed"].get(label)
                th = {"prophet defaults": doc["defaults"]}.get(label, c.get("thresholds"))
                ths = "/".join(f"{v:g}" for v in th) if th else ""
                lines.append(f"| `{model}` | `{spec}` | {label} | {ths} | {c['accuracy']:.3f} | "
                             f"{100 * (c['accuracy'] - base['accuracy']):+.1f} | {c['forward_passes']:.1f} | "
                             f"{1 - c['forward_passes'] / base['forward_passes']:.0%} | "
                             + (f"{tm['median_ms']:.1f} | {tm['total_s']:.2f} | {tm['total_s'] / tb['total_s']:.2f}x |"
                                if tm else " | | |"))
    return "\n".join(lines)


def print_table(doc: dict) -> None:
    t = Table(title=f"Prophet and +early, N={doc['n']}, {doc['device']}")
    for c in ("model", "task", "cell", "acc", "Δ pts", "NFE", "NFE saved", "timed ms (median)", "vs none"):
        t.add_column(c, justify="right")
    for model, m in doc["models"].items():
        for spec, r in m["tasks"].items():
            base, tb = r["cells"]["none"], r["timed"]["none"]
            for label, c in r["cells"].items():
                tm = r["timed"].get(label)
                t.add_row(model, spec, label, f"{c['accuracy']:.3f}", f"{100 * (c['accuracy'] - base['accuracy']):+.1f}",
                          f"{c['forward_passes']:.1f}", f"{1 - c['forward_passes'] / base['forward_passes']:.0%}",
                          f"{tm['median_ms']:.1f}" if tm else "", f"{tm['median_ms'] / tb['median_ms']:.2f}x" if tm else "")
    Console().print(t)


if __name__ == "__main__":
    main()
