"""The step contract: the hub every stage meets at (docs/ARCHITECTURE.md).

A backend runs one denoising step over an explicit K/V cache; the loop decides which rows are active and
which cached rows are stable. The same tensors are the ONNX graph's inputs and outputs (their names, in
graph order, are below) and an exported artifact describes itself by the metadata keys below, so the
exporter, every backend and the comparison tools share one definition. Adding a backend means
implementing `StepBackend` in one file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from dlmtrt.errors import DlmtrtError
from dlmtrt.models.args import ModelArgs


@dataclass
class StepInputs:
    input_ids: Tensor  # [B, A] int64
    position_ids: Tensor  # [B, A] int64, canvas slots 0..L-1
    past_keys: list[Tensor]  # per layer [B, Hkv, L, D]
    past_values: list[Tensor]
    stable_mask: Tensor  # [B, L] bool
    attention_mask: Tensor  # [B, L] bool
    # Optional, for backends that declare `selects_logit_rows`: the active rows [B, R] whose logits the rule
    # needs (the output head then runs on R rows, not A), and whether kv_drift is read at all.
    logit_rows: Tensor | None = None
    need_drift: bool = True


@dataclass
class StepOutputs:
    logits: Tensor  # [B, A, V], or [B, R, V] in `logit_rows` order when the backend selected them
    present_keys: list[Tensor]
    present_values: list[Tensor]
    present_valid: Tensor  # [B, L] bool
    kv_drift: Tensor  # [B, A] float


@dataclass(frozen=True)
class ModelInfo:
    """What the runtime needs to know about a model, whatever runs it."""

    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    pad_token_id: int
    logits_shift: bool
    dtype: torch.dtype
    device: torch.device


class StepBackend(Protocol):
    info: ModelInfo
    name: str
    # backends that honour StepInputs.logit_rows / need_drift set this True (see TorchGraphBackend)
    selects_logit_rows: bool = False

    def new_cache(self, batch: int, length: int) -> tuple[list[Tensor], list[Tensor]]:
        """Zeroed past K/V for a canvas of `length` rows."""
        ...

    def step(self, inputs: StepInputs) -> StepOutputs:
        ...


# ---- the graph's names (Hugging Face / Optimum convention, so ONNX Runtime IO binding and Polygraphy
# recognise them); the order is the graph's order

STEP_INPUTS = ("input_ids", "position_ids", "stable_mask", "attention_mask")
STEP_OUTPUTS_TAIL = ("present_valid", "kv_drift")


def input_names(num_layers: int) -> list[str]:
    return [*STEP_INPUTS] + [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def output_names(num_layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")] + [
        *STEP_OUTPUTS_TAIL]


def output_kind(name: str) -> str:
    """logits, present (any present.{i}.key/.value), present_valid or kv_drift: what tolerances are keyed by."""
    return "present" if name.startswith("present.") else name


def named_inputs(s: StepInputs) -> dict[str, Tensor]:
    """A `StepInputs` keyed by graph input name, in the graph's order."""
    feeds = {"input_ids": s.input_ids, "position_ids": s.position_ids, "stable_mask": s.stable_mask,
             "attention_mask": s.attention_mask}
    for i, (k, v) in enumerate(zip(s.past_keys, s.past_values)):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k, v
    return feeds


# ---- artifact metadata: every key starts with `dlmtrt.`; `dlmtrt.model_args` holds the architecture as JSON

METADATA_PREFIX = "dlmtrt."
METADATA_FORMAT = "1"


class ArtifactError(DlmtrtError, ValueError):
    """An exported artifact is missing, unreadable or not ours; the message says how to make a good one."""


def read_metadata(props: dict[str, str], where: str | Path) -> tuple[ModelArgs, dict[str, str]]:
    """(ModelArgs, our props without prefix) from an artifact's metadata, with a clear error when absent."""
    ours = {k.removeprefix(METADATA_PREFIX): v for k, v in props.items() if k.startswith(METADATA_PREFIX)}
    if "model_args" not in ours:
        raise ArtifactError(f"{where} has no dlmtrt metadata: it was not written by `dlmtrt export` (`python cli.py export`); export the "
                            "checkpoint with `dlmtrt export --model M --out DIR` and pass DIR")
    if ours.get("format_version") != METADATA_FORMAT:
        raise ArtifactError(f"{where} was exported in metadata format {ours.get('format_version')!r}; this runtime "
                            f"reads format {METADATA_FORMAT}: re-export it with this version")
    return ModelArgs(**json.loads(ours["model_args"])), ours


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """metadata_props of an .onnx file, without loading its weights."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        m = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'truncated or corrupt'}); "
                            "export the checkpoint again with `dlmtrt export`") from None
    return {p.key: p.value for p in m.metadata_props}
