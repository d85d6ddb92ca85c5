"""Step backends, one file each. `make_backend` is the only place that knows them all."""
from __future__ import annotations


def make_backend(name: str, model: str, dtype: str = "float32", device: str | None = "cpu", progress=None):
    """(backend, tokenizer, checkpoint) for a backend name and a model directory, alias or repo id."""
    if name == "torch":
        from models.loading import load

        from .torch_backend import TorchBackend
        m, tok, ck = load(model, dtype=dtype, device=device, progress=progress)
        return TorchBackend(m), tok, ck
    raise ValueError(f"unknown backend '{name}'; available: torch")
