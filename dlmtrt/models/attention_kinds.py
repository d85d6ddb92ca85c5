"""The attention pattern of a model: which keys a query row may attend. One definition, used by every
implementation (model code, torch-graph, the exported node and its ONNX function, the CUDA kernel, the TensorRT
plugin) and tested against all of them (tests/test_attention_kinds.py).

- `bidirectional`: an active query attends every valid key (`present_valid & attention_mask`): Dream, LLaDA.
- `block_causal:N`: the canvas is cut into blocks of N positions counted from a sequence's first real token
  (so left padding moves no boundary); a query in block j attends the valid keys of blocks <= j: SDAR, LLaDA2,
  Fast-dLLM v2, BD3-LM. Committed blocks never attend later ones, so their K/V are exact once computed and a
  cache of them is append-only, like an autoregressive model's.

Positions here are *sequence positions*: the number of attended rows before a row (`cumsum(attention_mask) - 1`),
the same numbers RoPE uses. Nothing in this module imports torch at module level, so artifact readers and the
CLI can parse a kind without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlmtrt.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

BIDIRECTIONAL = "bidirectional"
BLOCK_CAUSAL = "block_causal"
MASK_TYPES = {BIDIRECTIONAL: 0, BLOCK_CAUSAL: 1}  # the integer the kernel's C ABI and the plugin's fields carry


@dataclass(frozen=True)
class AttentionKind:
    """`name` is bidirectional or block_causal; `block` the block size of block_causal (0 otherwise)."""

    name: str = BIDIRECTIONAL
    block: int = 0

    def __post_init__(self):
        if self.name not in MASK_TYPES:
            raise UsageError(f"unknown attention kind {self.name!r}: {BIDIRECTIONAL} or {BLOCK_CAUSAL}:N",
                             field="attention")
        if self.name == BLOCK_CAUSAL and (not isinstance(self.block, int) or self.block < 1):
            raise UsageError(f"block_causal attention needs a block size >= 1, got {self.block!r}", field="attention")
        if self.name == BIDIRECTIONAL and self.block:
            raise UsageError("bidirectional attention has no block size", field="attention")

    @property
    def mask_type(self) -> int:
        return MASK_TYPES[self.name]

    @property
    def causal_blocks(self) -> bool:
        return self.name == BLOCK_CAUSAL

    @property
    def spec(self) -> str:
        """'bidirectional' or 'block_causal:4': how metadata, manifests and messages spell it."""
        return self.name if self.name == BIDIRECTIONAL else f"{self.name}:{self.block}"

    @classmethod
    def parse(cls, spec: str | None) -> "AttentionKind":
        if spec is None or spec == "" or spec == BIDIRECTIONAL:
            return cls()
        name, _, block = str(spec).partition(":")
        try:
            return cls(name, int(block)) if name == BLOCK_CAUSAL else cls(name)
        except ValueError:
            raise UsageError(f"attention kind {spec!r}: expected {BIDIRECTIONAL} or {BLOCK_CAUSAL}:N",
                             field="attention") from None

    @classmethod
    def of(cls, mask_type: int, block: int) -> "AttentionKind":
        """From the integers of the kernel's C ABI and the plugin's fields."""
        names = {v: k for k, v in MASK_TYPES.items()}
        if mask_type not in names:
            raise UsageError(f"unknown attention mask type {mask_type}", field="attention")
        return cls(names[mask_type], block if names[mask_type] == BLOCK_CAUSAL else 0)


def sequence_positions(attention_mask: "Tensor") -> "Tensor":
    """[B, L] position of each canvas row within its sequence (rows before the first real token: 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def may_attend(kind: AttentionKind, q_pos: "Tensor", k_pos: "Tensor", k_valid: "Tensor") -> "Tensor":
    """The reference: [B, A, L] bool, may query row a (sequence position q_pos [B, A]) attend key l (sequence
    position k_pos [B, L], valid k_valid [B, L])?"""
    allowed = k_valid[:, None, :].bool().expand(-1, q_pos.shape[1], -1)
    if kind.causal_blocks:
        allowed = allowed & ((k_pos // kind.block)[:, None, :] <= (q_pos // kind.block)[:, :, None])
    return allowed


def sdpa_mask(kind: AttentionKind, valid: "Tensor", q_pos: "Tensor", k_pos: "Tensor") -> "Tensor":
    """`may_attend` as PyTorch's attention takes a boolean mask: [B, 1, 1, L] (bidirectional: the key validity
    vector, broadcast over queries) or [B, 1, A, L] (block-causal)."""
    if not kind.causal_blocks:
        return valid[:, None, None, :]
    return may_attend(kind, q_pos, k_pos, valid)[:, None]
