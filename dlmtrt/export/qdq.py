"""Q/DQ ONNX for a calibrated 8-bit checkpoint (`dlmtrt calibrate`): the form TensorRT builds 8-bit engines from.

The step graph is traced as for a float checkpoint (a linear layer is `MatMul(x, Transpose(W))`); then, for
every quantised layer, the float weight becomes the stored 8-bit tensor followed by a per-channel
`DequantizeLinear` (axis 0, the output channels), and for fp8 and w8a8 the activation entering the `MatMul` goes
through `QuantizeLinear` -> `DequantizeLinear` with the calibrated static scale. TensorRT fuses each such pair
around a `MatMul` into an FP8 or INT8 GEMM; ONNX Runtime executes the same graph literally (dequantise, then a
float product), which is exactly `QuantLinear`'s emulation, so the export's numeric check compares the two.

FP8 needs opset 19 (E4M3 in QuantizeLinear / DequantizeLinear); int8 works from 13. Scales are stored in the
export dtype (DequantizeLinear's output type is its scale's type).
"""
from __future__ import annotations

import onnx_ir as ir
import torch

from dlmtrt.models.loading import Checkpoint, quantized_layers, read_tensor
from dlmtrt.models.transformer import DiffusionLM

FP8_MIN_OPSET = 19
_IR_DTYPES = {torch.float8_e4m3fn: ir.DataType.FLOAT8E4M3FN, torch.int8: ir.DataType.INT8,
              torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
              torch.bfloat16: ir.DataType.BFLOAT16}


def _initializer(graph: ir.Graph, name: str, dtype: ir.DataType, shape: tuple[int, ...], fn) -> ir.Value:
    v = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
    v.const_value = ir.LazyTensor(fn, dtype=dtype, shape=ir.Shape(list(shape)))
    graph.register_initializer(v)
    return v


def _const(graph: ir.Graph, name: str, t: torch.Tensor) -> ir.Value:
    v = ir.Value(name=name, type=ir.TensorType(_IR_DTYPES[t.dtype]), shape=ir.Shape(list(t.shape)))
    v.const_value = _tensor(t)
    graph.register_initializer(v)
    return v


def insert_qdq(model: ir.Model, ck: Checkpoint, index: dict, fmt: str, dtype: torch.dtype, prefix: str) -> set[str]:
    """Rewrite the traced float graph of a calibrated checkpoint into Q/DQ form, in place. Returns the
    initializer names it gave values to (the caller fills the others from the checkpoint)."""
    g = model.graph
    with torch.device("meta"):
        names = quantized_layers(ck, DiffusionLM(ck.args))
    done: set[str] = set()
    consumers: dict[str, list[ir.Node]] = {}
    for node in g:
        for i in node.inputs:
            if i is not None and i.name is not None:
                consumers.setdefault(i.name, []).append(node)
    for n in names:
        wname = prefix + n + ".weight"
        old = g.initializers.get(wname)
        if old is None:
            raise RuntimeError(f"internal: no initializer {wname} in the traced graph")
        users = consumers.get(wname, [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            raise RuntimeError(f"internal: {wname} is read by {[u.op_type for u in users]}, expected one Transpose")
        transpose = users[0]
        matmul = next((u for u in consumers.get(transpose.outputs[0].name, []) if u.op_type == "MatMul"), None)
        if matmul is None:
            raise RuntimeError(f"internal: the transposed {wname} feeds no MatMul")
        wref, sref = index[n + ".weight"], index[n + ".weight_scale"]
        N, K = wref.shape
        g.initializers.pop(wname)
        wq = _initializer(g, n + ".weight", _IR_DTYPES[wref.dtype], (N, K),
                          lambda r=wref: _tensor(read_tensor(r, r.dtype)))
        ws = _initializer(g, n + ".weight_scale", _IR_DTYPES[dtype], (N,),
                          lambda r=sref: ir.tensor(read_tensor(r, torch.float32).to(dtype)))
        done |= {wq.name, ws.name}
        dq_w = ir.node("DequantizeLinear", [wq, ws], {"axis": 0}, name=f"{n}.weight_dq")
        dq_w.outputs[0].name = f"{n}.weight_dequantized"
        g.insert_before(transpose, dq_w)
        transpose.replace_input_with(0, dq_w.outputs[0])
        if fmt == "int8-wo":
            continue
        s = float(read_tensor(index[n + ".input_scale"], torch.float32))
        xs = _const(g, n + ".input_scale", torch.tensor(s, dtype=dtype))
        zp = _const(g, n + ".input_zero_point",
                    torch.zeros((), dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8))
        done |= {xs.name, zp.name}
        slot = 0 if matmul.inputs[1] is transpose.outputs[0] else 1
        x = matmul.inputs[slot]
        q = ir.node("QuantizeLinear", [x, xs, zp], name=f"{n}.input_q")
        dq = ir.node("DequantizeLinear", [q.outputs[0], xs, zp], name=f"{n}.input_dq")
        q.outputs[0].name, dq.outputs[0].name = f"{n}.input_quantized", f"{n}.input_dequantized"
        g.insert_before(matmul, [q, dq])
        matmul.replace_input_with(slot, dq.outputs[0])
    return done


def _tensor(t: torch.Tensor) -> ir.Tensor:
    if t.dtype == torch.float8_e4m3fn:
        return ir.Tensor(t.view(torch.uint8).numpy(), dtype=ir.DataType.FLOAT8E4M3FN)
    return ir.tensor(t)
