"""Sort 44 distinct two-digit numbers: a long answer (131 tokens + EOS) in which every position depends on
the whole prompt and on its neighbours in the answer, so cache policies are exercised on long canvases.

Numbers are distinct on purpose: with repeats, sorting turns into exact counting (how many 7s?), which a
5 M-parameter model learns slowly and which says nothing about caching. An earlier version sorted 64
single digits and stalled at ~15% exact for that reason."""
from __future__ import annotations

import random

from .base import Problem, Task


class SortNumbers(Task):
    name = "sort44"
    count = 44
    answer_tokens = 132

    def sample(self, rng: random.Random) -> Problem:
        nums = rng.sample(range(10, 100), self.count)
        prompt = "sort " + ",".join(map(str, nums)) + "\n"
        return Problem(prompt, ",".join(map(str, sorted(nums))), {"numbers": nums})

    def check(self, problem: Problem, output: str) -> bool:
        return output.strip() == ",".join(map(str, sorted(problem.meta["numbers"])))
