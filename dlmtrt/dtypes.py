"""The one table of floating-point dtypes the project computes in: names as users type them."""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = tuple(DTYPES)
ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def lookup(name: str) -> torch.dtype | None:
    """The dtype of a name or alias (float32, fp32, bf16, ...); None when it is none of them."""
    return DTYPES.get(ALIASES.get(name, name))


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")
