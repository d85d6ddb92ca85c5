"""Countdown: reach the target (last number) from the others with + - * /, each number used once.

The answer is a chain like `44-15=29,79-29=50`; every step combines two available numbers (given ones or
earlier results) into a non-negative integer, and the last result must be the target. Difficulty: how many
numbers the prompt holds (3 to 5, target included).
"""
from __future__ import annotations

import random
import re

from dlmtrt.errors import UsageError

from .base import Problem, Task

_STEP = re.compile(r"^(\d+)([+\-*/])(\d+)=(\d+)$")


def _apply(a: int, op: str, b: int) -> int | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a >= b else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 else None


class Countdown(Task):
    name = "countdown"
    answer_tokens = 48

    def sample(self, rng: random.Random, numbers: int | tuple[int, int] = (3, 5)) -> Problem:
        lo, hi = (numbers, numbers) if isinstance(numbers, int) else numbers
        if not 3 <= lo <= hi <= 5:
            raise UsageError(f"numbers must lie in 3..5, got {numbers}")
        n = rng.randint(lo, hi)
        while True:
            given = [rng.randint(1, 99) for _ in range(n - 1)]
            pool, steps = list(given), []
            ok = True
            while len(pool) > 1:
                a, b = rng.sample(pool, 2)
                op = rng.choice("+-*/")
                if op == "-" and a < b:
                    a, b = b, a
                r = _apply(a, op, b)
                if r is None or r > 999 or r == 0:
                    ok = False
                    break
                pool.remove(a)
                pool.remove(b)
                pool.append(r)
                steps.append(f"{a}{op}{b}={r}")
            if ok:
                break
        target = pool[0]
        prompt = "countdown " + " ".join(map(str, given)) + " -> " + str(target) + "\n"
        return Problem(prompt, ",".join(steps), {"numbers": given, "target": target})

    def check(self, problem: Problem, output: str) -> bool:
        pool = list(problem.meta["numbers"])
        parts = output.strip().split(",")
        if not parts or len(parts) != len(pool) - 1:
            return False
        last = None
        for part in parts:
            m = _STEP.match(part.strip())
            if not m:
                return False
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            if _apply(a, op, b) != r:
                return False
            for v in (a, b):
                if v not in pool:
                    return False
                pool.remove(v)
            pool.append(r)
            last = r
        return last == problem.meta["target"] and len(pool) == 1
