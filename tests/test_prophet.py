"""Prophet (runtime/policies.Prophet, `+prophet`) against the authors' own code: tests/fixtures/upstream/prophet/
holds what pixeli99/Prophet's `generate_earlyexit.generate` and `generate.generate` produced on the tiny LLaDA
checkpoint (127 cases: exits in the early, mid and late phase and never; constraints, CFG, both remasking modes,
blocks equal to and dividing the answer) and what its `_parse_constraints` made of 14 texts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dlmtrt.errors import UsageError
from dlmtrt.models.loading import load
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.constraints import parse_constraints
from dlmtrt.runtime.families.llada import llada_generate
from dlmtrt.runtime.policies import PolicyError, Prophet, parse_policy

UP = Path(__file__).parent / "fixtures" / "upstream"
DOC = json.loads((UP / "prophet" / "prophet.json").read_text())
CASES = [c for c in DOC["cases"] if "upstream_error" not in c]


@pytest.fixture(scope="module")
def llada():
    model, tok, _ = load(str(UP / "ckpt-llada"), dtype="float32", device="cpu")
    return TorchBackend(model), tok


def _run(be, case):
    p = case["params"]
    pins = {int(k): v for k, v in case["constraints"].items()} if case["constraints"] else None
    prophet = case["function"] == "generate_earlyexit.generate" and case["analyze_gap"] and \
        case["answer_start_pos"] is not None  # their check runs only then
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    return llada_generate(be, torch.tensor([case["prompt"]]), None, steps=p["steps"], gen_length=p["gen_length"],
                          block_length=p["block_length"], temperature=p["temperature"], cfg_scale=p["cfg_scale"],
                          remasking=p["remasking"], constraints=pins,
                          answer_start_pos=case["answer_start_pos"] if prophet else None,
                          early_exit_thresholds=(case["early_exit_thresholds"] or {}) if prophet else None)


def test_the_fixtures_cover_every_phase_and_form():
    phases = {c.get("exit_phase") for c in CASES}
    assert {"early", "mid", "late", "never"} <= phases
    assert any(c["params"]["cfg_scale"] > 0 and c["constraints"] for c in CASES)
    assert {c["params"]["remasking"] for c in CASES} == {"low_confidence", "random"}
    assert any(c["params"]["block_length"] < c["params"]["gen_length"] for c in CASES)
    assert any(c["early_exit_thresholds"] == {"early": 7.5, "mid": 5.0, "late": 2.5} and
               c["exit_info"]["early_exit_triggered"] for c in CASES)  # their defaults, exiting
    assert any(c["early_exit_thresholds"] is None and c["analyze_gap"] for c in CASES)  # omitted: their defaults
    assert len(CASES) >= 120


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_prophet_is_token_identical_with_the_same_exit_step(case, llada):
    be, _ = llada
    x, stats = _run(be, case)  # a negative position writes over the prompt, as theirs (the CLI refuses it)
    assert x[0].tolist() == case["output"]
    info = case["exit_info"]
    theirs = info["exit_decision_step"] if info and info["early_exit_triggered"] else None
    ours = stats.exit_steps[0] if stats.exit_steps else None
    # their loop runs every step; ours stops once nothing is masked, so an exit of theirs after that changed nothing
    assert stats.forward_passes <= case["forward_calls"]
    if stats.forward_passes < case["forward_calls"]:
        assert ours is None and (theirs is None or theirs > stats.forward_passes)
    else:
        assert ours == theirs


@pytest.mark.parametrize("item", DOC["parse_constraints"], ids=[repr(i["text"]) for i in DOC["parse_constraints"]])
def test_constraint_texts_parse_as_theirs_or_are_refused(item, llada):
    _, tok = llada
    want = {int(k): v for k, v in item["result"].items()}
    parts = [p for p in item["text"].split("|")] if item["text"].strip() else []
    theirs_skipped = any(":" not in p or not p.split(":", 1)[0].strip().lstrip("-").isdigit()
                         or p.split(":", 1)[0].strip().startswith("-") for p in parts)
    if theirs_skipped:  # a part theirs ignores (no colon, not a position) or writes into the prompt: one line here
        with pytest.raises(UsageError):
            parse_constraints(item["text"], tok)
    else:
        assert parse_constraints(item["text"], tok) == want


def _batch_prompts():
    g = torch.Generator().manual_seed(21)
    return [torch.randint(1, 250, (n,), generator=g).tolist() for n in (7, 7, 7)]


def test_a_batch_exits_per_sequence_as_each_alone(llada):
    be, _ = llada
    prompts = _batch_prompts()
    kw = dict(steps=16, gen_length=16, block_length=8, constraints={2: 65, 3: 66},
              early_exit_thresholds={"early": 2.2, "mid": 1.6, "late": 0.8})
    x, st = llada_generate(be, torch.tensor(prompts), None, **kw)
    alone = [llada_generate(be, torch.tensor([p]), None, **kw) for p in prompts]
    assert [a[0][0].tolist() for a in alone] == x.tolist()
    assert st.exit_steps == [a[1].exit_steps[0] for a in alone]
    assert len(set(st.exit_steps)) > 1  # the sequences stopped at different steps


def test_thresholds_never_reached_equal_plain_generation(llada):
    be, _ = llada
    ids = torch.tensor(_batch_prompts())
    kw = dict(steps=16, gen_length=16, block_length=8)
    never = {"early": 1e9, "mid": 1e9, "late": 1e9}
    for pins in (None, {1: 70}):
        plain, ps = llada_generate(be, ids, None, constraints=pins, **kw)
        x, st = llada_generate(be, ids, None, constraints=pins, answer_start_pos=9, early_exit_thresholds=never, **kw)
        assert torch.equal(plain, x) and st.exit_steps == [None] * 3 and st.forward_passes == ps.forward_passes


def test_the_phase_thresholds_are_theirs():
    p = Prophet.of({"mid": 4.0})
    assert (p.early, p.mid, p.late) == (7.5, 4.0, 2.5)
    assert [p.threshold(s, 100) for s in (1, 32, 33, 66, 67, 100)] == [7.5, 7.5, 4.0, 4.0, 2.5, 2.5]
    with pytest.raises(PolicyError, match="takes early, mid and late"):
        Prophet.of({"eraly": 1.0})
    assert parse_policy("none+prophet:early=3,mid=2,late=1").prophet == Prophet(3.0, 2.0, 1.0)


@pytest.mark.parametrize("spec, words", [("dual+prophet", "cache policy none only"),
                                         ("decode+prophet", "cache policy none only"),
                                         ("none+prophet+parallel", "both decide"),
                                         ("none+prophet:early=x", "must be a number")])
def test_combinations_prophet_does_not_define_are_refused(spec, words):
    with pytest.raises(PolicyError, match=words):
        parse_policy(spec).check("llada")


def test_prophet_without_an_answer_span_is_refused(llada):
    be, _ = llada
    with pytest.raises(UsageError, match="needs the answer's position"):
        llada_generate(be, torch.tensor([[5, 6, 7]]), steps=8, gen_length=8, block_length=8,
                       early_exit_thresholds={})


def test_dreams_prophet_ours_fills_every_mask_with_the_argmax_at_its_exit():
    """Prophet's code covers LLaDA only; Dream's +prophet is ours: the same check on Dream's shifted logits."""
    from dlmtrt.runtime.families.dream import dream_generate
    model, _, _ = load(str(UP / "ckpt-dream"), dtype="float32", device="cpu")
    be = TorchBackend(model)
    ids = torch.tensor(_batch_prompts())
    kw = dict(max_new_tokens=16, steps=16, temperature=0.0, alg="entropy")
    plain, ps = dream_generate(be, ids, None, **kw)
    x, st = dream_generate(be, ids, None, policy="none+prophet:early=0,mid=0,late=0", answer_start_pos=7, **kw)
    assert st.exit_steps == [1, 1, 1] and st.forward_passes == 1 and not (x == be.info.mask_token_id).any()
    assert torch.equal(x[:, :7], ids)
    never, ns = dream_generate(be, ids, None, policy="none+prophet:early=1e9,mid=1e9,late=1e9", answer_start_pos=7, **kw)
    assert torch.equal(never, plain) and ns.exit_steps == [None] * 3
