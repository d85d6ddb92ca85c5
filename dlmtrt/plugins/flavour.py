"""Which TensorRT Python package this process uses: `tensorrt` (the full TensorRT) where it is importable, else
`tensorrt_rtx` (TensorRT for RTX: the same Python API, and its ONNX parser and builder run without a GPU).

It lives here, below `engine/`, because the TensorRT plugin must subclass the very module the engine builder
imports (a plugin class of one flavour is nothing to the other's registry). `DLMTRT_TENSORRT=tensorrt_rtx`
(or `tensorrt`) picks one explicitly where both are installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

from dlmtrt.errors import DlmtrtError

FLAVOURS = ("tensorrt", "tensorrt_rtx")
ENV = "DLMTRT_TENSORRT"


class TensorRTMissingError(DlmtrtError, RuntimeError):
    """Neither TensorRT flavour is installed (or the one asked for is not); the message says what to install."""


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def flavour() -> str:
    """'tensorrt' or 'tensorrt_rtx', whichever is installed (the full TensorRT first, unless $DLMTRT_TENSORRT
    names one)."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted:
        if wanted not in FLAVOURS:
            raise TensorRTMissingError(f"${ENV}={wanted!r}: choose tensorrt or tensorrt_rtx")
        if not _installed(wanted):
            raise TensorRTMissingError(f"${ENV} asks for {wanted}, which is not installed")
        return wanted
    for name in FLAVOURS:
        if _installed(name):
            return name
    raise TensorRTMissingError("neither the tensorrt nor the tensorrt_rtx Python package is installed: "
                               "`pip install 'dlmtrt[trt]'` (TensorRT-RTX, builds on the CPU too) or the full "
                               "TensorRT from NVIDIA")


def import_trt() -> ModuleType:
    """The TensorRT module `flavour()` picks."""
    return importlib.import_module(flavour())
