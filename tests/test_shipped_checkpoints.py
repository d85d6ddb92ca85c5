"""The trained task checkpoints that ship in checkpoints/: loadable by alias, within the size budget, with
current model cards, and accurate far above chance when evaluated here on the CPU (small N)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dlmtrt.evals.evaluate import evaluate
from bench.model_card import card
from dlmtrt.cli import main
from dlmtrt.models.loading import SHIPPED_ALIASES, load
from dlmtrt.runtime.backends import make_backend

# Accuracy floors at small N, far above chance (a random 4x4 grid fills 8 blanks right with p < 1e-4;
# a random countdown chain or shifted string is essentially never right) and below the N=200 model-card
# figures by a margin that covers sampling noise at this N.
FLOORS = {
    "tiny-dream-tasks": {"sudoku4:clues=8-12": (16, 0.8), "countdown:numbers=3": (24, 0.35), "shift128": (8, 0.75)},
    "tiny-llada-tasks": {"sudoku4:clues=8-12": (16, 0.8), "countdown:numbers=3": (24, 0.5), "shift128": (8, 0.75)},
    "tiny-sdar-tasks": {"sudoku4:clues=8-12": (16, 0.75), "countdown:numbers=3": (24, 0.5), "shift128": (8, 0.75)},
}
BIDIRECTIONAL = sorted(n for n in SHIPPED_ALIASES if "sdar" not in n)


def test_shipped_checkpoints_fit_the_budget_and_load():
    total = 0
    for name, path in SHIPPED_ALIASES.items():
        model, tok, ck = load(name)
        assert ck.path == path and ck.family == name.split("-")[1]
        total += sum(f.stat().st_size for f in path.glob("*.safetensors"))
        assert json.loads((path / "training.json").read_text())["steps"] > 0
    assert total <= 40 * 10**6  # every shipped checkpoint together (issue 28's budget)


@pytest.mark.parametrize("name", sorted(SHIPPED_ALIASES))
def test_model_card_is_generated_from_current_results(name):
    text = (SHIPPED_ALIASES[name] / "README.md").read_text()
    body = card(name)
    assert text.startswith(body), "model card is stale: run python -m bench.model_card " + name


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_eval_accuracy_far_above_chance(name):
    be, tok, _ = make_backend("torch", name, dtype="float32", device="cpu")
    for spec, (n, floor) in FLOORS[name].items():
        (res,), records = evaluate(be, tok, spec, n, ["none"], seed=99, batch_size=n)
        assert res.accuracy >= floor, (spec, res.accuracy, [r["output"] for r in records if not r["correct"]][:3])
        assert res.rows_fraction == 1.0 and res.forward_passes > 0


def test_cli_eval_on_a_shipped_checkpoint(tmp_path):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["eval", "-m", "tiny-llada-tasks", "--task", "sudoku4:clues=8-12", "--n", "6",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "sudoku4:clues=8-12" in r.stdout and "acc" in r.stdout and "rows/tok" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["results"][0]["n"] == 6 and len(doc["records"]) == 6


def test_cli_eval_rejects_bad_task_before_loading(tmp_path):
    r = CliRunner().invoke(main, ["eval", "-m", "no/such-model", "--task", "sudoku4:level=3"])
    assert r.exit_code != 0 and "no difficulty level" in r.output


# Documented accuracy bands per policy (README, "Decode policies"): floors at N=16 well below the N=200
# figures of bench/results/policies-*-cuda.json, so that sampling noise does not fail CI but a policy that
# breaks decoding (chance level is ~0) does.
POLICY_FLOORS = {
    "sudoku4:clues=8-12": {"none": 0.8, "decode": 0.8, "delayed": 0.8, "block": 0.8, "dual": 0.75,
                           "adaptive": 0.8, "none+parallel": 0.75, "decode+parallel+early": 0.7},
    "countdown:numbers=3": {"decode": 0.4, "delayed": 0.4, "dual": 0.4, "adaptive": 0.4, "dual+parallel": 0.4},
}


@pytest.mark.parametrize("name", BIDIRECTIONAL)  # the block-causal model's one cache is exact: test_sdar*.py
@pytest.mark.parametrize("task", sorted(POLICY_FLOORS))
def test_each_policy_stays_within_its_band(name, task):
    be, tok, ck = make_backend("torch", name, dtype="float32", device="cpu")
    floors = POLICY_FLOORS[task]
    res, _ = evaluate(be, tok, task, 16, list(floors), seed=7, batch_size=16, blocks=None if ck.family == "dream" else 2)
    for r in res:
        assert r.accuracy >= floors[r.policy], (name, task, r.policy, r.accuracy)
        if r.policy != "none":
            assert r.rows_fraction < 1.0 or "parallel" in r.policy  # the policy saved work
