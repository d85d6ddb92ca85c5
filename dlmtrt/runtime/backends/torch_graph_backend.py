"""The fast PyTorch backend: one preallocated K/V buffer written in place, active rows padded to a few row
buckets, and on CUDA each (batch, bucket, canvas) step captured once as a CUDA graph and replayed.

Why: at 7B scale an eager step is overhead-bound (hundreds of kernel launches, allocator traffic, a copy of
every layer's cache per step), so computing fewer rows buys nothing at batch 1. A replayed graph costs about
one read of the weights plus the rows' arithmetic, which is what makes a cache policy's saved rows saved time.

Rows are padded by repeating the last active slot (an idempotent rewrite of the same row, as the decode loop
already does across a batch); the padded rows' outputs are cut off before they are returned. The output head
runs only on the rows whose logits the rule needs (`StepInputs.logit_rows`), q|k|v and gate|up are one
matrix each (fewer, larger matrix-vector products at one row), and the K/V drift is computed only for
policies that read it. The logit rows are padded to a bucket too (at most as large as the active rows'), and
every graph writes its logits into one shared buffer, so a generation captures a handful of graphs and holds
one set of logits, not one per graph. On the CPU the same static-buffer, bucketed, in-place path runs without capture, so it
is tested where CI runs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmtrt.errors import UsageError
from dlmtrt.models.attention_kinds import AttentionKind, sdpa_mask
from dlmtrt.models.transformer import DiffusionLM
from dlmtrt.plugins.launcher import library_built

from ..buckets import StaticSteps, bucket, pad_rows
from ..contract import ModelInfo, StepInputs, StepOutputs
from . import CheckpointBackend


def gqa_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_pos: Tensor, k_pos: Tensor, kind,
                  gqa: bool = False) -> Tensor:
    """`models.transformer.cached_attention` without materialising the grouped K/V heads (`gqa` is fixed per
    model, so a compiled graph does not depend on it)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(kind, valid, q_pos, k_pos), enable_gqa=gqa)


def auto_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_pos: Tensor, k_pos: Tensor, kind,
                   gqa: bool = False, hopper: bool = False) -> Tensor:
    """Our kernel where it measured faster than SDPA (by the rows of the step and whether the GPU is a Hopper,
    fixed per backend: a captured graph takes one side), SDPA elsewhere."""
    from dlmtrt.plugins.torch_op import kernel_is_faster, plugin_attend
    if kernel_is_faster(q, hopper):
        return plugin_attend(q, k, v, valid, q_pos, k_pos, kind)
    return gqa_attention(q, k, v, valid, q_pos, k_pos, kind, gqa)


def _allow_recompiles(limit: int = 64) -> None:
    """Dynamo keys its compiled graphs on the code object, which every compiled backend in a process shares, and
    specialises on the model, the drift flag and sizes of 1: a few models (or one model with and without drift)
    pass dynamo's default of 8 graphs, and with fullgraph the next step fails instead of falling back to eager."""
    import torch._dynamo.config as cfg
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, name, max(getattr(cfg, name), limit))


class TorchGraphBackend(CheckpointBackend):
    name = "torch-graph"
    selects_logit_rows = True
    shares_cache = True  # one cache buffer, written in place: one session at a time
    step_options = ("compile", "attention")
    GRAPHS = 512  # static buffer sets (and graphs) kept; far more than one canvas's buckets need

    def __init__(self, model: DiffusionLM, *, graphs: bool | None = None, smallest_bucket: int = 1,
                 compile: bool = False, fuse: bool = True, attention: str = "auto"):
        """`attention`: "sdpa" (PyTorch's fused attention), "kernel" (our cached-attention CUDA kernel, the one
        the TensorRT plugin runs, through `torch.ops.dlmtrt.cached_attention_cuda`; CUDA only) or "auto": the
        kernel for the steps where it measured faster than SDPA (`torch_op.kernel_is_faster`), SDPA for the
        rest, and SDPA everywhere on the CPU or where the kernel library is not built."""
        if attention not in ("auto", "sdpa", "kernel"):
            raise UsageError(f"attention must be 'auto', 'sdpa' or 'kernel', not {attention!r}")
        if attention == "kernel" and model.model.embed_tokens.weight.device.type != "cuda":
            raise UsageError("attention 'kernel' runs our CUDA kernel: put the model on a CUDA device (--device cuda), "
                             "or use 'sdpa'")
        self.model = model.eval()
        if fuse:
            model.fuse_projections()
        a = model.args
        w = model.model.embed_tokens.weight
        self.info = ModelInfo.of(a, w.dtype, w.device)
        if w.is_cuda:
            from dlmtrt.plugins import fp8_linear  # noqa: F401  registers the few-row fp8 kernel with QuantLinear
        attend = functools.partial(gqa_attention, gqa=a.num_heads != a.num_kv_heads)
        if attention == "auto" and w.is_cuda and w.dtype != torch.float32 and library_built():
            from dlmtrt.plugins.torch_op import is_hopper
            attend = functools.partial(auto_attention, gqa=a.num_heads != a.num_kv_heads, hopper=is_hopper(w.device))
        elif attention == "kernel":
            from dlmtrt.plugins.torch_op import plugin_attend as attend
        self.attention = attention
        for layer in model.model.layers:
            layer.self_attn.attend = attend
        self.graphs = (w.device.type == "cuda") if graphs is None else graphs
        if self.graphs and w.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.smallest = smallest_bucket
        self.kv: Tensor | None = None
        self._logits: Tensor | None = None  # flat; each graph's logits are a view of its start
        self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._static = StaticSteps(self._make_static, self.GRAPHS, evict_all=True, reset=self._new_pool)
        self.captures = 0
        self.replays = 0
        self._fn = self._eager
        if compile:  # fuses the step's many small element-wise kernels; one graph for every bucket (dynamic rows)
            _allow_recompiles()
            self._fn = torch.compile(self._eager, fullgraph=True, dynamic=True)

    def new_cache(self, batch: int, length: int):
        """Views into one zeroed buffer [layers, 2, B, Hkv, L, D]; steps write into it in place."""
        a = self.model.args
        w = self.model.model.embed_tokens.weight
        shape = (a.num_layers, 2, batch, a.num_kv_heads, length, a.head_dim)
        if self.kv is None or self.kv.shape != shape:
            self._drop_graphs()  # they point into the old buffer
            self.kv = None
            self.kv = torch.zeros(shape, dtype=w.dtype, device=w.device)
        else:
            self.kv.zero_()
        return [self.kv[i, 0] for i in range(a.num_layers)], [self.kv[i, 1] for i in range(a.num_layers)]

    def _drop_graphs(self) -> None:
        self._static.clear()

    def _new_pool(self) -> None:
        if self.graphs:  # a pool whose graphs are all gone cannot take new captures (allocator assert)
            self._pool = torch.cuda.graph_pool_handle()

    def _logits_view(self, B: int, R: int) -> Tensor:
        """[B, R, V] at the start of the shared logits buffer, grown (and the graphs dropped) when too small."""
        n = B * R * self.info.vocab_size
        if self._logits is None or self._logits.numel() < n:
            self._drop_graphs()
            self._logits = None
            self._logits = torch.empty(n, dtype=self.info.dtype, device=self.info.device)
        return self._logits[:n].view(B, R, self.info.vocab_size)

    def _bucket(self, active: int, length: int) -> int:
        return bucket(active, length, self.smallest)

    def _eager(self, ids, pos, keys, values, stable, am, rows, drift: bool, kind):
        logits, _, _, valid, kv_drift = self.model(ids, pos, keys, values, stable, am, inplace=True,
                                                   logit_index=rows, drift=drift, attention=kind)
        return logits, valid, kv_drift

    def _forward(self, st: dict) -> None:
        logits, st["valid"], st["drift"] = self._fn(st["ids"], st["pos"], st["keys"], st["values"], st["stable"],
                                                    st["am"], st["rows"], st["need_drift"], st["kind"])
        st["logits"].copy_(logits)

    def _make_static(self, key: tuple) -> dict:
        B, A, L, R, drift, attention = key
        dev = self.info.device
        a = self.model.args
        logits = self._logits_view(B, A if R is None else R)
        st = {"logits": logits, "ids": torch.zeros(B, A, dtype=torch.long, device=dev),
              "pos": torch.arange(A, device=dev).expand(B, A).contiguous(),
              "rows": None if R is None else torch.zeros(B, R, dtype=torch.long, device=dev),
              "need_drift": drift, "kind": AttentionKind.parse(attention) if attention else None,
              "stable": torch.zeros(B, L, dtype=torch.bool, device=dev),
              "am": torch.ones(B, L, dtype=torch.bool, device=dev),
              "keys": [self.kv[i, 0] for i in range(a.num_layers)],
              "values": [self.kv[i, 1] for i in range(a.num_layers)]}
        if self.graphs:
            saved = self.kv.clone()  # warm-up and capture write into the cache: put it back afterwards
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.inference_mode():
                for _ in range(2):
                    self._forward(st)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool):
                self._forward(st)
            st["graph"] = graph
            self.kv.copy_(saved)
            del saved
            self.captures += 1
        return st

    @torch.inference_mode()
    def step(self, s: StepInputs) -> StepOutputs:
        B, A = s.input_ids.shape
        L = s.stable_mask.shape[1]
        if self.kv is None or self.kv.shape[2] != B or self.kv.shape[4] != L or \
                s.past_keys[0].data_ptr() != self.kv[0, 0].data_ptr():
            raise ValueError("the torch-graph backend steps over the cache its own new_cache() returned")
        rows_bucket = self._bucket(A, L)
        rows = s.logit_rows
        R = None if rows is None else rows.shape[1]
        r_bucket = None if rows is None else min(self._bucket(R, L), rows_bucket)
        st = self._static.get((B, rows_bucket, L, r_bucket, s.need_drift, s.attention))
        st["ids"].copy_(pad_rows(s.input_ids, rows_bucket))
        st["pos"].copy_(pad_rows(s.position_ids, rows_bucket))
        st["stable"].copy_(s.stable_mask)
        st["am"].copy_(s.attention_mask)
        if rows is not None:
            st["rows"].copy_(pad_rows(rows, r_bucket))
        if self.graphs:
            st["graph"].replay()
            self.replays += 1
        else:
            self._forward(st)
        a = self.model.args
        drift = st["drift"][:, :A] if s.need_drift else torch.zeros(B, A, device=self.info.device)
        return StepOutputs(st["logits"][:, :A if R is None else R],
                           [self.kv[i, 0] for i in range(a.num_layers)], [self.kv[i, 1] for i in range(a.num_layers)],
                           st["valid"].clone(), drift)


BACKEND = TorchGraphBackend
