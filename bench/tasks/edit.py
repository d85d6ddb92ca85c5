"""Copy a 128-letter string applying three letter substitutions given in the prompt: a long answer
(128 tokens + EOS) in which every answer row must find its source row in the prompt and the rule that
applies to it, so cache policies are exercised on long canvases.

Sorting was tried first and dropped: sorting 64 digits is exact counting (how many 7s?) and sorting 44
two-digit numbers needs multi-token comparisons; neither reached useful accuracy for a 5 M-parameter
model within the 10-minute training budget (15% and 0% exact), so they could not expose cache losses."""
from __future__ import annotations

import random
import string

from .base import Problem, Task


class EditCopy(Task):
    name = "edit128"
    length = 128
    rules = 3
    answer_tokens = 129

    def sample(self, rng: random.Random) -> Problem:
        letters = string.ascii_lowercase
        text = "".join(rng.choice(letters) for _ in range(self.length))
        src = rng.sample(letters, self.rules)
        dst = [rng.choice([c for c in letters if c != s]) for s in src]
        table = dict(zip(src, dst))
        prompt = "edit " + ",".join(f"{s}>{d}" for s, d in zip(src, dst)) + "\n" + text + "\n"
        return Problem(prompt, "".join(table.get(c, c) for c in text), {"text": text, "rules": table})

    def check(self, problem: Problem, output: str) -> bool:
        return output.strip() == problem.answer
