from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlmtrt.models.tiny import make_tiny

FAMILIES = ["dream", "llada"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Session-wide tiny checkpoints, one per family: tiny_dir('dream')."""
    cache: dict[str, Path] = {}

    def get(family: str, **kw) -> Path:
        key = family + repr(sorted(kw.items()))
        if key not in cache:
            cache[key] = make_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}") / "ckpt", **kw)
        return cache[key]
    return get


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Session-wide ONNX exports of the shipped task checkpoints (each costs ~20 s of tracing):
    exported('dream', dtype='float32', attention='standard') -> export directory."""
    from dlmtrt.export.onnx_export import export_step
    cache: dict[tuple, Path] = {}

    def get(family: str, dtype: str = "float32", attention: str = "standard") -> Path:
        key = (family, dtype, attention)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"onnx_{family}_{dtype}_{attention}") / "export"
            res = export_step(f"tiny-{family}-tasks", out, dtype=dtype, attention=attention, log=lambda m: None)
            assert res.checks is not None and res.checks.ok
            cache[key] = out
        return cache[key]
    return get
