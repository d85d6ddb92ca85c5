"""The state of one generation, owned by its `DecodeSession`: the K/V cache (`KVCache`, with its declared owner)
and every per-sequence tensor (`SequenceState`: the canvas and its masks, the rule's schedule counts, the cache
policy's memory), so that cutting a batch, attaching a stored prefix or packing requests are operations on these
two objects rather than on fields scattered over the loop, the rule and the policy.
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor


class SequenceState:
    """Named per-sequence tensors, every one [B, ...] over the generation's B sequences. The loop keeps the
    canvas and its masks here, a rule its per-sequence schedule (keys `rule.*`), a cache policy its memory;
    `keep` cuts all of them alike, so a new tensor needs no code to follow a batch cut."""

    def __init__(self, batch: int):
        self.batch = batch
        self._t: dict[str, Tensor] = {}

    def __setitem__(self, name: str, t: Tensor) -> None:
        if not isinstance(t, Tensor) or t.dim() == 0 or t.shape[0] != self.batch:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"sequence state {name!r} must be a tensor [B={self.batch}, ...], got {shape}")
        self._t[name] = t

    def __getitem__(self, name: str) -> Tensor:
        return self._t[name]

    def __contains__(self, name: str) -> bool:
        return name in self._t

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def get(self, name: str, default=None):
        return self._t.get(name, default)

    def keep(self, idx: Tensor) -> None:
        """Go on with sequences `idx` only (in that order); host copies (a rule's predictions) are cut alike."""
        self._t = {k: t[idx.to(t.device)] for k, t in self._t.items()}
        self.batch = len(idx)


class KVCache:
    """The per-layer K/V of a generation's canvas, [copies * B, Hkv, L, D] each (`copies` 2 under classifier-free
    guidance: the conditional rows, then the unconditional ones). `owner` is "session" (fresh buffers the session
    may cut) or "backend" (buffers the backend hands out again to every session: torch-graph, tensorrt)."""

    def __init__(self, keys: list[Tensor], values: list[Tensor], *, owner: str, copies: int = 1):
        if owner not in ("session", "backend"):
            raise ValueError(f"a cache's owner is 'session' or 'backend', not {owner!r}")
        self.keys, self.values, self.owner, self.copies = keys, values, owner, copies

    @classmethod
    def new(cls, backend, batch: int, length: int, copies: int = 1) -> "KVCache":
        keys, values = backend.new_cache(copies * batch, length)
        return cls(keys, values, owner="backend" if backend.shares_cache else "session", copies=copies)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0] // self.copies

    def update(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """A step's present K/V become the next step's past."""
        self.keys, self.values = keys, values

    def write_rows(self, b: int, start: int, k: Tensor, v: Tensor) -> None:
        """Rows start.. of sequence b from stored K/V [layers, Hkv, n, D] (a prefix store's entries)."""
        n = k.shape[2]
        for layer, (kk, vv) in enumerate(zip(self.keys, self.values)):
            kk[b, :, start:start + n] = k[layer]
            vv[b, :, start:start + n] = v[layer]

    def read_rows(self, b: int, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Copies of rows lo..hi of sequence b, [layers, Hkv, hi - lo, D] each."""
        import torch
        return (torch.stack([k[b, :, lo:hi] for k in self.keys]).clone(),
                torch.stack([v[b, :, lo:hi] for v in self.values]).clone())

    def keep(self, idx: Tensor) -> None:
        """Go on with sequences `idx` only. Only a session-owned cache can be cut; a backend's buffers stay whole
        (its sessions run one at a time and finished rows simply compute nothing)."""
        if self.owner != "session":
            raise ValueError("this cache belongs to the backend (it hands the same buffers to every session): it "
                             "cannot be cut; let finished sequences run on (they compute no rows)")
        import torch
        B = self.batch
        rows = torch.cat([idx + c * B for c in range(self.copies)])
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
