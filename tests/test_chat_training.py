"""Fine-tuning a task model on chat prompts (train.py --init, --chats), which gives the shared-prefix workload
(evals/shared_prefix.py) accuracy to lose: the chats must be tokenized exactly as the evaluator and the server
tokenize them, fit the model's positions, and the fine-tune must start from the given weights."""
from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

from dlmtrt.evals.shared_prefix import INSTRUCTIONS, parse_shared_prefix
from dlmtrt.evals.tasks import TASKS
from dlmtrt.evals.train import MAX_POSITIONS, Encoder, chat_prompt, main, make_batch, train
from dlmtrt.models.loading import load, load_tokenizer, open_checkpoint
from dlmtrt.runtime.bicache import chat_prefix

SMALL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, head_dim=16)


def test_a_chat_is_tokenized_as_the_evaluator_tokenizes_it():
    enc, tok = Encoder("llada"), load_tokenizer(open_checkpoint("tiny-llada-tasks"))
    task = TASKS["countdown"]
    problems = task.problems(3, 1234, numbers=3)
    spec = parse_shared_prefix("instruction,shots=2")
    turns = spec.turns(task, {"numbers": 3})
    for p, (ids, P) in zip(problems, spec.encode(tok, task, {"numbers": 3}, problems)):
        assert enc.chat(turns + [{"role": "user", "content": p.prompt}]) == ids
        assert ids[:P] == chat_prefix(tok, turns + [{"role": "user", "content": p.prompt}])[0][:P]


@pytest.mark.parametrize("name", list(TASKS))
def test_chat_batches_fit_the_positions_and_keep_the_answers(name):
    enc, task, rng = Encoder("llada"), TASKS[name], random.Random(7)
    x, am, ans = make_batch(enc, task, rng, 64, "cpu", chat=True)
    assert x.shape[1] <= MAX_POSITIONS
    header = enc.chat([{"role": "user", "content": "x"}])[-3:]  # the generation prompt's tail
    A = task.answer_tokens
    for row, m in zip(x, am):
        prompt = row[m][:-A].tolist()
        assert prompt[0] == enc.ids["bos"] and prompt[-3:] == header
    assert ans[:, -A:].all() and not ans[:, :-A].any()
    # every format the workloads ask appears: the workload's instruction, none, and (where they fit) shots
    texts = [enc.tok.decode(row[m].tolist(), skip_special_tokens=False) for row, m in zip(x, am)]
    assert any(INSTRUCTIONS[name] in t for t in texts) and any("system" not in t for t in texts)
    shots = [t.count("assistant") - 1 for t in texts]
    assert max(shots) == (0 if name == "shift128" else 2)


def test_a_prompt_drops_shots_rather_than_pass_the_positions():
    enc, task = Encoder("llada"), TASKS["shift128"]
    p = task.sample(random.Random(1))
    for seed in range(20):
        ids = chat_prompt(task, p, random.Random(seed), task.answer_tokens, enc)
        assert len(ids) + task.answer_tokens <= MAX_POSITIONS


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    base = tmp_path / "base"
    train("llada", base, max_steps=1, batch=4, device="cpu", workers=0, compile_=False, sizes=SMALL)
    start, _, _ = load(str(base))
    tuned = tmp_path / "tuned"
    info = train("llada", tuned, max_steps=2, batch=4, lr=0.0, device="cpu", workers=0, compile_=False,
                 sizes=SMALL, init=str(base), chats=1.0)
    after, _, _ = load(str(tuned))
    assert info["init"] == str(base) and info["chats"] == 1.0
    assert all("chat" in e["task"] for e in info["log"]) or not info["log"]
    for (k, a), b in zip(start.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)  # lr 0: the fine-tune kept init's weights exactly
    info = train("llada", tmp_path / "moved", max_steps=2, batch=4, device="cpu", workers=0, compile_=False,
                 sizes=SMALL, init=str(base), chats=1.0)
    moved, _, _ = load(str(tmp_path / "moved"))
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), moved.state_dict().values()))


def test_init_of_another_shape_or_family_is_refused_in_one_line(tmp_path):
    base = tmp_path / "base"
    train("llada", base, max_steps=1, batch=4, device="cpu", workers=0, compile_=False, sizes=SMALL)
    r = CliRunner().invoke(main, ["--family", "llada", "--out", str(tmp_path / "o"), "--device", "cpu",
                                  "--init", str(base), "--max-steps", "1"])
    assert r.exit_code == 2 and "differs from the llada task model" in r.output and "hidden_size" in r.output
    r = CliRunner().invoke(main, ["--family", "dream", "--out", str(tmp_path / "o"), "--device", "cpu",
                                  "--init", str(base), "--max-steps", "1"])
    assert r.exit_code == 2 and "is a llada model" in r.output
    assert not (tmp_path / "o").exists()
    assert json.loads((base / "training.json").read_text())["init"] is None
