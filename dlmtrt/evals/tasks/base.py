from __future__ import annotations

import random
from dataclasses import dataclass, field

from dlmtrt.errors import UsageError


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # one gold answer; `Task.check` decides correctness, not string equality
    meta: dict = field(default_factory=dict, hash=False, compare=False)


class Task:
    """A family of problems. `answer_tokens` bounds the answer length in tokens (byte-level: characters),
    which is the canvas the decoders get; answers are shorter or equal and end with EOS."""

    name: str
    answer_tokens: int

    def sample(self, rng: random.Random, **difficulty) -> Problem:
        raise NotImplementedError

    def check(self, problem: Problem, output: str) -> bool:
        raise NotImplementedError

    def problems(self, n: int, seed: int, **difficulty) -> list[Problem]:
        """`n` problems, identical for the same (n, seed, difficulty) on every machine."""
        import inspect
        known = [k for k in inspect.signature(self.sample).parameters if k != "rng"]
        unknown = sorted(set(difficulty) - set(known))
        if unknown:
            raise UsageError(f"task {self.name} has no difficulty {', '.join(unknown)}; "
                             f"it takes {', '.join(known) or 'none'}")
        rng = random.Random(f"{self.name}:{seed}")
        return [self.sample(rng, **difficulty) for _ in range(n)]
