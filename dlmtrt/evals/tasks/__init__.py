"""Deterministic task generators with exact checkers, for training and evaluating the tiny DLMs.

Every task produces `Problem`s (prompt, gold answer, metadata) from a seed and checks a model's answer
exactly: sudoku4 and shift128 by the rules, countdown by validating the arithmetic (any valid chain counts).
"""
from __future__ import annotations

from dlmtrt.errors import UsageError

from .base import Problem, Task
from .countdown import Countdown
from .shift import ShiftCopy
from .sudoku import Sudoku4

TASKS: dict[str, Task] = {t.name: t for t in (Sudoku4(), Countdown(), ShiftCopy())}
CALIBRATION_SEED = 99  # problems drawn for calibration; evaluation draws with 1234, so never the same ones


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UsageError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


def parse_task(spec: str) -> tuple[str, dict]:
    """'sudoku4' or 'sudoku4:clues=8-12' -> (name, difficulty); ranges a-b become (a, b)."""
    name, _, rest = spec.partition(":")
    diff = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        lo, dash, hi = v.partition("-")
        try:
            diff[k] = (int(lo), int(hi)) if dash else int(v)
        except ValueError:
            raise UsageError(f"task '{spec}': difficulty '{item}' must be key=N or key=A-B with integers, "
                             "for example sudoku4:clues=8-12") from None
    return name, diff


def calibration_prompts(specs: list[str], samples: int) -> tuple[list[str], list[int]]:
    """`samples` prompts of each task spec (drawn with CALIBRATION_SEED) and each prompt's answer length: what
    `dlmtrt calibrate --task` denoises, each task at its own length."""
    prompts, lengths = [], []
    for spec in specs:
        name, diff = parse_task(spec)
        task = get_task(name)
        prompts += [p.prompt for p in task.problems(samples, CALIBRATION_SEED, **diff)]
        lengths += [task.answer_tokens] * samples
    return prompts, lengths


__all__ = ["CALIBRATION_SEED", "Problem", "Task", "TASKS", "calibration_prompts", "get_task", "parse_task"]
