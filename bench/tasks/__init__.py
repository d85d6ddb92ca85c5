"""Deterministic task generators with exact checkers, for training and evaluating the tiny DLMs.

Every task produces `Problem`s (prompt, gold answer, metadata) from a seed and checks a model's answer
exactly: sudoku4 and shift128 by the rules, countdown by validating the arithmetic (any valid chain counts).
"""
from __future__ import annotations

from .base import Problem, Task
from .countdown import Countdown
from .shift import ShiftCopy
from .sudoku import Sudoku4

TASKS: dict[str, Task] = {t.name: t for t in (Sudoku4(), Countdown(), ShiftCopy())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["Problem", "Task", "TASKS", "get_task"]
