"""One definition of which keys a query row may attend (models/attention_kinds.py `may_attend`), run against every
implementation on the same inputs: the model's attention, the torch-graph backend's, the exported
`dlmtrt::CachedAttention` node through its ONNX reference function, the standard-operator export of the same
attention, and (on a GPU) the CUDA kernel through the launcher the TensorRT plugin calls. Both kinds, grouped
heads, left padding, rows without any key they may attend."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from dlmtrt.models.attention_kinds import AttentionKind, may_attend, sequence_positions
from dlmtrt.models.transformer import cached_attention
from dlmtrt.runtime.backends.torch_graph_backend import gqa_attention

KINDS = [AttentionKind(), AttentionKind("block_causal", 4), AttentionKind("block_causal", 1),
         AttentionKind("block_causal", 16)]


def case(seed: int = 0, B: int = 2, H: int = 4, Hkv: int = 2, A: int = 6, L: int = 19, D: int = 16,
         dtype=torch.float32):
    """Random q/k/v; row 0 left-padded by 3; keys partly invalid; the active rows' slots scattered."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, A, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, L, D, generator=g, dtype=dtype)
    am = torch.ones(B, L, dtype=torch.bool)
    am[0, :3] = False
    valid = am & (torch.rand(B, L, generator=g) < 0.8)
    slots = torch.stack([torch.randperm(L, generator=g)[:A].sort().values for _ in range(B)])
    k_pos = sequence_positions(am)
    return q, k, v, valid, k_pos.gather(1, slots), k_pos


def reference(q, k, v, valid, q_pos, k_pos, kind) -> torch.Tensor:
    """Dense float64 attention over the keys `may_attend` allows; 0 for a row that may attend none."""
    B, H, A, D = q.shape
    rep = H // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)
    allowed = may_attend(kind, q_pos, k_pos, valid)[:, None]
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    return p @ vv


def test_the_definition():
    kind = AttentionKind("block_causal", 4)
    q_pos = torch.tensor([[0, 3, 4, 9]])
    k_pos = torch.arange(12)[None]
    allowed = may_attend(kind, q_pos, k_pos, torch.ones(1, 12, dtype=torch.bool))[0]
    assert allowed.sum(1).tolist() == [4, 4, 8, 12]  # a query sees its block and every earlier one
    assert may_attend(AttentionKind(), q_pos, k_pos, k_pos < 5)[0].sum(1).tolist() == [5, 5, 5, 5]
    assert AttentionKind.parse("block_causal:8") == AttentionKind("block_causal", 8)
    assert AttentionKind.parse(AttentionKind("block_causal", 8).spec).block == 8
    for bad in ("causal", "block_causal", "block_causal:0", "block_causal:x"):
        with pytest.raises(ValueError):
            AttentionKind.parse(bad)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.spec)
def test_model_and_torch_graph_attention(kind):
    args = case()
    ref = reference(*args, kind)
    torch.testing.assert_close(cached_attention(*args, kind).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gqa_attention(*args, kind, gqa=True).double(), ref, rtol=1e-5, atol=1e-5)


def _node_model(kind: AttentionKind, shapes: dict) -> onnx.ModelProto:
    from dlmtrt.export.attention import DOMAIN, OP, VERSION, with_reference
    names = ["q", "k", "v", "valid", "q_pos", "k_pos"]
    types = {"valid": TensorProto.BOOL, "q_pos": TensorProto.INT64, "k_pos": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), list(shapes[n])) for n in names]
    node = helper.make_node(OP, names, ["o"], domain=DOMAIN, num_heads=shapes["q"][1], num_kv_heads=shapes["k"][1],
                            head_dim=shapes["q"][3], scale=1 / math.sqrt(shapes["q"][3]), mask_type=kind.mask_type,
                            block_size=kind.block)
    graph = helper.make_graph([node], "attn", inputs, [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, VERSION)],
                          ir_version=10)  # what ONNX Runtime 1.30 (the GPU machine's) still reads
    return with_reference(m)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.spec)
def test_the_exported_node_through_its_reference_function(kind):
    import onnxruntime as ort
    args = case(1)
    names = ["q", "k", "v", "valid", "q_pos", "k_pos"]
    feeds = {n: t.numpy() for n, t in zip(names, args)}
    m = _node_model(kind, {n: t.shape for n, t in zip(names, args)})
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    (o,) = sess.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(o).double(), reference(*args, kind), rtol=1e-5, atol=1e-5)


class _Attend(torch.nn.Module):
    def __init__(self, kind: AttentionKind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, valid, q_pos, k_pos):
        return cached_attention(q, k, v, valid, q_pos, k_pos, self.kind)


@pytest.mark.parametrize("kind", KINDS[:2], ids=lambda k: k.spec)
def test_the_standard_operator_export(kind, tmp_path):
    """What `dlmtrt export --attention standard` emits for a layer's attention, traced and run by ONNX Runtime."""
    import onnxruntime as ort
    args = case(2)
    path = tmp_path / "attn.onnx"
    torch.onnx.export(_Attend(kind).eval(), args, str(path), dynamo=True, opset_version=18)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), args)}
    (o,) = sess.run(None, feeds)
    torch.testing.assert_close(torch.from_numpy(np.asarray(o)).double(), reference(*args, kind), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a GPU (bench/gpu_attention.py)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.spec)
def test_the_cuda_kernel_through_the_plugins_launcher(kind, dtype, tol):
    from dlmtrt.plugins.torch_op import plugin_attend
    for D in (64, 128):
        args = case(3, B=2, H=8, Hkv=2, A=9, L=70, D=D, dtype=dtype)
        ref = reference(*args, kind)
        got = plugin_attend(*(t.cuda() for t in args), kind).double().cpu()
        err = (got - ref).abs().max() / ref.abs().max()
        assert err <= tol, (kind.spec, dtype, D, float(err))


def _blockwise_and_full(spec: str, pad: int):
    """(logits of 3 blocks of 4 computed one block per step over the cache, logits of one full pass) of a tiny
    random model whose one sequence is left-padded by `pad` (blocks count from its first real token)."""
    from dataclasses import replace

    from dlmtrt.models.tiny import random_state_dict, tiny_args, tiny_vocabulary
    from dlmtrt.models.transformer import DiffusionLM
    vocab, ids = tiny_vocabulary("llada")
    args = replace(tiny_args("llada", vocab, ids), attention=spec)
    m = DiffusionLM(args)
    m.load_state_dict(random_state_dict(args, 3, torch.float32), strict=False)
    m.eval()
    L = 12 + pad
    x = torch.randint(0, 250, (1, L), generator=torch.Generator().manual_seed(4))
    am = torch.ones(1, L, dtype=torch.bool)
    am[0, :pad] = False
    with torch.no_grad():
        full = m.full_logits(x, am)
        keys, values = m.empty_cache(1, L)
        valid = torch.zeros(1, L, dtype=torch.bool)
        pieces = []
        for start in (pad, pad + 4, pad + 8):
            pos = torch.arange(start, start + 4)[None]
            logits, keys, values, valid, _ = m(x.gather(1, pos), pos, keys, values, valid, am)
            pieces.append(logits)
    return torch.cat(pieces, 1)[0], full[0, pad:]


@pytest.mark.parametrize("pad", [0, 3])
def test_a_block_causal_cache_is_exact_block_by_block(pad):
    """The step contract under block_causal: prefilling blocks one step at a time, each over the cache of the
    earlier ones (stable) with nothing after it valid, gives exactly the logits of one full pass, at any left
    padding; under bidirectional attention it does not (a block's rows attend later ones in the full pass)."""
    step, full = _blockwise_and_full("block_causal:4", pad)
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    step, full = _blockwise_and_full("bidirectional", pad)
    assert not torch.allclose(step[:8], full[:8], atol=1e-3)
