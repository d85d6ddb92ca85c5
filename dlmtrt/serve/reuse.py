"""What a server's cross-request prefix reuse is, decided from its options before any weights load.

Three kinds, by the model's attention:
- block-causal families (SDAR): the all-layer freeze (runtime/prefix.PrefixStore), on by default. A shared
  prefix never attends to what follows it, so its K/V are the same in every request: exact. BiCache is refused
  for them, since it would only recompute what is already exact.
- bidirectional families (Dream, LLaDA), `--prefix-cache-mb N`: BiCache (runtime/bicache.py, the paper's
  method): the shared prefix of a chat (the turns before its last user message) is reused in the shallow layers
  its profiled depth table allows and recomputed in the deep ones every `interval` steps. It needs the table
  (`dlmtrt bicache-profile`) and a backend that takes deep rows (torch).
- bidirectional families, `--prefix-cache-mode freeze`: the all-layer freeze, asked for explicitly, because it
  is lossy there: a frozen prefix's deep K/V ignore the continuation they are reused with (measured on the tiny
  task models: LLaDA countdown 0.285 -> 0.170 under `dual`, bench/results/prefix-reuse-cpu.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dlmtrt.errors import UsageError

MODES = ("freeze", "bicache")
LOSSY_FREEZE = ("is lossy for {family} models: they attend bidirectionally, so a frozen prefix's K/V ignore the "
                "continuation they are reused with (measured on the tiny task models: LLaDA countdown 0.285 -> "
                "0.170 under dual, bench/results/prefix-reuse-cpu.json); BiCache (the default mode) is the "
                "paper's method for them")


@dataclass(frozen=True)
class ReusePlan:
    """The server's prefix reuse: mode "off", "freeze" (`freeze_bytes`; `lossy` on a bidirectional family) or
    "bicache" (`bicache_tokens` prefix tokens of `token_bytes` each, the table at `table_path`, `interval`)."""

    mode: str
    freeze_bytes: int = 0
    lossy: bool = False
    bicache_tokens: int = 0
    token_bytes: int = 0
    table_path: Path | None = None
    interval: int = 16

    def describe(self, family: str) -> str:
        """The startup line that says what reuse runs, and whether it is exact."""
        if self.mode == "off":
            return "prefix reuse off"
        if self.mode == "freeze":
            mb = self.freeze_bytes >> 20
            if self.lossy:
                return f"prefix freeze ({mb} MiB) {LOSSY_FREEZE.format(family=family)}"
            return f"prefix freeze ({mb} MiB; exact for {family}: a prefix never attends to later rows)"
        return (f"BiCache: {self.bicache_tokens} prefix tokens ({self.token_bytes} bytes each), depth table "
                f"{self.table_path}, refresh every {self.interval} steps; chats with earlier turns reuse them")


def token_bytes(args, dtype: str) -> int:
    """Bytes one prefix token holds in a BiCache store: every layer's K and V and the L + 1 hidden states (the
    embeddings, then each layer's output) at the serving dtype."""
    from dlmtrt.dtypes import ALIASES
    size = 4 if ALIASES.get(dtype, dtype) == "float32" else 2
    L = args.num_layers
    return (2 * L * args.num_kv_heads * args.head_dim + (L + 1) * args.hidden_size) * size


def plan_reuse(*, family: str, block_causal: bool, backend: str, deep_rows: bool, args, dtype: str,
               model_dir: str | Path, mb: int | None, mode: str | None, table_file: str | Path | None,
               interval: int | None, block_causal_mb: int) -> ReusePlan:
    """The reuse the options ask for (module docstring), or one line saying why not and what to do; nothing is
    loaded but the table file."""
    bicache_opts = [o for o, v in (("--bicache-table", table_file), ("--bicache-interval", interval)) if v is not None]
    if block_causal:
        if mode == "bicache" or bicache_opts:
            what = "--prefix-cache-mode bicache" if mode == "bicache" else bicache_opts[0]
            raise UsageError(f"{what}: {family} models are block-causal, so their prefix freeze is already exact (a "
                             "shared prefix never attends to what follows it); BiCache is for bidirectional models")
        size = block_causal_mb if mb is None else mb
        return ReusePlan("freeze", freeze_bytes=size << 20) if size else ReusePlan("off")
    if not mb:
        given = (["--prefix-cache-mode"] if mode is not None else []) + bicache_opts
        if given:
            raise UsageError(f"{given[0]} needs --prefix-cache-mb N (N > 0: the store's size); prefix reuse is off "
                             f"for {family} models without it")
        return ReusePlan("off")
    if mode == "freeze":
        if bicache_opts:
            raise UsageError(f"{bicache_opts[0]} applies to BiCache, not to --prefix-cache-mode freeze")
        return ReusePlan("freeze", freeze_bytes=mb << 20, lossy=True)
    if not deep_rows:
        how = ("TensorRT engines cannot" if backend == "tensorrt" else f"the {backend} backend cannot")
        raise UsageError(f"--prefix-cache-mb on a {family} model means BiCache, which recomputes the shared prefix "
                         f"in the deep layers: {how}; serve the checkpoint with `dlmtrt serve --backend torch`, or "
                         "pass --prefix-cache-mode freeze (lossy for this family)")
    from dlmtrt.runtime.bicache_table import TABLE_FILE, read_table, table_path
    path = table_path(model_dir, table_file)
    if path is None:
        raise UsageError(f"--prefix-cache-mb on a {family} model means BiCache, which needs the model's depth table "
                         f"and there is no {TABLE_FILE} in {model_dir}: profile the model once with `dlmtrt "
                         "bicache-profile -m MODEL`, or pass --bicache-table FILE")
    read_table(path, args.num_layers)
    per = token_bytes(args, dtype)
    tokens = (mb << 20) // per
    if tokens < 2:
        raise UsageError(f"--prefix-cache-mb {mb} holds {tokens} prefix tokens of this model ({per} bytes each: "
                         "every layer's K and V and its hidden states); raise it")
    return ReusePlan("bicache", bicache_tokens=tokens, token_bytes=per, table_path=path,
                     interval=16 if interval is None else interval)


@dataclass
class BiCacheServing:
    """The server's BiCache: one store shared by every cohort, the depth table and the refresh interval. A
    request's depth decides its cohort (BiCache decodes one depth per batch); depth 0 means served without
    reuse: no boundary, a ratio below the table's first entry, a prefix larger than the whole store, or a
    generation prefix reuse does not apply to (LLaDA's classifier-free guidance)."""

    store: object  # runtime/bicache.BiCacheStore
    table: object  # runtime/bicache.DepthTable
    interval: int
    layers: int

    def depth(self, prefix_len: int, prompt_len: int, new_tokens: int) -> int:
        """The depth BiCache.attach will pick for this request (the authors' ratio counts the answer)."""
        from dlmtrt.runtime.bicache import prefix_ratio
        if not 0 < prefix_len < prompt_len or prefix_len >= self.store.max_tokens:
            return 0
        return self.table.serving_depth(prefix_ratio(prefix_len, prompt_len + new_tokens), self.layers)

    def for_cohort(self, prefix_lengths: list[int]):
        """One generation's prefix store (a session's `prefix_store`) over the shared store."""
        from dlmtrt.runtime.bicache import BiCache
        return BiCache(self.store, self.table, list(prefix_lengths), self.interval)
