"""The shared-prefix workload of the task evaluations (BiCache, issue 29): every problem asked as the last user
turn of a chat whose earlier turns are the same for all problems, so that those turns are a prefix a server can
reuse across requests.

The earlier turns are an instruction (a system turn describing the task) and/or `shots` solved problems of the
same task and difficulty as user/assistant turns (few-shot), drawn with a seed of their own, so they are never
the evaluated problems' draw. The chat is rendered with the model's chat template and split where the last user
turn starts by `runtime.bicache.chat_prefix`, the authors' tokenization (the server's and the profiler's too),
so P is the length a served request of the same chat would have. All problems of a task get the same prefix
ids; that is checked, since reuse keys the store by them.

`lead` is the other workload: the bare task prompt, as the tiny task models were trained on it (no chat
template), whose shared prefix is the leading tokens every prompt of the task starts with (its name: "sudoku\n",
"countdown "). It is short, but the prompts keep the model's accuracy; the tiny models were never shown a chat,
and with any chat template, instruction or solved turn in front of a problem they answer nothing right
(bench/results/bicache-accuracy-h200.json), which leaves the chat workload no accuracy to lose.
"""
from __future__ import annotations

from dataclasses import dataclass

from dlmtrt.errors import UsageError
from dlmtrt.runtime.bicache import DepthTable, chat_prefix

from .tasks import Problem, Task

SHOT_SEED = 4242  # the few-shot examples' draw: neither the evaluation's (1234) nor calibration's (99)
WARM_SEED = 4343  # the evaluator's warm-up requests (problems decoded through a store first, not counted)
LEAD_SAMPLES = 64  # problems (of the shots' draw) whose common leading tokens define a task's lead
INSTRUCTIONS = {
    "sudoku4": "Complete the 4x4 sudoku: replace every 0 so that each row, each column and each 2x2 box holds "
               "1, 2, 3 and 4 once. Answer with the four rows.",
    "countdown": "Reach the number after the arrow from the numbers before it, each used once, with + - * /. "
                 "Answer with the operations, separated by commas.",
    "shift128": "Copy the letters, shifting each one forward in the alphabet by the number given (z wraps to a).",
}


@dataclass(frozen=True)
class SharedPrefix:
    """Which shared turns come before each problem: the task's instruction as a system turn, then `shots` solved
    problems; or (`lead`) no turns at all: the bare prompt, sharing the task's leading tokens."""

    instruction: bool = False
    shots: int = 0
    lead: bool = False

    def __post_init__(self):
        if not isinstance(self.shots, int) or self.shots < 0:
            raise UsageError(f"a shared prefix takes shots >= 0, got {self.shots!r}")
        if self.lead and (self.instruction or self.shots):
            raise UsageError("'lead' is the bare prompt's own leading tokens; it takes no instruction or shots")
        if not self.instruction and not self.shots and not self.lead:
            raise UsageError("a shared prefix needs an instruction or shots >= 1 (else there is nothing shared), or "
                             "'lead': for example 'instruction', 'shots=2', 'instruction,shots=2' or 'lead'")

    @property
    def spec(self) -> str:
        if self.lead:
            return "lead"
        return ",".join((["instruction"] if self.instruction else []) + ([f"shots={self.shots}"] if self.shots else []))

    def lead_ids(self, tokenizer, task: Task, difficulty: dict) -> list[int]:
        """The leading tokens all of LEAD_SAMPLES prompts of `task` share (the shots' draw, so fixed for a task
        whatever problems are evaluated)."""
        ref = [_bare(tokenizer, p.prompt) for p in task.problems(LEAD_SAMPLES, SHOT_SEED, **difficulty)]
        n = 0
        while all(len(r) > n and r[n] == ref[0][n] for r in ref):
            n += 1
        if n == 0:
            raise UsageError(f"the prompts of {task.name} share no leading token, so 'lead' has nothing to reuse")
        return ref[0][:n]

    def turns(self, task: Task, difficulty: dict) -> list[dict]:
        """The shared earlier turns of `task` at `difficulty`."""
        msgs = [{"role": "system", "content": INSTRUCTIONS[task.name]}] if self.instruction else []
        for s in task.problems(self.shots, SHOT_SEED, **difficulty) if self.shots else []:
            msgs += [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.answer}]
        return msgs

    def encode(self, tokenizer, task: Task, difficulty: dict, problems: list[Problem],
               max_positions: int | None = None) -> list[tuple[list[int], int]]:
        """(prompt ids, shared-prefix length P) of each problem, the authors' split; refuses, before any
        generation, a template that gives the problems different prefixes or no boundary, a shot that is one of
        the problems, and canvases (prompt + the task's answer) beyond `max_positions`."""
        if task.name not in INSTRUCTIONS and self.instruction:
            raise UsageError(f"no instruction is written for task {task.name}; use shots=N")
        if self.lead:
            lead, out = self.lead_ids(tokenizer, task, difficulty), []
            for p in problems:
                ids = _bare(tokenizer, p.prompt)
                if ids[:len(lead)] != lead or len(ids) == len(lead):
                    raise UsageError(f"a {task.name} prompt does not continue the task's leading tokens {lead}: "
                                     f"{p.prompt!r}")
                out.append((ids, len(lead)))
            return out
        turns = self.turns(task, difficulty)
        shots = {m["content"] for m in turns if m["role"] == "user"}
        out = []
        for p in problems:
            if p.prompt in shots:
                raise UsageError(f"a few-shot example of {task.name} is also an evaluated problem ({p.prompt!r}): "
                                 "draw the problems with another seed")
            ids, P = chat_prefix(tokenizer, turns + [{"role": "user", "content": p.prompt}])
            if P == 0 or (out and ids[:P] != out[0][0][:out[0][1]]):
                raise UsageError(f"the chat template does not give every {task.name} problem the same shared prefix "
                                 f"({self.spec}), so nothing could be reused across them")
            if max_positions is not None and len(ids) + task.answer_tokens > max_positions:
                raise UsageError(f"{task.name} with the shared prefix {self.spec} makes "
                                 f"{len(ids) + task.answer_tokens}-token canvases, beyond the model's {max_positions} "
                                 "positions: use fewer shots")
            out.append((ids, P))
        return out


def _bare(tokenizer, prompt: str) -> list[int]:
    """A bare prompt's ids, as the evaluator tokenizes one (no special tokens, no template)."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def parse_shared_prefix(spec: str) -> SharedPrefix:
    """'instruction', 'shots=2', 'instruction,shots=2' or 'lead' -> SharedPrefix."""
    instruction, shots, lead = False, 0, False
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, eq, val = item.partition("=")
        if key in ("instruction", "lead") and not eq:
            instruction, lead = instruction or key == "instruction", lead or key == "lead"
        elif key == "shots" and eq and val.isdigit():
            shots = int(val)
        else:
            raise UsageError(f"shared prefix '{spec}': '{item}' is neither 'instruction', 'shots=N' nor 'lead'")
    return SharedPrefix(instruction, shots, lead)


@dataclass(frozen=True)
class BiCacheSetting:
    """BiCache in an evaluation: the model's depth table, the refresh interval (the authors' run script: 16) and
    the store's size in prefix tokens. Each policy gets a fresh store, shared by its batches."""

    table: DepthTable
    interval: int = 16
    store_tokens: int = 1 << 16

    def __post_init__(self):
        if self.interval < 1 or self.store_tokens < 1:
            raise UsageError(f"BiCache needs an interval >= 1 and a store of >= 1 tokens, got {self.interval} and "
                             f"{self.store_tokens}")
