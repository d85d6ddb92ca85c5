"""The cached attention as one ONNX node in our own domain (`--attention plugin`).

Node `dlmtrt::CachedAttention` (domain version 1), one per layer:

    inputs   q      [B, H, A, D]    float  queries of the active rows, RoPE applied
             k      [B, Hkv, L, D]  float  present keys of every canvas row (past with the active rows written)
             v      [B, Hkv, L, D]  float  present values
             valid  [B, L]          bool   keys that may be attended (present_valid & attention_mask)
             q_pos  [B, A]          int64  the queries' sequence positions (models/attention_kinds.py)
             k_pos  [B, L]          int64  the keys' sequence positions
    attrs    num_heads (int) H, num_kv_heads (int) Hkv (H % Hkv == 0), head_dim (int) D, scale (float) 1/sqrt(D),
             mask_type (int) 0 bidirectional, 1 block_causal; block_size (int) N of block_causal (0 otherwise)
    output   o      [B, H, A, D]    float  o[b,h,a] = sum_l softmax_l(scale * q[b,h,a].k[b,h//(H/Hkv),l]
                                           over allowed[b,a,l]) * v[b,h//(H/Hkv),l]
    allowed[b,a,l] = valid[b,l] and (mask_type == 0 or k_pos[b,l] // N <= q_pos[b,a] // N)

Semantics are exactly those of `models.transformer.cached_attention` (the standard decomposition the default
export emits): grouped-query heads share K/V in consecutive groups, keys a query may not attend get probability
0, and a query with no allowed key returns 0. The kind is an attribute, as TensorRT-LLM passes its
`AttentionMaskType`: the positions are inputs either way, so one node and one plugin serve both kinds. `reference_function()` is that decomposition as an ONNX function; adding
it to a plugin graph (`with_reference`) lets ONNX Runtime run the graph, which is how the tests prove the two
export modes equal. The TensorRT plugin (plugins/) implements the node natively.
"""
from __future__ import annotations

import math

import onnx
import torch
from onnx import TensorProto, helper
from torch import Tensor

from dlmtrt.models.attention_kinds import AttentionKind

DOMAIN = "dlmtrt"
OP = "CachedAttention"
VERSION = 1


@torch.library.custom_op("dlmtrt::cached_attention", mutates_args=())
def _cached_attention_op(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_pos: Tensor, k_pos: Tensor,
                         num_heads: int, num_kv_heads: int, head_dim: int, scale: float, mask_type: int,
                         block_size: int) -> Tensor:
    from dlmtrt.models.transformer import cached_attention
    return cached_attention(q, k, v, valid, q_pos, k_pos, AttentionKind.of(mask_type, block_size))


@_cached_attention_op.register_fake
def _(q, k, v, valid, q_pos, k_pos, num_heads, num_kv_heads, head_dim, scale, mask_type, block_size):
    return torch.empty_like(q)


def plugin_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_pos: Tensor, k_pos: Tensor,
                     kind: AttentionKind) -> Tensor:
    """Drop-in for `cached_attention` that the exporter turns into one `dlmtrt::CachedAttention` node
    (see `translation_table`); run eagerly it is `cached_attention` itself."""
    D = q.shape[3]
    return _cached_attention_op(q, k, v, valid, q_pos, k_pos, int(q.shape[1]), int(k.shape[1]), int(D),
                                1.0 / math.sqrt(D), kind.mask_type, kind.block)


def schema() -> onnx.defs.OpSchema:
    """The node's ONNX schema (also what lets onnx.checker and onnxscript validate it), registered once."""
    if onnx.defs.has(OP, VERSION, DOMAIN):
        return onnx.defs.get_schema(OP, VERSION, DOMAIN)
    S = onnx.defs.OpSchema
    A = onnx.defs.OpSchema.AttrType
    s = S(OP, DOMAIN, VERSION, doc=__doc__,
          inputs=[S.FormalParameter("q", "T"), S.FormalParameter("k", "T"), S.FormalParameter("v", "T"),
                  S.FormalParameter("valid", "tensor(bool)"), S.FormalParameter("q_pos", "tensor(int64)"),
                  S.FormalParameter("k_pos", "tensor(int64)")],
          outputs=[S.FormalParameter("o", "T")],
          type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")],
          attributes=[S.Attribute("num_heads", A.INT, "query heads H"),
                      S.Attribute("num_kv_heads", A.INT, "key/value heads Hkv"),
                      S.Attribute("head_dim", A.INT, "head size D"),
                      S.Attribute("scale", A.FLOAT, "logit scale, 1/sqrt(D)"),
                      S.Attribute("mask_type", A.INT, "0 bidirectional, 1 block_causal"),
                      S.Attribute("block_size", A.INT, "block size N of block_causal (0 otherwise)")])
    onnx.defs.register_schema(s)
    return s


def translation_table() -> dict:
    """`custom_translation_table` entry for torch.onnx.export: our op -> the custom-domain node."""
    import onnxscript
    op = onnxscript.values.Opset(DOMAIN, VERSION)
    schema()

    def cached_attention_node(q, k, v, valid, q_pos, k_pos, num_heads: int, num_kv_heads: int, head_dim: int,
                              scale: float, mask_type: int, block_size: int):
        return op.CachedAttention(q, k, v, valid, q_pos, k_pos, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                  head_dim=head_dim, scale=scale, mask_type=mask_type, block_size=block_size)
    return {torch.ops.dlmtrt.cached_attention.default: cached_attention_node}


def reference_function(opset: int) -> onnx.FunctionProto:
    """`dlmtrt::CachedAttention` written with standard operators (attributes referenced from the call)."""
    n = helper.make_node

    def const_from_attr(out: str, attr: str, kind) -> onnx.NodeProto:
        node = n("Constant", [], [out])
        node.attribute.append(helper.make_attribute_ref("value_int" if kind == "int" else "value_float",
                                                        onnx.AttributeProto.INT if kind == "int"
                                                        else onnx.AttributeProto.FLOAT))
        node.attribute[0].ref_attr_name = attr
        return node

    def ints(out: str, v: list[int]) -> onnx.NodeProto:
        return n("Constant", [], [out], value_ints=v)

    nodes = [
        const_from_attr("scale", "scale", "float"),
        const_from_attr("hkv0", "num_kv_heads", "int"),
        const_from_attr("heads0", "num_heads", "int"),
        ints("i0", [0]), ints("i2", [2]), ints("i4", [4]),
        n("Constant", [], ["neg_inf"], value=helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [-math.inf])),
        n("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
        n("Unsqueeze", ["hkv0", "i0"], ["hkv"]),
        n("Unsqueeze", ["heads0", "i0"], ["heads"]),
        # K/V [B, Hkv, L, D] -> [B, Hkv, 1, L, D] -> [B, Hkv, H/Hkv, L, D] -> [B, H, L, D]
        n("Shape", ["k"], ["kshape"]),
        n("Gather", ["kshape", "i0"], ["b"], axis=0),
        n("Div", ["heads", "hkv"], ["rep"]),
        n("Slice", ["kshape", "i2", "i4"], ["ld"]),
        n("Concat", ["b", "hkv", "rep", "ld"], ["exp_shape"], axis=0),
        n("Concat", ["b", "heads", "ld"], ["rep_shape"], axis=0),
        n("Unsqueeze", ["k", "i2"], ["k5"]),
        n("Unsqueeze", ["v", "i2"], ["v5"]),
        n("Expand", ["k5", "exp_shape"], ["ke"]),
        n("Expand", ["v5", "exp_shape"], ["ve"]),
        n("Reshape", ["ke", "rep_shape"], ["kk"]),
        n("Reshape", ["ve", "rep_shape"], ["vv"]),
        n("Cast", ["q"], ["q32"], to=TensorProto.FLOAT),
        n("Cast", ["kk"], ["k32"], to=TensorProto.FLOAT),
        n("Cast", ["vv"], ["v32"], to=TensorProto.FLOAT),
        n("Transpose", ["k32"], ["kt"], perm=[0, 1, 3, 2]),
        n("MatMul", ["q32", "kt"], ["s0"]),
        n("Mul", ["s0", "scale"], ["s"]),
        # allowed [B, 1, A, L] = valid [B, 1, 1, L] and (mask_type == 0 or k_pos // N <= q_pos // N)
        const_from_attr("mtype0", "mask_type", "int"),
        const_from_attr("bsize0", "block_size", "int"),
        n("Constant", [], ["one64"], value=helper.make_tensor("one64", TensorProto.INT64, [], [1])),
        n("Constant", [], ["zero64"], value=helper.make_tensor("zero64", TensorProto.INT64, [], [0])),
        n("Max", ["bsize0", "one64"], ["bsize"]),  # bidirectional carries 0: no division by it
        n("Div", ["q_pos", "bsize"], ["qblk"]),
        n("Div", ["k_pos", "bsize"], ["kblk"]),
        ints("i1", [1]),
        n("Unsqueeze", ["kblk", "i1"], ["kblk3"]),  # [B, 1, L]
        n("Unsqueeze", ["qblk", "i2"], ["qblk3"]),  # [B, A, 1]
        n("LessOrEqual", ["kblk3", "qblk3"], ["causal"]),  # [B, A, L]
        n("Equal", ["mtype0", "zero64"], ["bidir"]),
        n("Or", ["causal", "bidir"], ["kind_ok"]),
        n("Unsqueeze", ["valid", "i1"], ["valid3"]),  # [B, 1, L]
        n("And", ["valid3", "kind_ok"], ["allowed"]),
        n("Unsqueeze", ["allowed", "i1"], ["valid4"]),  # [B, 1, A, L]
        n("Where", ["valid4", "s", "neg_inf"], ["sm"]),
        n("Softmax", ["sm"], ["p0"], axis=-1),
        n("IsNaN", ["p0"], ["nan"]),
        n("Where", ["nan", "zero", "p0"], ["p"]),
        n("MatMul", ["p", "v32"], ["o32"]),
        n("CastLike", ["o32", "q"], ["o"]),
    ]
    return helper.make_function(DOMAIN, OP, ["q", "k", "v", "valid", "q_pos", "k_pos"], ["o"], nodes,
                                [helper.make_opsetid("", opset)],
                                attributes=["num_heads", "num_kv_heads", "head_dim", "scale", "mask_type",
                                            "block_size"])


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [nd for nd in model.graph.node if nd.domain == DOMAIN and nd.op_type == OP]


def with_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin-attention graph that ONNX Runtime can run: the node's reference function added."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    del m.functions[:]
    m.functions.append(reference_function(opset))
    return m
