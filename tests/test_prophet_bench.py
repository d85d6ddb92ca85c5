"""bench/prophet_eval.py: Prophet's results for any thresholds come from one traced decode per problem; the run
checks the timed +prophet decodes against the trace exit for exit, and the simulation is checked here on the
CPU against real +prophet decodes at thresholds that exit at different steps."""
from __future__ import annotations

import json

import pytest
import torch

from bench import prophet_eval as pe
from dlmtrt.evals.tasks import get_task
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.params import greedy_params


@pytest.fixture(scope="module")
def traced():
    be, tok, ck = make_backend("torch", "tiny-llada-tasks")
    task = get_task("sudoku4")
    problems = task.problems(6, 5, clues=(8, 12))
    params = greedy_params("llada", task.answer_tokens)
    return be, tok, task, problems, params, pe.trace(be, tok, task, problems, params, "cpu", 3)


@pytest.mark.parametrize("scale", [0.5, 2.0, 3.0, 16.0])
def test_the_trace_predicts_every_real_prophet_decode(traced, scale):
    be, tok, task, problems, params, tr = traced
    th = tuple(scale * d for d in pe.DEFAULTS)
    for p, t in zip(problems, tr):
        want = pe.simulate_one(t, th, params["steps"])
        g = generate_text(be, tok, [p.prompt], policy=pe._prophet(th), answer_start=0, **params)
        assert g.stats.exit_steps[0] == want[0]
        assert task.check(p, g.texts[0]) == want[1] and g.stats.seq_forward_passes == want[2]


def test_no_exit_is_the_plain_decode(traced):
    be, tok, task, problems, params, tr = traced
    g = generate_text(be, tok, [p.prompt for p in problems], policy="none", **params)
    assert [task.check(p, t) for p, t in zip(problems, g.texts)] == [t["final"] for t in tr]
    assert pe.simulate(tr, (float("inf"),) * 3, params["steps"])["forward_passes"] == 20.0
    assert any(t["steps"][0][1] < 1e3 for t in tr) and all(len(t["steps"]) == t["nfe"] for t in tr)


def test_a_small_run_writes_its_table(tmp_path):
    from click.testing import CliRunner
    out = tmp_path / "p.json"
    r = CliRunner().invoke(pe.main, ["--model", "tiny-llada-tasks", "--task", "sudoku4:clues=8-12", "--n", "3", "--timed", "1",
                                     "--batch-size", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    cells = doc["models"]["tiny-llada-tasks"]["tasks"]["sudoku4:clues=8-12"]["cells"]
    assert {"none", "prophet defaults", "early"} <= set(cells) and cells["none"]["forward_passes"] == 20.0
    md = CliRunner().invoke(pe.main, ["--render", str(out)])
    assert md.exit_code == 0 and "| `tiny-llada-tasks` | `sudoku4:clues=8-12` | none |" in md.output
    assert CliRunner().invoke(pe.main, []).exit_code == 2


def test_eval_runs_prophet_with_the_answers_first_positions_as_its_span(traced):
    from dlmtrt.evals.evaluate import evaluate
    be, tok, task, problems, params, tr = traced
    res, recs = evaluate(be, tok, "sudoku4:clues=8-12", 6, ["none", "none+prophet:early=15,mid=10,late=5"], seed=5,
                         batch_size=6)
    none, prophet = res
    want = pe.simulate(tr, (15.0, 10.0, 5.0), params["steps"])
    assert prophet.forward_passes == pytest.approx(want["forward_passes"])
    assert prophet.forward_passes < none.forward_passes
    assert prophet.accuracy == pytest.approx(want["accuracy"])
