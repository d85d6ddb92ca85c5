"""4x4 Sudoku: rows, columns and 2x2 boxes hold 1-4 once. Difficulty: number of clues (4 to 12)."""
from __future__ import annotations

import itertools
import random

from dlmtrt.errors import UsageError

from .base import Problem, Task


def _all_grids() -> list[tuple[int, ...]]:
    """All 288 valid 4x4 grids, row-major."""
    rows = list(itertools.permutations((1, 2, 3, 4)))
    out = []
    for r0, r1, r2, r3 in itertools.product(rows, repeat=4):
        g = r0 + r1 + r2 + r3
        if _valid(g):
            out.append(g)
    return out


def _valid(g) -> bool:
    for i in range(4):
        if len({g[4 * i + j] for j in range(4)}) != 4 or len({g[4 * j + i] for j in range(4)}) != 4:
            return False
    for br, bc in itertools.product((0, 2), repeat=2):
        if len({g[4 * (br + r) + bc + c] for r in range(2) for c in range(2)}) != 4:
            return False
    return True


GRIDS = _all_grids()


class Sudoku4(Task):
    name = "sudoku4"
    answer_tokens = 20  # 4 rows of 4 digits + 3 newlines, then EOS

    def sample(self, rng: random.Random, clues: int | tuple[int, int] = (4, 12)) -> Problem:
        lo, hi = (clues, clues) if isinstance(clues, int) else clues
        if not 4 <= lo <= hi <= 12:
            raise UsageError(f"clues must lie in 4..12, got {clues}")
        k = rng.randint(lo, hi)
        g = rng.choice(GRIDS)
        keep = set(rng.sample(range(16), k))
        puzzle = "".join(str(g[i]) if i in keep else "0" for i in range(16))
        prompt = "sudoku\n" + "\n".join(puzzle[4 * r: 4 * r + 4] for r in range(4)) + "\n"
        answer = "\n".join("".join(map(str, g[4 * r: 4 * r + 4])) for r in range(4))
        return Problem(prompt, answer, {"clues": k, "puzzle": puzzle})

    def check(self, problem: Problem, output: str) -> bool:
        digits = output.strip().replace("\n", "")
        if len(digits) != 16 or not set(digits) <= set("1234") or output.strip().count("\n") != 3:
            return False
        g = tuple(int(c) for c in digits)
        puzzle = problem.meta["puzzle"]
        return _valid(g) and all(p == "0" or int(p) == v for p, v in zip(puzzle, g))
