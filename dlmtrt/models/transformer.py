"""The transformer behind every supported DLM, written against the step contract.

The families (models/families/: Dream, Qwen2-style; LLaDA, LLaMA-style) differ only in their config keys,
weight names, q/k/v biases, whether row i predicts token i or i+1, and their attention kind; each family's file
maps its checkpoints onto the one module below. Module names follow the Hugging Face Qwen2/Llama layout
(`model.layers.{i}.self_attn.q_proj`, ...), so Dream checkpoints load with no renaming.

The step contract (docs/ARCHITECTURE.md) makes the K/V cache explicit: a step computes only the *active* rows,
writes their fresh K/V into the past at `position_ids`, and lets every active query attend the rows that are
valid after the write (`present_valid & attention_mask`) and that its attention kind allows (bidirectional: all
of them; block-causal: those of its block and earlier ones; models/attention_kinds.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .args import ModelArgs
from .attention_kinds import AttentionKind, sdpa_mask, sequence_positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(a: ModelArgs, device=None) -> Tensor:
    return 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float, device=device) / a.head_dim))


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for integer positions [B, A], computed in fp32 as the HF reference does, then cast."""
    freqs = positions.float()[..., None] * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def cached_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_pos: Tensor, k_pos: Tensor,
                     kind: AttentionKind) -> Tensor:
    """softmax(q k^T / sqrt(D), keys the query may attend) v with grouped-query heads: q [B, H, A, D], k/v
    [B, Hkv, L, D], valid [B, L] bool, the queries' and keys' sequence positions q_pos [B, A], k_pos [B, L]
    -> [B, H, A, D]; which keys a query may attend is `kind`'s (models/attention_kinds.py). The ONNX export
    emits exactly this, either as standard operators or as one `dlmtrt::CachedAttention` node
    (export/attention.py) that the TensorRT plugin implements."""
    B, H, A, D = q.shape
    Hkv = k.shape[1]
    kk = k[:, :, None].expand(B, Hkv, H // Hkv, *k.shape[2:]).reshape(B, H, -1, D)
    vv = v[:, :, None].expand(B, Hkv, H // Hkv, *v.shape[2:]).reshape(B, H, -1, D)
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=sdpa_mask(kind, valid, q_pos, k_pos))


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.a = a
        self.kind = a.attention_kind
        self.attend = cached_attention  # swapped by the exporter for the plugin node, by torch-graph for its own
        self.q_proj = nn.Linear(a.hidden_size, a.num_heads * a.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(a.hidden_size, a.num_kv_heads * a.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(a.num_heads * a.head_dim, a.hidden_size, bias=False)
        self.qkv_proj: nn.Linear | None = None  # set by `DiffusionLM.fuse_projections`
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [B, H, A, D] and k, v [B, Hkv, A, D] of rows `x`, RoPE applied to q and k."""
        B, A, _ = x.shape
        H, Hkv, D = self.a.num_heads, self.a.num_kv_heads, self.a.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q.view(B, A, H, D), k.view(B, A, Hkv, D)
        if self.a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, A, Hkv, D).transpose(1, 2)
        return apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None]), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, write_idx: Tensor, past_k: Tensor, past_v: Tensor,
                valid: Tensor, q_pos: Tensor, k_pos: Tensor, inplace: bool = False, drift: bool = True,
                rows: tuple[Tensor, Tensor] | None = None, kind: AttentionKind | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """`inplace` writes the fresh K/V into the past at `rows` (batch index [B, 1], positions [B, A]) by
        indexed assignment: torch.compile lowers that to stores fused into the kernel that produces K and V,
        whereas a `scatter_` into a graph input becomes a scatter into a fresh copy of the whole cache plus a
        copy back (two extra kernels and several passes over every layer's K/V per step, growing with L)."""
        B, A, _ = x.shape
        H, Hkv, D = self.a.num_heads, self.a.num_kv_heads, self.a.head_dim
        q, k, v = self.qkv(x, cos, sin)
        k_old = past_k.gather(2, write_idx) if drift else None
        if inplace:  # the cache buffer is the present: no copy of the whole canvas per step
            b, pos = rows
            past_k[b, :, pos] = k.transpose(1, 2).to(past_k.dtype)
            past_v[b, :, pos] = v.transpose(1, 2).to(past_v.dtype)
            present_k, present_v = past_k, past_v
        else:
            present_k = past_k.scatter(2, write_idx, k.to(past_k.dtype))
            present_v = past_v.scatter(2, write_idx, v.to(past_v.dtype))
        o = self.attend(q, present_k, present_v, valid, q_pos, k_pos, kind or self.kind)
        o = self.o_proj(o.transpose(1, 2).reshape(B, A, H * D))
        if not drift:
            return o, present_k, present_v, None, None
        dk = (k.float() - k_old.float()).pow(2).sum(dim=(1, 3))
        k0 = k_old.float().pow(2).sum(dim=(1, 3))
        return o, present_k, present_v, dk, k0


    def forward_full(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All rows at once with no cache: the training pass (same weights, same numbers as `forward`
        with every row active, without the cache scatter and drift bookkeeping). `key_mask`: `sdpa_mask`'s.
        Returns the output and the rows' K (RoPE applied, as a cache holds it) and V."""
        B, L, _ = x.shape
        H, Hkv, D = self.a.num_heads, self.a.num_kv_heads, self.a.head_dim
        q, k, v = self.qkv(x, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=H != Hkv)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, H * D)), k, v


class MLP(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.up_proj = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # set by `DiffusionLM.fuse_projections`

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)


class Backbone(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


@dataclass
class DeepRows:
    """Rows that join a step from layer `layer` on (BiCache's recomputed prefix): canvas slots [B, P] and their
    hidden state entering that layer [B, P, hidden]. Their slots must be valid (stable) already."""

    layer: int
    position_ids: Tensor
    hidden: Tensor


class DiffusionLM(nn.Module):
    """One denoising step of a masked-diffusion LM over an explicit K/V cache (the step contract)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One q|k|v and one gate|up matrix per layer (the separate ones are dropped, so memory stays flat):
        at one active row a step is a chain of matrix-vector products, and fewer, larger ones run closer to
        the memory bandwidth. Checkpoint loading and export use the unfused names, so fuse after loading."""
        def concat(ps: tuple[nn.Linear, ...]) -> nn.Linear:
            from .quantized import QuantLinear
            if isinstance(ps[0], QuantLinear):
                return QuantLinear.concat(list(ps))
            w = ps[0].weight
            fused = nn.Linear(ps[0].in_features, sum(p.out_features for p in ps), bias=ps[0].bias is not None,
                              device=w.device, dtype=w.dtype)
            fused.weight.copy_(torch.cat([p.weight for p in ps]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in ps]))
            return fused

        for layer in self.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            if at.qkv_proj is None:
                at.qkv_proj = concat((at.q_proj, at.k_proj, at.v_proj))
                del at.q_proj, at.k_proj, at.v_proj
            if mlp.gate_up_proj is None:
                mlp.gate_up_proj = concat((mlp.gate_proj, mlp.up_proj))
                del mlp.gate_proj, mlp.up_proj

    def empty_cache(self, batch: int, length: int, device=None, dtype=None) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed past K/V, shape [B, Hkv, L, D] per layer."""
        a = self.args
        p = self.model.embed_tokens.weight
        shape = (batch, a.num_kv_heads, length, a.head_dim)
        mk = lambda: torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)  # noqa: E731
        return [mk() for _ in range(a.num_layers)], [mk() for _ in range(a.num_layers)]

    def run_layers(self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor, states: bool = False
                   ) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
        """Every layer over every row of `x`, with no cache: the training passes (`full_logits`, the block-diffusion
        objective) and a prefix computed alone. Returns the last hidden state and, with `states`, per layer its K
        (RoPE applied) and V [B, Hkv, L, D] and its output hidden state (after both residual adds)."""
        keys, values, hidden = [], [], []
        for layer in self.model.layers:
            h, k, v = layer.self_attn.forward_full(layer.input_layernorm(x), cos, sin, key_mask)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            if states:
                keys.append(k)
                values.append(v)
                hidden.append(x)
        return x, keys, values, hidden

    def _full_pass_inputs(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(embeddings, cos, sin, key mask) of a whole canvas under the model's attention kind."""
        rope_pos = sequence_positions(attention_mask)
        cos, sin = rope_cos_sin(rope_pos, self.inv_freq, self.model.embed_tokens.weight.dtype)
        key_mask = sdpa_mask(self.args.attention_kind, attention_mask.bool(), rope_pos, rope_pos)
        return self.model.embed_tokens(input_ids), cos, sin, key_mask

    def full_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Logits of every row of a canvas in one pass, without K/V in or out: what training needs.
        Equal to `forward` with all rows active and nothing stable (tested)."""
        x, *_ = self.run_layers(*self._full_pass_inputs(input_ids, attention_mask))
        return self.lm_head(self.model.norm(x))

    def layer_states(self, input_ids: Tensor, attention_mask: Tensor
                     ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """A cache-free pass over a canvas that keeps, per layer, its K (RoPE applied) and V [B, Hkv, L, D], and
        the L + 1 hidden states [B, L, hidden]: the embeddings, then each layer's output. What a prefix store
        keeps of a prefix computed alone (runtime/bicache.py)."""
        x, cos, sin, key_mask = self._full_pass_inputs(input_ids, attention_mask)
        _, keys, values, hidden = self.run_layers(x, cos, sin, key_mask, states=True)
        return keys, values, [x] + hidden

    def forward(self, input_ids: Tensor, position_ids: Tensor, past_keys: list[Tensor], past_values: list[Tensor],
                stable_mask: Tensor, attention_mask: Tensor, inplace: bool = False, logit_index: Tensor | None = None,
                drift: bool = True, attention: AttentionKind | None = None, deep: "DeepRows | None" = None):
        """Returns (logits [B,A,V], present_keys, present_values, present_valid [B,L], kv_drift [B,A]).

        `inplace` writes the fresh K/V into `past_keys`/`past_values` themselves (the fast path's one cache
        buffer) instead of returning updated copies. `logit_index` [B, R] (positions among the A active rows)
        applies the output head to those rows only: logits [B, R, V].

        RoPE positions are the count of attended rows before each row (cumsum of `attention_mask` - 1),
        the Hugging Face convention for left padding, so a left-padded row decodes exactly like the
        unpadded sequence. `position_ids` are canvas slots: where the fresh K/V are written.
        `kv_drift` is ||K_new - K_past|| / ||K_past|| over all layers and heads, for active rows whose
        past was valid (`stable_mask` true at their slot); the fresh K/V always replace the past. With
        `drift=False` it is not computed (zeros): only the adaptive policy reads it. `attention` overrides the
        model's attention kind for this call (a block-causal model generating with another block length than
        it was trained with, as SDAR's generation allows).

        `deep` (BiCache, runtime/bicache.py) adds rows from layer `deep.layer` on: their hidden state enters that
        layer as `deep.hidden` and they are computed, written and attended in every deeper layer, while the
        shallower layers compute the step's rows only. Their logits and kv_drift are not returned.
        """
        a = self.args
        B, A = input_ids.shape
        D = a.head_dim
        k_pos = sequence_positions(attention_mask)
        rope_pos = k_pos.gather(1, position_ids)  # the active rows' sequence positions: RoPE's and the mask's
        cos, sin = rope_cos_sin(rope_pos, self.inv_freq, self.model.embed_tokens.weight.dtype)
        written = torch.zeros_like(stable_mask).scatter(1, position_ids, torch.ones_like(position_ids, dtype=torch.bool))
        present_valid = stable_mask | written
        key_mask = present_valid & attention_mask
        write_idx = position_ids[:, None, :, None].expand(B, a.num_kv_heads, A, D)
        rows = (torch.arange(B, device=input_ids.device)[:, None], position_ids) if inplace else None

        x = self.model.embed_tokens(input_ids)
        dk = torch.zeros(B, A, device=x.device)
        k0 = torch.zeros(B, A, device=x.device)
        present_keys, present_values = [], []
        extra = 0  # deep rows in front of the step's rows
        for n, (layer, pk, pv) in enumerate(zip(self.model.layers, past_keys, past_values)):
            if deep is not None and n == deep.layer:
                extra = deep.position_ids.shape[1]
                x = torch.cat([deep.hidden.to(x.dtype), x], 1)
                slots = torch.cat([deep.position_ids, position_ids], 1)
                rope_pos = k_pos.gather(1, slots)
                cos, sin = rope_cos_sin(rope_pos, self.inv_freq, self.model.embed_tokens.weight.dtype)
                write_idx = slots[:, None, :, None].expand(B, a.num_kv_heads, slots.shape[1], D)
                rows = (rows[0], slots) if inplace else None
            h, nk, nv, dki, k0i = layer.self_attn(layer.input_layernorm(x), cos, sin, write_idx, pk, pv, key_mask,
                                                  rope_pos, k_pos, inplace, drift, rows, attention)
            x = x + h
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            present_keys.append(nk)
            present_values.append(nv)
            if drift:
                dk, k0 = dk + dki[:, extra:], k0 + k0i[:, extra:]
        x = x[:, extra:]
        if logit_index is not None:
            x = x.gather(1, logit_index[..., None].expand(-1, -1, x.shape[-1]))
        logits = self.lm_head(self.model.norm(x))
        had_past = stable_mask.gather(1, position_ids)
        kv_drift = torch.where(had_past, dk.sqrt() / k0.sqrt().clamp_min(1e-12), torch.zeros_like(dk))
        return logits, present_keys, present_values, present_valid, kv_drift
