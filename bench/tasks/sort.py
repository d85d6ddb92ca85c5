"""Sort 64 digits: a long answer (127 tokens + EOS) where every position depends on the whole prompt and
on its neighbours in the answer, so cache policies are exercised on long canvases."""
from __future__ import annotations

import random

from .base import Problem, Task


class SortDigits(Task):
    name = "sort64"
    answer_tokens = 128
    length = 64

    def sample(self, rng: random.Random) -> Problem:
        digits = [rng.randint(0, 9) for _ in range(self.length)]
        prompt = "sort " + ",".join(map(str, digits)) + "\n"
        return Problem(prompt, ",".join(map(str, sorted(digits))), {"digits": digits})

    def check(self, problem: Problem, output: str) -> bool:
        return output.strip() == ",".join(map(str, sorted(problem.meta["digits"])))
