"""The artifacts' self-descriptions, written and read here only: the ONNX export's `metadata_props` and the
engine's JSON manifest. Both carry a format version that the reader checks, so an artifact from another
version of dlmtrt is refused with what to do, never half understood.

ONNX metadata: every key starts with `dlmtrt.`; `dlmtrt.model_args` holds the whole architecture (ModelArgs,
attention kind included) as JSON, the other keys repeat the facts people look for one per key. A backend needs
the .onnx file and its tokenizer, nothing else. The engine manifest (beside FILE.engine as FILE.engine.json)
records the build (TensorRT flavour and version, profiles, IO, plugin) and, under "onnx", the export it was
built from with that export's metadata, so the TensorRT backend plans its bindings without TensorRT.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from dlmtrt.errors import DlmtrtError, UsageError
from dlmtrt.models.args import ModelArgs

METADATA_PREFIX = "dlmtrt."
METADATA_FORMAT = "2"  # 2: the attention kind (dlmtrt.attention_kind, and in model_args)
MANIFEST_FORMAT = "2"  # 2: checked on read; the export's metadata under onnx.metadata only


class ArtifactError(DlmtrtError, ValueError):
    """An exported artifact is missing, unreadable or not ours; the message says how to make a good one."""


# ---- ONNX metadata ------------------------------------------------------------------------------------------

def metadata_props(args: ModelArgs, *, dtype: str, attention: str, opset: int, source: str, source_path: str,
                   source_sha256: str, exporter: dict) -> dict[str, str]:
    """The `metadata_props` of an export of a model with `args` (`attention`: standard or plugin, how the
    attention was exported; the attention *kind* comes from `args`)."""
    a = args
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
        "attention_kind": a.attention_kind.spec,
        "dtype": dtype,
        "attention": attention,
        "opset": str(opset),
        "source": source,
        "source_path": source_path,
        "source_sha256": source_sha256,
        "exporter": json.dumps(exporter),
        "model_args": json.dumps(a.to_dict()),
    }
    return {METADATA_PREFIX + k: v for k, v in props.items()}


def read_metadata(props: dict[str, str], where: str | Path) -> tuple[ModelArgs, dict[str, str]]:
    """(ModelArgs, our props without prefix) from an artifact's metadata, with a clear error when absent or of
    another format."""
    ours = {k.removeprefix(METADATA_PREFIX): v for k, v in props.items() if k.startswith(METADATA_PREFIX)}
    if "model_args" not in ours:
        raise ArtifactError(f"{where} has no dlmtrt metadata: it was not written by `dlmtrt export`; export the "
                            "checkpoint with `dlmtrt export --model M --out DIR` and pass DIR")
    if ours.get("format_version") != METADATA_FORMAT:
        raise ArtifactError(f"{where} was exported in metadata format {ours.get('format_version')!r}; this runtime "
                            f"reads format {METADATA_FORMAT}: export it again with this version (`dlmtrt export`)")
    try:
        args = ModelArgs(**json.loads(ours["model_args"]))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: its dlmtrt.model_args cannot be read ({e}); export it again") from None
    if ours.get("attention_kind") != args.attention_kind.spec:
        raise ArtifactError(f"{where}: its attention kind {ours.get('attention_kind')!r} disagrees with its model "
                            f"args ({args.attention_kind.spec}); export it again")
    return args, ours


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an .onnx file, without loading its weights."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        m = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else "truncated or corrupt"
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}: {why}); export the "
                            "checkpoint again with `dlmtrt export`") from None
    return {p.key: p.value for p in m.metadata_props}


# ---- engine manifest ----------------------------------------------------------------------------------------

def manifest_path_for(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_manifest(engine: str | Path, manifest: dict) -> Path:
    """`manifest` (with this format's version) beside `engine`, written whole or not at all."""
    path = manifest_path_for(engine)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"format_version": MANIFEST_FORMAT, **manifest}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def find_engine(engine: str | Path) -> tuple[Path, Path]:
    """(engine file, manifest) for an engine file or the directory holding one."""
    p = Path(engine).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.engine"))
        if len(found) != 1:
            raise UsageError(f"{p} holds {len(found)} .engine files; pass the engine file itself")
        p = found[0]
    if not p.is_file():
        raise UsageError(f"no engine at {engine}: build one with `dlmtrt build-engine --onnx EXPORT_DIR --out "
                         "FILE.engine`")
    m = manifest_path_for(p)
    if not m.is_file():
        raise UsageError(f"{p} has no manifest ({m.name}) beside it: it was not built by `dlmtrt build-engine`; "
                         "build it again with that command")
    return p, m


def read_manifest(engine: str | Path) -> tuple[Path, dict, ModelArgs, dict]:
    """(engine file, manifest, ModelArgs, the export's dlmtrt metadata) without TensorRT."""
    p, m = find_engine(engine)
    try:
        man = json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{m} is not a readable manifest ({type(e).__name__}); build the engine again with "
                            "`dlmtrt build-engine`") from None
    if not isinstance(man, dict) or man.get("format_version") != MANIFEST_FORMAT:
        version = man.get("format_version") if isinstance(man, dict) else None
        raise ArtifactError(f"{m} is manifest format {version!r}; this runtime reads format {MANIFEST_FORMAT}: "
                            "build the engine again with `dlmtrt build-engine`")
    args, meta = read_metadata(man.get("onnx", {}).get("metadata") or {}, m)
    return p, man, args, meta
