"""The architecture and special tokens of a model, independent of the checkpoint's config format: what the model
code, the loaders, the exporter and every artifact's metadata share. Torch-free, so that artifact readers and
the command line can use it without importing torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .attention_kinds import AttentionKind


@dataclass(frozen=True)
class ModelArgs:
    """Architecture and special tokens, independent of the checkpoint's own config format."""

    family: str  # the model family's name (models/families/)
    vocab_size: int  # rows of the embedding and of the output head
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    tie_word_embeddings: bool
    logits_shift: bool  # True for Dream: row i's logits predict token i+1
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    bos_token_id: int | None = None
    max_position_embeddings: int = 4096
    attention: str = "bidirectional"  # the attention kind's spec (models/attention_kinds.py): block_causal:4, ...
    qk_norm: bool = False  # RMSNorm over head_dim on each query and key head before RoPE (Qwen3, SDAR)
    stop_token_ids: tuple[int, ...] = ()  # ids that end an answer besides eos_token_id (SDAR: <|im_end|>)

    def __post_init__(self):
        AttentionKind.parse(self.attention)  # a bad kind fails where the args are made
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))  # from JSON metadata: a list

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends an answer: eos_token_id, then the others."""
        return (self.eos_token_id, *(i for i in self.stop_token_ids if i != self.eos_token_id))

    @property
    def attention_kind(self) -> AttentionKind:
        return AttentionKind.parse(self.attention)

    def to_dict(self) -> dict:
        return asdict(self)

    def token_ids(self) -> dict:
        """The special ids as generation_config.json spells them."""
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "mask_token_id": self.mask_token_id}

    @property
    def param_count(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attn + 3 * h * i + 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * layer + h + head


def sized(family: str, vocab_size: int, ids: dict[str, int], sizes: dict, **fixed) -> ModelArgs:
    """ModelArgs of a small model: `sizes` (hidden_size, intermediate_size, num_layers, num_heads, head_dim and
    optionally num_kv_heads, max_position_embeddings), the special `ids` (mask, eos, pad, bos), and the family's
    `fixed` choices (rms_norm_eps, qkv_bias, logits_shift, num_kv_heads when `sizes` has none, ...)."""
    s = {"num_kv_heads": fixed.pop("num_kv_heads", sizes["num_heads"]), "max_position_embeddings": 2048,
         "rope_theta": 10000.0, "tie_word_embeddings": False, **sizes}
    return ModelArgs(family=family, vocab_size=vocab_size, mask_token_id=ids["mask"], eos_token_id=ids["eos"],
                     pad_token_id=ids["pad"], bos_token_id=ids.get("bos"), **{**s, **fixed})
