from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from models.tiny import make_tiny  # noqa: E402

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
