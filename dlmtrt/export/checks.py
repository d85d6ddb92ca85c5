"""Post-export checks run by `export` itself: ONNX checker, shape inference, and ONNX Runtime vs PyTorch.

The numeric check feeds random step inputs (several batch sizes, active-row counts, stable masks and left
padding) to the exported graph in ONNX Runtime and to the PyTorch model in fp32 (the higher-precision
reference), and compares each output with its own tolerance (relative error ||ort - ref|| / ||ref||, and exact
equality for `present_valid`).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from dlmtrt.dtypes import DTYPES
from dlmtrt.models.loading import Checkpoint, load_weights
from dlmtrt.models.args import ModelArgs

from . import attention as attn
from dlmtrt.runtime.contract import input_names, output_kind, output_names

# (batch, active rows, canvas length, fraction of stable rows, left padding of the first sequence)
CASES = [(1, 12, 12, 0.0, 0), (2, 5, 24, 0.6, 3), (3, 1, 17, 0.9, 2), (2, 16, 40, 0.3, 5)]
# output kind -> relative-error tolerance per export dtype
TOLERANCES = {
    "float32": {"logits": 1e-4, "present": 1e-4, "kv_drift": 1e-4},
    "float16": {"logits": 2e-2, "present": 1e-2, "kv_drift": 5e-2},
    "bfloat16": {"logits": 5e-2, "present": 3e-2, "kv_drift": 1e-1},
}


@dataclass
class Row:
    case: str
    output: str
    rel_err: float
    max_abs: float
    tol: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tol


@dataclass
class NumericReport:
    dtype: str
    note: str = ""
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def worst(self) -> dict[str, Row]:
        """Largest relative error per output kind."""
        out: dict[str, Row] = {}
        for r in self.rows:
            k = output_kind(r.output)
            if k not in out or r.rel_err / max(r.tol, 1e-30) > out[k].rel_err / max(out[k].tol, 1e-30):
                out[k] = r
        return out

    def render_text(self) -> str:
        lines = [f"{'case':<22} {'output':<22} {'rel err':>10} {'max abs':>10} {'tol':>8}  ok"]
        for r in self.rows:
            if not r.ok:
                lines.append(f"{r.case:<22} {r.output:<22} {r.rel_err:>10.2e} {r.max_abs:>10.2e} {r.tol:>8.0e}  NO")
        return "\n".join(lines)


class StructureError(RuntimeError):
    pass


def check_structure(path: Path, num_layers: int) -> onnx.ModelProto:
    """onnx.checker (full check, external data included) and strict shape inference; the graph's inputs and
    outputs must be exactly the step contract's, with symbolic batch / active / canvas dims."""
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True, data_prop=True)
    got_in = [i.name for i in inferred.graph.input]
    got_out = [o.name for o in inferred.graph.output]
    if got_in != input_names(num_layers) or got_out != output_names(num_layers):
        raise StructureError(f"{path}: inputs/outputs {got_in} / {got_out} are not the step contract's")
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.graph.input, *inferred.graph.output]}
    if dims["logits"][:2] != ["batch", "active"] or dims["present_valid"] != ["batch", "canvas"]:
        raise StructureError(f"{path}: unexpected symbolic dims logits {dims['logits']}, "
                             f"present_valid {dims['present_valid']}")
    return inferred


def random_step_inputs(a: ModelArgs, case: tuple, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    B, A, L, stable_frac, pad = case
    ids = torch.randint(0, a.vocab_size, (B, A), generator=gen)
    pos = torch.stack([torch.randperm(L, generator=gen)[:A].sort().values for _ in range(B)])
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, :pad] = False
    stable = torch.rand(B, L, generator=gen) < stable_frac
    shape = (B, a.num_kv_heads, L, a.head_dim)
    past = [torch.randn(shape, generator=gen).to(dtype) for _ in range(2 * a.num_layers)]
    return [ids, pos, stable, am, *past]


def _widen_bf16(m: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every bfloat16 tensor, cast and type made float32 (weights keep their bf16 values):
    ONNX Runtime has no CPU kernels for bf16 arithmetic."""
    from onnx import TensorProto, numpy_helper
    BF, F = TensorProto.BFLOAT16, TensorProto.FLOAT
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == BF:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if v.type.tensor_type.elem_type == BF:
            v.type.tensor_type.elem_type = F
    for nd in m.graph.node:
        for at in nd.attribute:
            if at.name == "to" and at.i == BF:
                at.i = F
            if at.type == onnx.AttributeProto.TENSOR and at.t.data_type == BF:
                at.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(at.t).astype(np.float32), at.t.name))
    return m


def _widen_external_bf16(m: onnx.ModelProto, src_dir: Path, data_path: Path) -> onnx.ModelProto:
    """_widen_bf16 for a model loaded without its external data: each external weight is read from `src_dir`,
    widened if bf16, and appended to `data_path` (whose name the tensors then reference) one tensor at a time,
    so the weights are never all in memory and no proto over protobuf's 2 GiB limit is built."""
    from onnx import TensorProto
    with open(data_path, "wb") as out:
        for t in m.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            raw = np.fromfile(src_dir / info["location"], dtype=np.uint8, count=int(info["length"]),
                              offset=int(info.get("offset", 0)))
            if t.data_type == TensorProto.BFLOAT16:  # exact: bf16 is the top half of an fp32 (little-endian)
                wide = raw.view("<u2").astype("<u4")
                del raw
                wide <<= 16
                raw = wide.view(np.uint8)
                t.data_type = TensorProto.FLOAT
            offset = out.tell()
            raw.tofile(out)
            del t.external_data[:]
            for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(raw.size))):
                e = t.external_data.add()
                e.key, e.value = k, v
            del raw
    return _widen_bf16(m)  # inline bf16 tensors, types, casts


def session_for_check(path: Path, attention: str, dtype: str):
    """An ONNX Runtime CPU session over the exported graph (plugin node given its reference function)."""
    import onnxruntime as ort
    path = Path(path)
    if attention == "standard" and dtype != "bfloat16":
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    m = onnx.load(str(path), load_external_data=False)
    if attention == "plugin":
        m = attn.with_reference(m)
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in m.graph.initializer):
        if dtype == "bfloat16":
            m = _widen_bf16(m)
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    # Weights in external data (the model may be over 2 GiB): the modified graph goes to ONNX Runtime as a file
    # beside the export, referencing the export's data file, or for bf16 a widened copy written tensor by tensor.
    fd, tmp = tempfile.mkstemp(prefix=".check-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    data = tmp.with_suffix(".onnx.data")
    try:
        if dtype == "bfloat16":
            m = _widen_external_bf16(m, path.parent, data)
        onnx.save_model(m, str(tmp))
        del m
        return ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    finally:
        tmp.unlink(missing_ok=True)
        data.unlink(missing_ok=True)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def memory_needed(a: ModelArgs, export_bytes: int) -> int:
    """Bytes the numeric check holds at once: the fp32 reference model and ONNX Runtime's copy of the graph."""
    return a.param_count * 4 + export_bytes * (2 if export_bytes else 1)


def available_memory() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


QUANTIZED_TOLERANCE = 2e-2  # an 8-bit graph: an input a hair apart can round to the neighbouring grid point


def numeric_check(path: Path, ck: Checkpoint, dtype: str, attention: str, cases=CASES, seed: int = 0,
                  quantized: bool = False) -> NumericReport:
    a = ck.args
    report = NumericReport(dtype, note="bf16 graph evaluated with fp32 arithmetic (no CPU bf16 kernels in "
                                       "ONNX Runtime)" if dtype == "bfloat16" else "")
    ref = load_weights(ck, torch.float32, torch.device("cpu"))
    sess = session_for_check(path, attention, dtype)
    names_in, names_out = input_names(a.num_layers), output_names(a.num_layers)
    tdt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    tol = TOLERANCES[dtype]
    if quantized:  # the reference is the checkpoint's QuantLinear emulation, ONNX Runtime runs the Q/DQ graph
        tol = {k: max(v, QUANTIZED_TOLERANCE) for k, v in tol.items()}
    for case in cases:
        inputs = random_step_inputs(a, case, tdt, gen)
        with torch.inference_mode():
            ids, pos, stable, am, *past = inputs
            lo, pk, pv, valid, drift = ref(ids, pos, [p.float() for p in past[0::2]], [p.float() for p in past[1::2]],
                                           stable, am)
        expect = [lo, *[t for pair in zip(pk, pv) for t in pair], valid, drift]
        got = sess.run(names_out, {n: _to_numpy(t) for n, t in zip(names_in, inputs)})
        label = "B{} A{} L{} stable{:.0%} pad{}".format(*case)
        for name, e, g in zip(names_out, expect, got):
            e = e.double().numpy()
            g = np.asarray(g).astype(np.float64)
            if name == "present_valid":
                err = float((e != g).mean())
                report.rows.append(Row(label, name, err, err, 0.0))
                continue
            diff = np.linalg.norm(g - e)
            rel = float(diff / max(np.linalg.norm(e), 1e-6))
            report.rows.append(Row(label, name, rel, float(np.abs(g - e).max()), tol[output_kind(name)]))
    del ref, sess
    return report
