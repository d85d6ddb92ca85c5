"""Build TensorRT engines of the exported step graph.

`tensorrt` is used where it is importable, else `tensorrt_rtx` (TensorRT for RTX: the same Python API, and its
ONNX parser and builder run on a machine without a GPU). Polygraphy drives the build so that its loaders,
profiles and runners are the ones the comparison tools already use.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from dlmtrt.errors import DlmtrtError


class EngineError(DlmtrtError, RuntimeError):
    """No TensorRT flavour is installed, or the engine cannot be built; the message says what is needed."""


def flavour() -> str:
    """'tensorrt' or 'tensorrt_rtx', whichever is installed (the full TensorRT first)."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        return "tensorrt_rtx"
    raise EngineError("neither the tensorrt nor the tensorrt_rtx Python package is installed")


def _polygraphy_trt(rtx: bool):
    """Polygraphy's TensorRT backend, told which flavour to import before its first import."""
    from polygraphy import config
    if "polygraphy.backend.trt" not in sys.modules:
        config.USE_TENSORRT_RTX = rtx
    import polygraphy.backend.trt as trt_backend
    return trt_backend


def profile_from_shapes(feeds: Sequence[Mapping]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per input covering every feed: min the smallest, opt and max the largest."""
    out = {}
    for n in feeds[0]:
        shapes = [tuple(f[n].shape) for f in feeds]
        lo = tuple(min(s[d] for s in shapes) for d in range(len(shapes[0])))
        hi = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
        out[n] = (lo, hi, hi)
    return out


def engine_from_onnx(path: str | Path, shapes: Mapping[str, tuple[tuple, tuple, tuple]]):
    """A built (in-memory) engine of `path` with one optimization profile of `shapes`, strongly typed so the
    graph's own dtypes are kept."""
    name = flavour()
    trt = _polygraphy_trt(name == "tensorrt_rtx")
    profile = trt.Profile()
    for n, (lo, opt, hi) in shapes.items():
        profile.add(n, min=lo, opt=opt, max=hi)
    return trt.engine_from_network(trt.NetworkFromOnnxPath(str(path), strongly_typed=True),
                                   config=trt.CreateConfig(profiles=[profile]))
