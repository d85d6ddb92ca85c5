"""Task generators are deterministic and their checkers judge answers by the rules, not by string equality."""
from __future__ import annotations

import random

import pytest

from dlmtrt.evals.tasks import parse_task
from dlmtrt.evals.tasks import TASKS, get_task
from dlmtrt.evals.tasks.shift import shifted
from dlmtrt.evals.tasks.sudoku import GRIDS


@pytest.mark.parametrize("name", sorted(TASKS))
def test_problems_are_deterministic_and_gold_answers_pass(name):
    task = TASKS[name]
    a, b = task.problems(30, seed=5), task.problems(30, seed=5)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert [p.prompt for p in task.problems(30, seed=6)] != [p.prompt for p in a]
    for p in a:
        assert task.check(p, p.answer) and task.check(p, p.answer + "\n")
        assert len(p.answer) + 1 <= task.answer_tokens  # byte-level tokens, EOS included


@pytest.mark.parametrize("name", sorted(TASKS))
def test_corrupted_answers_fail(name):
    task = TASKS[name]
    rng = random.Random(0)
    for p in task.problems(20, seed=1):
        i = rng.randrange(len(p.answer))
        for c in "0123456789abcdefghijklmnopqrstuvwxyz":
            bad = p.answer[:i] + c + p.answer[i + 1:]
            if bad != p.answer and not (name == "countdown" and task.check(p, bad)):
                assert not task.check(p, bad), (p.prompt, bad)
        assert not task.check(p, p.answer[:-1])
        assert not task.check(p, "")


def test_countdown_accepts_any_valid_chain_and_checks_arithmetic():
    task = get_task("countdown")
    p = next(q for q in task.problems(200, seed=3, numbers=3) if "+" in q.answer)
    a, rest = p.answer.split("+")
    b, r = rest.split("=")
    assert task.check(p, f"{b}+{a}={r}")  # commuted operands: a different string, still right
    assert not task.check(p, f"{a}+{b}={int(r) + 1}")  # wrong arithmetic
    assert not task.check(p, f"{a}+{a}={2 * int(a)}") or a == b  # a number used twice
    four = task.problems(50, seed=4, numbers=4)
    assert all(len(q.meta["numbers"]) == 3 and q.answer.count(",") == 1 for q in four)


def test_sudoku_accepts_any_solution_consistent_with_the_clues():
    task = get_task("sudoku4")
    p = next(q for q in task.problems(200, seed=2, clues=4) if sum(
        all(c == "0" or int(c) == g[i] for i, c in enumerate(q.meta["puzzle"])) for g in GRIDS) > 1)
    solutions = [g for g in GRIDS if all(c == "0" or int(c) == g[i] for i, c in enumerate(p.meta["puzzle"]))]
    for g in solutions:
        text = "\n".join("".join(map(str, g[4 * r: 4 * r + 4])) for r in range(4))
        assert task.check(p, text)
    assert all(4 <= q.meta["clues"] <= 12 for q in task.problems(100, seed=0))
    assert all(8 <= q.meta["clues"] <= 12 for q in task.problems(100, seed=0, clues=(8, 12)))


def test_shift_task_applies_the_prompt_shift():
    assert shifted("abxyz", 3) == "deabc"
    p = get_task("shift128").problems(1, seed=0)[0]
    k = int(p.prompt.split("\n")[0].split()[1])
    assert p.answer == shifted(p.prompt.split("\n")[1], k) and len(p.answer) == 128 and 1 <= k <= 9


def test_difficulty_parsing_and_errors():
    assert parse_task("sudoku4:clues=8-12") == ("sudoku4", {"clues": (8, 12)})
    assert parse_task("countdown:numbers=3") == ("countdown", {"numbers": 3})
    with pytest.raises(ValueError, match="unknown task 'sort'"):
        get_task("sort")
    with pytest.raises(ValueError, match="clues must lie in 4..12"):
        get_task("sudoku4").problems(1, seed=0, clues=2)
    with pytest.raises(ValueError, match="numbers must lie in 3..5"):
        get_task("countdown").problems(1, seed=0, numbers=7)


def test_bad_difficulty_specs_name_the_fix():
    with pytest.raises(ValueError, match="key=N or key=A-B"):
        parse_task("sudoku4:clues=many")
    with pytest.raises(ValueError, match="task shift128 has no difficulty clues; it takes none"):
        get_task("shift128").problems(1, seed=0, clues=3)
    with pytest.raises(ValueError, match="it takes numbers"):
        get_task("countdown").problems(1, seed=0, clues=3)
