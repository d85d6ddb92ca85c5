"""Per-sequence random generators, so that sampling sequences can share a batch and still draw exactly what each
draws alone.

A decode rule draws over the flattened positions of the whole batch, row after row (`torch.rand(N)`,
`Categorical(probs).sample()` over [N, V]). Alone, a sequence draws the same calls over its own positions only.
So where a draw's positions are row-major blocks of known sizes, drawing block b from sequence b's own generator,
in row order, gives each sequence the draws it makes alone, as long as its blocks are the positions it would
draw over alone. `row_generators(gens)` makes that so for the steps run inside it (the server's sampling
cohorts); outside it every helper is the plain global-generator call it replaces, unchanged.

Covered draws (each family's `batches_sampling` says which requests therefore batch exactly): Dream's `origin`
order (the transfer draw and the token sample over the transferred positions), LLaDA's Gumbel noise with
low-confidence remasking; both with the `none` policy, where every sequence computes its own whole canvas, over
its own masked positions whatever the batch's padding (tests/test_row_rng.py).
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import Tensor

_local = threading.local()


@contextlib.contextmanager
def row_generators(gens: list[torch.Generator] | None):
    """Draws in the block come from `gens[b]` for batch row b (None: the global generator, as without it)."""
    prev = getattr(_local, "gens", None)
    _local.gens = gens
    try:
        yield
    finally:
        _local.gens = prev


def active() -> list[torch.Generator] | None:
    return getattr(_local, "gens", None)


def counts(rows: Tensor) -> list[int]:
    """Block sizes: `rows` is a [B, ...] bool mask of the positions drawn over (its row sums) or the sizes [B].
    Summed only here, i.e. only under row generators: the plain path pays nothing for them."""
    if rows.dtype == torch.bool:
        rows = rows.reshape(rows.shape[0], -1).sum(1)
    return [int(c) for c in rows.tolist()]


def _blocks(rows: Tensor | None) -> tuple[list[torch.Generator], list[int]] | None:
    gens = active()
    if gens is None or rows is None:
        return None
    sizes = counts(rows)
    if len(sizes) != len(gens):
        raise RuntimeError(f"row generators: {len(gens)} generators for a batch of {len(sizes)} rows")
    return gens, sizes


def rand(n: int, rows: Tensor | None, *, dtype=None, device=None) -> Tensor:
    """`torch.rand(n)`, where the n positions are row-major blocks of the sizes `counts(rows)` gives."""
    blocks = _blocks(rows)
    if blocks is None:
        return torch.rand(n, dtype=dtype, device=device)
    return torch.cat([torch.rand(c, dtype=dtype, device=device, generator=g) for g, c in zip(*blocks)])


def rand_like(t: Tensor, rows: Tensor | None, *, dtype=None) -> Tensor:
    """`torch.rand_like(t)` for t [N, ...] whose leading positions are row-major blocks (`counts(rows)`)."""
    blocks = _blocks(rows)
    if blocks is None:
        return torch.rand_like(t, dtype=dtype)
    return torch.cat([torch.rand(c, *t.shape[1:], dtype=dtype or t.dtype, device=t.device, generator=g)
                      for g, c in zip(*blocks)])


def categorical(probs: Tensor, gen: torch.Generator) -> Tensor:
    """`Categorical(probs=probs).sample()` drawn from `gen`: the same normalisation and the same `multinomial`."""
    norm = probs / probs.sum(-1, keepdim=True)
    if not bool(torch.isfinite(norm).all()) or bool((norm < 0).any()):
        raise ValueError("invalid probabilities")  # where Categorical's validation refuses them
    return torch.multinomial(norm, 1, True, generator=gen).squeeze(-1)
