"""bench/bicache_accuracy.py: its bound check (including the vacuous case), its refusals before any weights load,
and one small run whose cells, depths and deltas follow from the evaluator's rows and the model's table."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.bicache_accuracy import BOUND_POINTS, PREFIXES, _prefix_specs, derive, run
from dlmtrt.errors import UsageError

FIX = Path(__file__).resolve().parent / "fixtures" / "upstream"


def _row(cell, acc, policy="none", task="t"):
    return {"cell": cell, "accuracy": acc, "policy": policy, "task": task, "delta_points": None,
            "shared_prefix": None if cell == "bare prompt" else "shots=1"}


def test_the_bound_check_is_ok_over_or_vacuous():
    step = BOUND_POINTS / 100
    doc = derive({"rows": [_row("bare prompt", 1.0), _row("no reuse", 0.5), _row("BiCache i16", 0.5 - step),
                           _row("BiCache i1", 0.5 - 2 * step), _row("freeze", 0.1),
                           _row("no reuse", 0.0, "dual"), _row("BiCache i16", 0.0, "dual"),
                           {**_row("BiCache i1", 0.0, "dual"), "within_bound": True},
                           _row("no reuse", 0.7, task="u"), {**_row("BiCache i16", 0.7, task="u"),
                                                             "bicache_depths": {"none": 3}}]})
    got = [(r["cell"], r["policy"], r["delta_points"], r.get("bound_check")) for r in doc["rows"]]
    assert got == [("bare prompt", "none", None, None), ("no reuse", "none", 0.0, None),
                   ("BiCache i16", "none", round(-BOUND_POINTS, 2), "ok"),
                   ("BiCache i1", "none", round(-2 * BOUND_POINTS, 2), "over"), ("freeze", "none", -40.0, "over"),
                   ("no reuse", "dual", 0.0, None), ("BiCache i16", "dual", 0.0, "vacuous"),
                   ("BiCache i1", "dual", 0.0, "vacuous"), ("no reuse", "none", 0.0, None),
                   ("BiCache i16", "none", 0.0, "not reused")]
    assert "within_bound" not in doc["rows"][-1]


def test_bad_input_is_refused_before_the_weights_load():
    with pytest.raises(UsageError, match="give TASK=SPEC"):
        _prefix_specs(("shift128",))
    with pytest.raises(UsageError, match="neither 'instruction', 'shots=N' nor 'lead'"):
        _prefix_specs(("shift128=instructions",))
    with pytest.raises(UsageError, match="unknown task"):
        run("tiny-llada-tasks", ["sudoku5"], PREFIXES, 1, 1, "cpu", 1234, 16, None)
    with pytest.raises(UsageError, match="has no BiCache depth table"):
        run(str(FIX / "ckpt-llada"), ["sudoku4"], PREFIXES, 1, 1, "cpu", 1234, 16, None)


def test_a_small_run_has_every_cell_at_the_tables_depth():
    from dlmtrt.evals.shared_prefix import parse_shared_prefix
    from dlmtrt.evals.tasks import get_task
    from dlmtrt.models.loading import load
    from dlmtrt.runtime.bicache import prefix_ratio
    from dlmtrt.runtime.bicache_table import read_table
    torch.set_num_threads(1)
    doc = run("tiny-llada-tasks", ["sudoku4"], PREFIXES, 2, 2, "cpu", 1234, 16, None, log=lambda *_: None)
    cells = ["no reuse", "BiCache i16", "BiCache i1", "freeze"]
    assert [(r["workload"], r["policy"], r["cell"]) for r in doc["rows"]] == [
        (w, p, c) for w in ("chat", "lead") for p in ("none", "dual") for c in (["bare prompt"] if w == "chat" else [])
        + cells]
    _, tok, ck = load("tiny-llada-tasks", dtype="float32", device="cpu")
    table, _ = read_table(Path(ck.path) / "bicache.json", 6)
    task = get_task("sudoku4")
    depth = {}
    for w, spec in (("chat", PREFIXES["sudoku4"]), ("lead", "lead")):
        ids, P = parse_shared_prefix(spec).encode(tok, task, {}, task.problems(1, 1234))[0]
        depth[w] = table.depth(prefix_ratio(P, len(ids) + task.answer_tokens), 6)
        assert [x["prefix_tokens"] for x in doc["workloads"] if x["workload"] == w] == [P]
    assert depth["chat"] > depth["lead"]  # a longer prefix, a deeper reuse
    for r in doc["rows"]:
        base = next(b for b in doc["rows"] if b["policy"] == r["policy"] and b["cell"] == "no reuse"
                    and b["workload"] == r["workload"])
        ids, P = parse_shared_prefix(r["shared_prefix"] or "lead").encode(tok, task, {}, task.problems(1, 1234))[0]
        if r["cell"].startswith("BiCache"):
            d = depth[r["workload"]]
            assert r["bicache_depths"] == {str(d): 2} and r["depth_fraction"] == {str(d): d / 6}
            assert r["delta_points"] == round(100 * (r["accuracy"] - base["accuracy"]), 2) and "bound_check" in r
        if r["cell"].startswith("BiCache"):
            assert r["prefix_rows_served"] == pytest.approx(P / len(ids))  # exactly the shared prefix
        if r["cell"] == "freeze":
            assert r["prefix_rows_served"] >= (P // r["freeze_block"]) * r["freeze_block"] / len(ids) > 0  # warmed
        assert (r["shared_prefix"] is None) == (r["cell"] == "bare prompt")
    lead = [r for r in doc["rows"] if r["workload"] == "lead" and r["cell"] == "no reuse"]
    bare = [r for r in doc["rows"] if r["cell"] == "bare prompt"]
    assert [r["accuracy"] for r in lead] == [r["accuracy"] for r in bare]  # the lead's no reuse is the bare prompt
