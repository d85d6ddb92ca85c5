"""Model facts stored in the ONNX `metadata_props`, so that a runtime needs only the .onnx file and the tokenizer.

Every key starts with `dlmtrt.`; `dlmtrt.model_args` holds the full architecture as JSON, the other keys
repeat the facts people look for (family, special ids, shift, head sizes, dtype, provenance) one per key.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnx_ir as ir

from models.loading import Checkpoint
from models.transformer import ModelArgs

PREFIX = "dlmtrt."
FORMAT_VERSION = "1"


def _versions() -> dict[str, str]:
    import onnxscript
    import torch
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnx_ir": ir.__version__}


def write_metadata(model: ir.Model, ck: Checkpoint, *, dtype: str, attention: str, opset: int, source_sha256: str,
                   dlmtrt: str) -> dict[str, str]:
    a = ck.args
    props = {
        "format_version": FORMAT_VERSION,
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
    props = {PREFIX + k: v for k, v in props.items()}
    model.metadata_props.update(props)
    model.producer_name = "dlmtrt"
    return props


def read_metadata(props: dict[str, str], where: str | Path) -> tuple[ModelArgs, dict[str, str]]:
    """(ModelArgs, our props without prefix) from an ONNX model's metadata, with a clear error when absent."""
    ours = {k.removeprefix(PREFIX): v for k, v in props.items() if k.startswith(PREFIX)}
    if "model_args" not in ours:
        raise ValueError(f"{where} has no dlmtrt metadata: it was not written by `cli.py export`; export the "
                         "checkpoint with `python cli.py export --model M --out DIR` and pass DIR")
    if ours.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where} was exported in metadata format {ours.get('format_version')!r}; this runtime "
                         f"reads format {FORMAT_VERSION}: re-export it with this version")
    return ModelArgs(**json.loads(ours["model_args"])), ours


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an .onnx file, without loading its weights."""
    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}
