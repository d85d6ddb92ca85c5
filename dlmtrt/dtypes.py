"""The one table of floating-point dtypes the project computes in, and of its 8-bit checkpoint formats: names
as users type them.

The names are plain strings so that the CLI can build its option choices without importing torch (help and
usage errors stay fast); the torch dtypes are looked up on first use."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16")
ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
QUANT_FORMATS = ("fp8", "int8-wo", "w8a8")  # dlmtrt calibrate --format; models/quantized.py implements them


def __getattr__(name: str):
    if name == "DTYPES":  # {name: torch.dtype}, built when first asked for and then a plain module global
        import torch
        globals()["DTYPES"] = {n: getattr(torch, n) for n in DTYPE_NAMES}
        return globals()["DTYPES"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lookup(name: str) -> "torch.dtype | None":
    """The dtype of a name or alias (float32, fp32, bf16, ...); None when it is none of them."""
    table = globals().get("DTYPES") or __getattr__("DTYPES")
    return table.get(ALIASES.get(name, name))


def dtype_name(dt: "torch.dtype") -> str:
    return str(dt).removeprefix("torch.")
