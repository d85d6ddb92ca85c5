"""Shape buckets and the static step buffers keyed by them: one scheme for every place that pads a dynamic size
to a few fixed ones (the fast backends' active rows, the server's prompt lengths, an engine's default profile).

Why buckets: a backend that replays CUDA graphs, or an engine with optimization profiles, runs fixed shapes; a
denoising step's active rows take any count from 1 to the canvas. Padding the count up to the next bucket keeps
the number of shapes (graphs, static buffers) logarithmic in the canvas, at the cost of a bounded share of
padded rows: powers of two, with the midpoint 3/2 * 2^k from 16 on (a block plus its neighbours, or a prompt's
new rows under prefix reuse, pay at most a third in padding rather than half), then the length itself.

Rows are padded by repeating the last real one (`pad_rows`): in the step contract that rewrites the same canvas
slot with the same values, so the padded rows change nothing and their outputs are cut off (`StaticSteps` holds
the buffers and, on a GPU, the captured graph of each shape, least recently used first out).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable


def row_buckets(length: int, smallest: int = 1) -> list[int]:
    """The buckets for sizes up to `length`: powers of two from `smallest`, midpoints from 16, then `length`."""
    out, b = [], smallest
    while b < length:
        out.append(b)
        if b >= 16 and b * 3 // 2 < length:
            out.append(b * 3 // 2)
        b *= 2
    return out + [length]


def bucket(n: int, length: int, smallest: int = 1) -> int:
    """The bucket of `n` (1 <= n <= length): the smallest one that holds it. Beyond `length`, `n` itself."""
    if n > length:
        return n
    return next(b for b in row_buckets(length, smallest) if b >= n)


def pad_rows(t, size: int):
    """[B, A] -> [B, size] by repeating the last column (the step contract's idempotent padding row)."""
    import torch
    A = t.shape[1]
    return t if size == A else torch.cat([t, t[:, -1:].expand(t.shape[0], size - A)], 1)


class StaticSteps:
    """Static step buffers (and their captured CUDA graphs) per shape key, at most `capacity`; `make(key)` builds
    an entry. When full, the least recently used entry goes, or with `evict_all` every entry (graphs captured
    into one shared memory pool can only be released together); `reset()` then runs (a new pool)."""

    def __init__(self, make: Callable[[tuple], dict], capacity: int = 64, *, evict_all: bool = False,
                 reset: Callable[[], None] | None = None):
        if capacity < 1:
            raise ValueError("StaticSteps needs a capacity >= 1")
        self.make, self.capacity, self.evict_all, self.reset = make, capacity, evict_all, reset
        self.entries: OrderedDict[tuple, dict] = OrderedDict()
        self.evicted = 0

    def get(self, key: tuple) -> dict:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            return entry
        if len(self.entries) >= self.capacity:
            self.evicted += len(self.entries) if self.evict_all else 1
            if self.evict_all:
                self.clear()
            else:
                self.entries.popitem(last=False)
        entry = self.entries[key] = self.make(key)
        return entry

    def clear(self) -> None:
        self.entries.clear()
        if self.reset is not None:
            self.reset()

    def __len__(self) -> int:
        return len(self.entries)
