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


__all__ = ["Problem", "Task", "TASKS", "get_task", "parse_task"]
