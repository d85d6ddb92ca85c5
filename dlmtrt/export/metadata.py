"""The export's self-description in its ONNX `metadata_props` (the keys and their format: runtime/artifacts.py),
with the exporter's library versions."""
from __future__ import annotations

import onnx
import onnx_ir as ir

from dlmtrt.models.loading import Checkpoint
from dlmtrt.runtime.artifacts import metadata_props


def _versions() -> dict[str, str]:
    import onnxscript
    import torch
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnx_ir": ir.__version__}


def write_metadata(model: ir.Model, ck: Checkpoint, *, dtype: str, attention: str, opset: int, source_sha256: str,
                   dlmtrt: str) -> dict[str, str]:
    """Attach the export's self-description (runtime/artifacts.py) to `model`; returns the props."""
    props = metadata_props(ck.args, dtype=dtype, attention=attention, opset=opset, source=str(ck.source),
                           source_path=str(ck.path), source_sha256=source_sha256,
                           exporter={"dlmtrt": dlmtrt, **_versions()})
    model.metadata_props.update(props)
    model.producer_name = "dlmtrt"
    return props
