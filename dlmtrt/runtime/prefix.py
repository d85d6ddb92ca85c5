"""Cross-request prefix K/V reuse (arXiv 2606.07571): a store of prompt-prefix K/V keyed by token blocks.

Keys form a hash chain over fixed-size token blocks, as in the block prefix caches of autoregressive servers:
block j's key hashes block j's tokens together with block j-1's key, so a key names the whole prefix up to
it and two prompts share exactly the entries of their common block-aligned prefix. Each entry holds one
block's K/V rows for every layer on the device; the store is bounded in bytes and evicts least recently used
entries (a chain's later blocks become unreachable once an earlier one is gone, and age out in turn).

How a session uses it (`attach` before the first step, `capture` after it): the matched prefix rows are
written into the session's cache, marked valid, and *frozen*, i.e. read from the cache at every step and never
recomputed, whatever the policy says. Entries are captured from the first step that computed a prompt's rows
in full, in that request's context. For a model whose prefix rows never attend to later rows (block-causal
models) this is exact; Dream and LLaDA attend bidirectionally, so a prefix's K/V depend a little on the rest
of the canvas it was computed with, and reuse across different continuations is an approximation (the README
measures its cost). An identical prompt with a cache policy that never refreshes prompt rows (`pd`, `block`,
`dual`) reuses its own first-step K/V, so it decodes exactly the same tokens with fewer rows computed.
RoPE positions count from a sequence's first real token, so an entry is valid at any left padding.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dlmtrt.errors import UsageError


def block_keys(tokens: list[int], block: int) -> list[str]:
    """The hash-chain key of every full block of `tokens`."""
    keys, parent = [], b""
    for j in range(len(tokens) // block):
        h = hashlib.sha256(parent + b"|" + ",".join(map(str, tokens[j * block:(j + 1) * block])).encode())
        parent = h.digest()
        keys.append(h.hexdigest())
    return keys


@dataclass
class PrefixStats:
    lookups: int = 0
    hit_rows: int = 0  # prompt rows served from the store
    prompt_rows: int = 0  # prompt rows looked up
    inserted_blocks: int = 0
    evicted_blocks: int = 0


BLOCK = 16  # tokens per store entry: the default of the server, the evaluator and the API


@dataclass
class PrefixStore:
    """K/V of prompt prefixes, `block` tokens per entry, at most `max_bytes` in all (LRU)."""

    max_bytes: int
    block: int = BLOCK
    entries: OrderedDict = field(default_factory=OrderedDict)  # key -> (K [layers, Hkv, block, D], V)
    bytes: int = 0
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self):
        if self.block < 1 or self.max_bytes < 0:
            raise UsageError(f"prefix store: block must be >= 1 and max_bytes >= 0 (got {self.block}, "
                             f"{self.max_bytes})")

    def __len__(self) -> int:
        return len(self.entries)

    def attach(self, session) -> int:
        """Before a session's first step (`attach` below)."""
        return attach(session, self)

    def deep(self, session, step: int) -> None:
        """Rows the deep layers add at a step (BiCache's, runtime/bicache.py): none, every layer is frozen."""
        return None

    def capture(self, session, step: int) -> int:
        """After a step (`capture` below): only the first step's prompt blocks are taken."""
        return capture(session, self, step) if step == 0 else 0

    def match(self, tokens: list[int], limit: int) -> list[str]:
        """Keys of the longest stored block chain that starts `tokens` and covers at most `limit` tokens."""
        keys = block_keys(tokens[:limit], self.block)
        out = []
        for k in keys:
            if k not in self.entries:
                break
            self.entries.move_to_end(k)
            out.append(k)
        return out

    def put(self, key: str, k: Tensor, v: Tensor) -> None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        size = k.numel() * k.element_size() + v.numel() * v.element_size()
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, (ok, ov) = self.entries.popitem(last=False)
            self.bytes -= ok.numel() * ok.element_size() + ov.numel() * ov.element_size()
            self.stats.evicted_blocks += 1
        self.entries[key] = (k, v)
        self.bytes += size
        self.stats.inserted_blocks += 1


def _prompts(session) -> list[tuple[int, list[int]]]:
    """(first real slot, prompt tokens) per sequence: the attended rows before the answer."""
    out = []
    am, x, answer = session.am, session.x, session.answer
    for b in range(x.shape[0]):
        real = am[b] & ~answer[b]
        idx = real.nonzero().flatten()
        start = int(idx[0]) if len(idx) else 0
        out.append((start, x[b, start:start + len(idx)].tolist()))
    return out


def attach(session, store: PrefixStore) -> int:
    """Seed `session`'s cache with the stored prefix of each prompt and freeze those rows; returns the rows
    served. The last prompt row is never frozen (its logits predict the first answer token on Dream)."""
    served = 0
    frozen = torch.zeros_like(session.valid)
    for b, (start, toks) in enumerate(_prompts(session)):
        keys = store.match(toks, len(toks) - 1)
        store.stats.lookups += 1
        store.stats.prompt_rows += len(toks)
        n = len(keys) * store.block
        if not n:
            continue
        ks = torch.cat([store.entries[k][0] for k in keys], 2)  # [layers, Hkv, n, D]
        vs = torch.cat([store.entries[k][1] for k in keys], 2)
        session.cache.write_rows(b, start, ks, vs)
        frozen[b, start:start + n] = True
        served += n
    store.stats.hit_rows += served
    session.seq["valid"] = session.valid | frozen
    session.seq["frozen"] = session.frozen | frozen
    return served


def capture(session, store: PrefixStore, step: int) -> int:
    """After `step`: store the full prompt blocks that step computed (all of a prompt's rows up to the block's
    end active in it); returns the blocks inserted."""
    added = 0
    computed = session.computed_at == step
    for b, (start, toks) in enumerate(_prompts(session)):
        comp = None
        for j, key in enumerate(block_keys(toks, store.block)):
            lo, hi = start + j * store.block, start + (j + 1) * store.block
            if key in store.entries:
                store.entries.move_to_end(key)
                continue
            if comp is None:
                comp = computed[b].tolist()  # one read-back per sequence, only when something is new
            if not all(comp[lo:hi]):
                break  # a chain must not have holes
            store.put(key, *session.cache.read_rows(b, lo, hi))
            added += 1
    return added
