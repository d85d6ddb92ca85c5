"""BiCache (Go et al., EMNLP 2026, arXiv 2606.07571; OSSS-KU/BiCache): reuse a shared prefix's K/V across requests in
the shallow layers only, and recompute the prefix in the deep ones.

Freezing a stored prefix in every layer (runtime/prefix.py) is exact for block-causal models, but for a
bidirectional model the prefix's deep K/V depend on what follows it, and the paper measures that the all-layer
freeze drives accuracy to near zero. The prefix's shallow K/V barely move, so BiCache keeps those: a request whose
shared prefix is P of its N canvas tokens (ratio r = round(100 P / N), the answer counted) reuses the prefix-only
forward's K/V in the first b(r) layers, the depth its profile allows (`DepthTable`). At a refresh step (every
`interval` steps, from the first) the deep layers recompute the prefix rows: they enter layer b with the stored
hidden state of layer b-1 and attend the whole canvas (`models.transformer.DeepRows`); between refreshes every
layer reads the prefix from the cache, the deep ones as the last refresh computed it. This is the authors' code as
tests/fixtures/upstream/bicache/ records it, token for token.

The store is keyed by the exact prefix (its token ids), bounded in prefix tokens, least recently used first out,
and holds every layer's K/V and output hidden state of the prefix computed alone. A request says where its shared
prefix ends (`prefix_lengths`: the turns before the last user message, `chat_prefix`), as the authors' engine
does.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmtrt.errors import UsageError


def _template(tokenizer, messages: list[dict], generation: bool = True) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a dict in newer transformers, else a list


def chat_prefix(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """(ids, P): a chat's prompt ids (its template with the generation prompt) and the length P of its shared
    prefix, the turns before the last user message; P = 0 when there is no such boundary (a single message, or
    a last message that is not a user turn): nothing to reuse.

    The split is the authors' tokenization (ALGORITHM.md section 3): the earlier turns' template less its
    trailing assistant header (their `[:-6]`, LLaDA-8B-Instruct's 6-token header; here its length is what makes
    the two parts add up to the whole template), then the last turn's template less its leading BOS. Reuse keys
    the store by the prefix ids, so the split must be the same for every request and the parts must be the
    whole conversation's own template: both are checked. A template that renders turns without anything the
    last turn alone would repeat (no BOS, no default system prompt: Dream's Qwen template prepends one) is split
    where the earlier turns' template, without the generation prompt, ends. The server and the profiler use
    this one function, so a served request's ratio is the profiled one."""
    full = _template(tokenizer, messages)
    if len(messages) < 2 or messages[-1].get("role") != "user":
        return full, 0
    head, last = _template(tokenizer, messages[:-1]), _template(tokenizer, messages[-1:])
    header = len(head) + len(last) - 1 - len(full)
    bos = getattr(tokenizer, "bos_token_id", None)
    if 0 < header < len(head) and last and bos is not None and last[0] == bos and head[:-header] + last[1:] == full:
        return full, len(head) - header
    bare = _template(tokenizer, messages[:-1], generation=False)
    if 0 < len(bare) < len(full) and full[:len(bare)] == bare:
        return full, len(bare)
    raise UsageError("this model's chat template cannot be split where the last user turn starts (neither the "
                     "authors' cut of the assistant header and BOS nor the earlier turns' own template gives the "
                     "conversation's tokens), so BiCache cannot tell a shared prefix from the last turn in its chats")


def prefix_ratio(prefix: int, total: int) -> int:
    """The authors' ratio bucket: round(100 * prefix / total), Python's round (halves to even)."""
    return round(prefix / total * 100)


@dataclass(frozen=True)
class DepthTable:
    """ratio bucket -> layers whose prefix K/V are reused (the profile's b(r), growing with r)."""

    depths: tuple[tuple[int, int], ...]  # (ratio, depth), ratios ascending

    @classmethod
    def of(cls, table: dict) -> "DepthTable":
        items = tuple(sorted((int(r), int(b)) for r, b in table.items()))
        if not items or any(b < 0 for _, b in items):
            raise UsageError(f"a BiCache depth table maps prefix ratios to layer counts >= 0, got {table!r}")
        return cls(items)

    def depth(self, ratio: int, layers: int) -> int:
        """The depth of the greatest ratio key <= `ratio`."""
        below = [b for r, b in self.depths if r <= ratio]
        if not below:
            raise UsageError(f"the BiCache depth table starts at ratio {self.depths[0][0]}, above this request's "
                             f"{ratio}: add a depth for ratio 0 (0 reuses nothing)")
        if below[-1] > layers:
            raise UsageError(f"the BiCache depth table asks for {below[-1]} layers of a {layers}-layer model")
        return below[-1]

    def serving_depth(self, ratio: int, layers: int) -> int:
        """A server's depth: as `depth`, but 0 (served without reuse) below the table's first ratio, which a
        profile whose samples start above 0 leaves out (the authors' engine raises there)."""
        return self.depth(ratio, layers) if ratio >= self.depths[0][0] else 0


@dataclass
class Entry:
    keys: list[Tensor]  # per layer [Hkv, P, D], RoPE applied at positions 0..P-1
    values: list[Tensor]
    hidden: list[Tensor]  # L + 1 states [P, hidden]: the embeddings, then each layer's output


@dataclass
class BiCacheStats:
    hits: int = 0
    misses: int = 0  # each a forward pass over the prefix alone
    evictions: int = 0


@dataclass
class BiCacheStore:
    """Prefix-only states of shared prefixes, at most `max_tokens` prefix tokens in all (LRU)."""

    max_tokens: int
    entries: OrderedDict = field(default_factory=OrderedDict)  # tuple(prefix ids) -> Entry
    tokens: int = 0
    stats: BiCacheStats = field(default_factory=BiCacheStats)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UsageError(f"a BiCache store holds max_tokens >= 1 prefix tokens, got {self.max_tokens!r}")

    def get(self, backend, ids: list[int]) -> Entry:
        """The prefix's entry, computed on a miss (after evicting until it fits: the authors' strict test)."""
        key = tuple(ids)
        if key in self.entries:
            self.stats.hits += 1
            self.entries.move_to_end(key)
            return self.entries[key]
        while not len(ids) < self.max_tokens - self.tokens:
            if not self.entries:
                raise UsageError(f"a shared prefix of {len(ids)} tokens does not fit a BiCache store of "
                                 f"{self.max_tokens} tokens: raise the store's size")
            _, old = self.entries.popitem(last=False)
            self.tokens -= old.keys[0].shape[1]
            self.stats.evictions += 1
        self.stats.misses += 1
        dev = backend.info.device
        keys, values, hidden = backend.prefix_states(torch.tensor([ids], device=dev))
        entry = Entry([k[0] for k in keys], [v[0] for v in values], [h[0] for h in hidden])
        self.entries[key] = entry
        self.tokens += len(ids)
        return entry


@dataclass
class BiCache:
    """One generation's BiCache: the store, the depth table, each sequence's shared-prefix length and the refresh
    interval (the authors' run script: 16). Passed as a session's `prefix_store`."""

    store: BiCacheStore
    table: DepthTable
    prefix_lengths: list[int]
    interval: int = 16
    depth: int | None = field(default=None, init=False)  # the generation's depth, set by attach

    def attach(self, session) -> int:
        """Write each sequence's stored prefix K/V into the cache and freeze those rows; returns the rows served."""
        if not session.backend.deep_rows:
            raise UsageError(f"BiCache recomputes the prefix in the deep layers, which the {session.backend.name} "
                             "backend cannot: use --backend torch")
        if self.interval < 1:
            raise UsageError(f"the BiCache refresh interval must be >= 1, got {self.interval}")
        x, am, answer = session.x, session.am, session.answer
        B = x.shape[0]
        if len(self.prefix_lengths) != B:
            raise UsageError(f"BiCache needs one shared-prefix length per sequence: {B} sequences, "
                             f"{len(self.prefix_lengths)} lengths")
        layers = session.info.num_layers
        depths, slots, hidden = set(), [], []
        frozen = torch.zeros_like(session.valid)
        for b in range(B):
            real = am[b].nonzero().flatten()
            start, P = int(real[0]), self.prefix_lengths[b]
            prompt = int((am[b] & ~answer[b]).sum())
            if not 0 < P < prompt:
                raise UsageError(f"a shared prefix must be shorter than its prompt and not empty: sequence {b} has "
                                 f"{prompt} prompt tokens, prefix length {P}")
            depth = self.table.depth(prefix_ratio(P, int(am[b].sum())), layers)
            depths.add(depth)
            entry = self.store.get(session.backend, x[b, start:start + P].tolist())
            session.cache.write_rows(b, start, torch.stack(entry.keys), torch.stack(entry.values))
            frozen[b, start:start + P] = True
            slots.append(torch.arange(start, start + P, device=x.device))
            hidden.append(entry.hidden[depth])
        if len(depths) > 1:
            raise UsageError(f"BiCache decodes sequences of one reuse depth together, these need {sorted(depths)}: "
                             "batch requests of similar prefix ratios")
        self.depth = depths.pop()
        Pm = max(len(s) for s in slots)  # shorter prefixes repeat their last row (an idempotent rewrite)
        # per-sequence state, so that a batch cut (DecodeSession.keep) cuts it too
        session.seq["bicache.slots"] = torch.stack([torch.cat([s, s[-1:].expand(Pm - len(s))]) for s in slots])
        session.seq["bicache.hidden"] = torch.stack([torch.cat([h, h[-1:].expand(Pm - len(h), -1)]) for h in hidden])
        session.seq["valid"] = session.valid | frozen
        session.seq["frozen"] = session.frozen | frozen
        return int(frozen.sum())

    def deep(self, session, step: int):
        """The rows the deep layers add at `step`: the prefix, at refresh steps (none when every layer reuses it)."""
        from dlmtrt.models.transformer import DeepRows
        if step % self.interval or self.depth >= session.info.num_layers:
            return None
        return DeepRows(self.depth, session.seq["bicache.slots"], session.seq["bicache.hidden"])

    def capture(self, session, step: int) -> int:
        """Nothing: the store takes prefixes computed alone, on a miss."""
        return 0


def layer_similarity(backend, prefix: list[int], rest: list[int]) -> Tensor:
    """[layers] the authors' profile of one sample: per layer, the cosine similarity between the prefix's K (and V)
    computed alone and the same rows computed with `rest` after them, per token over all K/V heads, averaged over
    the tokens and K and V together. (RoPE rotates both alike, so it does not change a cosine.)"""
    dev = backend.info.device
    alone = backend.prefix_states(torch.tensor([prefix], device=dev))
    full = backend.prefix_states(torch.tensor([prefix + rest], device=dev))
    P = len(prefix)
    flat = lambda t: t[0, :, :P].transpose(0, 1).reshape(P, -1).float()  # noqa: E731  [P, Hkv * D]
    out = []
    for ka, va, kf, vf in zip(alone[0], alone[1], full[0], full[1]):
        sims = torch.stack([F.cosine_similarity(flat(ka), flat(kf), dim=1),
                            F.cosine_similarity(flat(va), flat(vf), dim=1)])
        out.append(sims.mean())
    return torch.stack(out)


def depth_table(bucket_means: list[Tensor], threshold: float, first: int = 0) -> dict[int, int]:
    """The authors' table from per-bucket mean similarities (bucket_means[k] is ratio first + k; theirs start at
    0): the leading layers strictly above `threshold`, recorded only where that count exceeds every earlier
    bucket's (so it only grows; a bucket whose count is 0 before any other is recorded gets no entry, and a
    request below the first entry is served without reuse)."""
    table, best = {}, 0
    for k, sims in enumerate(bucket_means):
        n = 0
        for x in sims.tolist():
            if not x > threshold:
                break
            n += 1
        if n > best:
            best = table[first + k] = n
    return table


def profile(backend, buckets: list[list[tuple[list[int], list[int]]]], threshold: float = 0.97, first: int = 0,
            progress=None) -> tuple[dict[int, int], list[Tensor]]:
    """Profile a model offline: `buckets[k]` holds (shared prefix ids, rest ids) samples whose prefix makes
    first + k % of them (the authors' profile ratio counts no answer); returns the depth table and each bucket's
    mean per-layer similarity. Every bucket from `first` on must have samples (the table is read from the lowest
    ratio up; the authors' start at 0). `progress(n)` is called after each sample."""
    means = []
    for k, samples in enumerate(buckets):
        if not samples:
            raise UsageError(f"BiCache profiling needs samples in every ratio bucket from {first}: bucket "
                             f"{first + k} is empty")
        sims = []
        for p, q in samples:
            sims.append(layer_similarity(backend, p, q))
            if progress is not None:
                progress(1)
        means.append(torch.stack(sims).mean(0))
    return depth_table(means, threshold, first), means
