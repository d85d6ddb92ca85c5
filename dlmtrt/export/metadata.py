"""Model facts stored in the ONNX `metadata_props`, so that a runtime needs only the .onnx file and the tokenizer.

Every key starts with `dlmtrt.`; `dlmtrt.model_args` holds the full architecture as JSON, the other keys
repeat the facts people look for (family, special ids, shift, head sizes, dtype, provenance) one per key.
"""
from __future__ import annotations

import json

import onnx
import onnx_ir as ir

from dlmtrt.models.loading import Checkpoint
from dlmtrt.runtime.contract import METADATA_FORMAT, METADATA_PREFIX



def _versions() -> dict[str, str]:
    import onnxscript
    import torch
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnx_ir": ir.__version__}


def write_metadata(model: ir.Model, ck: Checkpoint, *, dtype: str, attention: str, opset: int, source_sha256: str,
                   dlmtrt: str) -> dict[str, str]:
    a = ck.args
    props = {
        "format_version": METADATA_FORMAT,
        "family": a.family,
        "logits_shift": str(a.logits_shift).lower(),
        "mask_token_id": str(a.mask_token_id),
        "eos_token_id": str(a.eos_token_id),
        "pad_token_id": str(a.pad_token_id),
        "bos_token_id": "" if a.bos_token_id is None else str(a.bos_token_id),
        "vocab_size": str(a.vocab_size),
        "num_layers": str(a.num_layers),
        "num_heads": str(a.num_heads),
        "num_kv_heads": str(a.num_kv_heads),
        "head_dim": str(a.head_dim),
        "max_position_embeddings": str(a.max_position_embeddings),
        "dtype": dtype,
        "attention": attention,
        "opset": str(opset),
        "source": str(ck.source),
        "source_path": str(ck.path),
        "source_sha256": source_sha256,
        "exporter": json.dumps({"dlmtrt": dlmtrt, **_versions()}),
        "model_args": json.dumps(a.to_dict()),
    }
    props = {METADATA_PREFIX + k: v for k, v in props.items()}
    model.metadata_props.update(props)
    model.producer_name = "dlmtrt"
    return props
