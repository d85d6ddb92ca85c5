"""The shared-prefix workload (evals/shared_prefix.py) and BiCache through the evaluator (bench/bicache_accuracy.py's
pieces): every problem gets the same prefix, split where the authors' tokenization splits it; the evaluator's
BiCache decodes what a direct BiCache generation of each prompt decodes, batched by depth, and counts the rows
its deep layers recompute."""
from __future__ import annotations

import pytest
import torch

from dlmtrt.errors import UsageError
from dlmtrt.evals.evaluate import evaluate
from dlmtrt.evals.shared_prefix import SHOT_SEED, BiCacheSetting, SharedPrefix, parse_shared_prefix
from dlmtrt.evals.tasks import get_task
from dlmtrt.models.loading import load
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.bicache import BiCache, BiCacheStore, DepthTable, prefix_ratio
from dlmtrt.runtime.generate import decode_answer
from dlmtrt.runtime.params import greedy_params


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # a small model: more threads only contend with whatever else runs
    model, tok, _ = load("tiny-llada-tasks", dtype="float32", device="cpu")
    return TorchBackend(model), tok


def _template(tok, msgs, generation=True):
    out = tok.apply_chat_template(msgs, add_generation_prompt=generation, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_every_problem_gets_the_same_prefix_cut_where_the_authors_cut(tiny):
    """Their tokenize: the earlier turns' template with the generation prompt, less its assistant header, then
    the last turn's template less its BOS (the header's length read off the template here, their 6 being
    LLaDA-8B's). The prefix is the instruction and two shots of the task, drawn with the shots' seed."""
    _, tok = tiny
    task = get_task("countdown")
    problems = task.problems(6, 1234, numbers=3)
    sp = parse_shared_prefix("instruction,shots=2")
    assert sp == SharedPrefix(instruction=True, shots=2) and sp.spec == "instruction,shots=2"
    enc = sp.encode(tok, task, {"numbers": 3}, problems, max_positions=512)
    shots = task.problems(2, SHOT_SEED, numbers=3)
    for (ids, P), p in zip(enc, problems):
        turns = sp.turns(task, {"numbers": 3})
        assert [m["content"] for m in turns[1:]] == [shots[0].prompt, shots[0].answer, shots[1].prompt,
                                                    shots[1].answer] and turns[0]["role"] == "system"
        header = len(_template(tok, turns)) - len(_template(tok, turns, generation=False))
        theirs = _template(tok, turns)[:-header]
        assert header > 0 and tok.decode(theirs).endswith(shots[1].answer + "<|eot_id|>")
        assert ids[:P] == theirs and ids[P:] == _template(tok, [{"role": "user", "content": p.prompt}])[1:]
        assert ids == _template(tok, turns + [{"role": "user", "content": p.prompt}])
        assert ids[:P] == enc[0][0][:enc[0][1]]  # one prefix for all
    assert len({len(ids) for ids, _ in enc}) > 1  # the problems differ, their prefix does not


def test_the_lead_is_the_bare_prompts_common_start(tiny):
    """'lead': the prompt as the evaluator tokenizes a bare one, its prefix the task's name, for every problem."""
    _, tok = tiny
    for name, diff, head in (("sudoku4", {}, "sudoku\n"), ("countdown", {"numbers": 3}, "countdown ")):
        task = get_task(name)
        problems = task.problems(20, 1234, **diff)
        enc = parse_shared_prefix("lead").encode(tok, task, diff, problems)
        for (ids, P), p in zip(enc, problems):
            assert ids == tok(p.prompt, add_special_tokens=False)["input_ids"] and tok.decode(ids[:P]) == head
    with pytest.raises(UsageError, match="takes no instruction or shots"):
        parse_shared_prefix("lead,shots=1")


def test_the_workload_refuses_what_would_not_mean_what_it_says(tiny):
    _, tok = tiny
    with pytest.raises(UsageError, match="needs an instruction or shots"):
        parse_shared_prefix("shots=0")
    with pytest.raises(UsageError, match="neither 'instruction', 'shots=N' nor 'lead'"):
        parse_shared_prefix("instructions")
    shift = get_task("shift128")
    with pytest.raises(UsageError, match="beyond the model's 512 positions"):
        SharedPrefix(shots=1).encode(tok, shift, {}, shift.problems(2, 1234), 512)
    sudoku = get_task("sudoku4")
    shot = sudoku.problems(1, SHOT_SEED)
    with pytest.raises(UsageError, match="also an evaluated problem"):
        SharedPrefix(shots=1).encode(tok, sudoku, {}, shot)
    be, _ = tiny
    with pytest.raises(UsageError, match="give a shared prefix"):
        evaluate(be, tok, "sudoku4", 2, ["none"], bicache=BiCacheSetting(DepthTable.of({0: 1})))
    with pytest.raises(UsageError, match="one prefix store at a time"):
        evaluate(be, tok, "sudoku4", 2, ["none"], shared_prefix=SharedPrefix(shots=1), prefix_store_bytes=1 << 20,
                 bicache=BiCacheSetting(DepthTable.of({0: 1})))


def test_bicache_through_the_evaluator_is_a_direct_bicache_generation_of_each_prompt(tiny):
    """Countdown prompts differ in length, so their prefix ratios differ: a table with an entry between them
    splits each batch into two depths, and ratios below its first entry decode without reuse. Each problem's
    answer is the one a BiCache generation of its prompt alone decodes (a plain one below the table)."""
    be, tok = tiny
    task, diff, n = get_task("countdown"), {"numbers": 3}, 6
    sp = SharedPrefix(shots=1)
    enc = sp.encode(tok, task, diff, task.problems(n, 1234, **diff))
    params = greedy_params("llada", task.answer_tokens)
    ratios = sorted({prefix_ratio(P, len(ids) + params["gen_length"]) for ids, P in enc})
    assert len(ratios) >= 2, ratios
    table = DepthTable.of({ratios[-1]: 2} if len(ratios) == 2 else {ratios[1]: 1, ratios[-1]: 2})
    setting = BiCacheSetting(table, interval=4, store_tokens=1000)
    res, records = evaluate(be, tok, "countdown:numbers=3", n, ["none"], batch_size=4, shared_prefix=sp,
                            bicache=setting)
    store = BiCacheStore(1000)
    from dlmtrt.runtime.generate import llada_generate
    depths = {}
    for (ids, P), rec in zip(enc, records):
        r = prefix_ratio(P, len(ids) + params["gen_length"])
        depth = table.depth(r, 6) if r >= table.depths[0][0] else None
        bc = None if depth is None else BiCache(store, table, [P], interval=4)
        x, _ = llada_generate(be, torch.tensor([ids]), prefix_store=bc, **params)
        assert rec["output"] == decode_answer(tok, x[0, len(ids):], (be.info.eos_token_id,))
        assert rec["bicache_depth"] == depth
        depths[str(depth) if depth is not None else "none"] = depths.get(str(depth) if depth is not None else "none",
                                                                        0) + 1
    assert res[0].bicache_depths == dict(sorted(depths.items())) and len(depths) >= 2
    assert res[0].store_misses == 1 and res[0].prefix_tokens == enc[0][1]


def test_the_deep_layers_rows_are_counted(tiny):
    """Sudoku prompts all have one length: with every row decoded in each of the 20 steps and the prefix frozen,
    a step computes N - P rows in every layer, and at a refresh step P more in the L - b deep layers."""
    be, tok = tiny
    sp, L, b = SharedPrefix(instruction=True), 6, 4
    ids, P = sp.encode(tok, get_task("sudoku4"), {}, get_task("sudoku4").problems(1, 1234))[0]
    N, S = len(ids) + 20, 20
    for interval in (1, 8):
        refreshes = len(range(0, S, interval))
        res, _ = evaluate(be, tok, "sudoku4", 2, ["none"], shared_prefix=sp,
                          bicache=BiCacheSetting(DepthTable.of({0: b}), interval, 1000))
        want = (S * (N - P) * L + refreshes * P * (L - b)) / (S * N * L)
        assert res[0].layer_rows_fraction == pytest.approx(want) and res[0].rows_fraction == pytest.approx((N - P) / N)
        assert res[0].prefix_rows_served == pytest.approx(P / len(ids))
    plain, _ = evaluate(be, tok, "sudoku4", 2, ["none"], shared_prefix=sp)
    assert plain[0].layer_rows_fraction == 1.0 and plain[0].prefix_rows_served is None
