"""The TensorRT backend up to TensorRT's own execution, on the CPU: its manifest reading, bindings (every input's
shape set, every tensor bound by address, past and present cache sets alternating), row buckets, static per-shape
buffers and the step contract are driven through an emulated execution context that runs the engine's source, the
exported ONNX graph, with ONNX Runtime on the bound tensors; generation through it is token-identical to the torch
backend. Where an engine cannot run, one message says what was found and what is needed."""
from __future__ import annotations

import json

import pytest
import torch

from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.backends.tensorrt_backend import EngineRuntimeError, TensorRTBackend, check_executable
from dlmtrt.runtime.artifacts import onnx_metadata
from dlmtrt.runtime.contract import StepInputs, input_names, output_names
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.buckets import row_buckets
from dlmtrt.runtime.params import greedy_params

PROMPTS = ["sudoku\n0120\n4231\n2000\n0040\n", "countdown 3 4 5 -> 17\n"]


class EmulatedContext:
    """An IExecutionContext stand-in: records shapes and addresses like TensorRT does, and on enqueue runs the
    exported graph the engine was built from (ONNX Runtime) on the tensors bound at those addresses, writing into
    the bound outputs."""

    def __init__(self, export_dir, n_layers: int):
        from dlmtrt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
        self.ref = OnnxRuntimeBackend(export_dir)
        self.n = n_layers
        self.shapes, self.addresses = {}, {}
        self.backend = None  # set after construction: where the bound tensors are looked up by address

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        b = self.backend.bound
        for name in input_names(self.n) + output_names(self.n):
            assert self.addresses[name] == b[name].data_ptr(), name
        for name in input_names(self.n):
            assert self.shapes[name] == tuple(b[name].shape), name
        assert self.addresses["past_key_values.0.key"] != self.addresses["present.0.key"]
        t = {k: b[k] for k in input_names(self.n)}
        s = StepInputs(t["input_ids"], t["position_ids"],
                       [t[f"past_key_values.{i}.key"].clone() for i in range(self.n)],
                       [t[f"past_key_values.{i}.value"].clone() for i in range(self.n)],
                       t["stable_mask"], t["attention_mask"])
        out = self.ref.step(s)
        b["logits"].copy_(out.logits)
        b["present_valid"].copy_(out.present_valid)
        b["kv_drift"].copy_(out.kv_drift)
        for i in range(self.n):
            b[f"present.{i}.key"].copy_(out.present_keys[i])
            b[f"present.{i}.value"].copy_(out.present_values[i])
        return True


def write_manifest(export_dir, tmp_path, flavour="tensorrt_rtx", version="1.7.1.116"):
    from dlmtrt.runtime.artifacts import write_manifest as write
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not a real engine")
    write(engine, {"tensorrt": {"flavour": flavour, "version": version},
                   "onnx": {"dir": str(export_dir), "metadata": onnx_metadata(export_dir / "model.onnx")}})
    return engine


@pytest.mark.parametrize("family,policy", [("dream", "none"), ("dream", "decode"), ("llada", "dual")])
def test_generation_through_the_bindings_is_token_identical(exported, tmp_path, family, policy):
    ref, tok, _ = make_backend("torch", f"tiny-{family}-tasks")
    engine = write_manifest(exported(family), tmp_path)
    ctx = EmulatedContext(exported(family), ref.info.num_layers)
    be = TensorRTBackend(engine, device="cpu", context=ctx)
    ctx.backend = be
    assert be.info == ref.info
    p = greedy_params(family, 16, blocks=2 if family == "llada" else None)
    a = generate_text(ref, tok, PROMPTS, policy=policy, **p)
    b = generate_text(be, tok, PROMPTS, policy=policy, **p)
    assert torch.equal(a.sequences, b.sequences)
    assert be.enqueues == b.stats.steps
    L = a.sequences.shape[1]
    keys = list(be._static.entries)
    assert all(k[1] in row_buckets(L) and k[3] in (0, 1) for k in keys)  # row buckets, two cache sets
    assert len(keys) <= 2 * len(row_buckets(L)), keys


def test_static_buffers_are_bounded(exported, tmp_path, monkeypatch):
    """Every shape a long generation meets gets buffers; beyond the cap the least recently used go."""
    ref, _, _ = make_backend("torch", "tiny-dream-tasks")
    ctx = EmulatedContext(exported("dream"), ref.info.num_layers)
    monkeypatch.setattr(TensorRTBackend, "STATIC", 3)
    be = TensorRTBackend(write_manifest(exported("dream"), tmp_path), device="cpu", context=ctx)
    ctx.backend = be
    keys, values = be.new_cache(1, 64)
    stable = torch.zeros(1, 64, dtype=torch.bool)
    am = torch.ones(1, 64, dtype=torch.bool)
    for A in (1, 2, 3, 5, 9, 17, 33):
        out = be.step(StepInputs(torch.full((1, A), 7), torch.arange(A)[None], keys, values, stable, am))
        assert out.logits.shape[1] == A and out.kv_drift.shape == (1, A)
        keys, values = out.present_keys, out.present_values
    assert len(be._static) == 3 and be._static.evicted == 4


def test_the_cache_sets_alternate_and_foreign_caches_are_refused(exported, tmp_path):
    ref, _, _ = make_backend("torch", "tiny-dream-tasks")
    ctx = EmulatedContext(exported("dream"), ref.info.num_layers)
    be = TensorRTBackend(write_manifest(exported("dream"), tmp_path), device="cpu", context=ctx)
    ctx.backend = be
    keys, values = be.new_cache(1, 8)
    ids = torch.tensor([[5, 6]])
    s = StepInputs(ids, torch.tensor([[0, 1]]), keys, values, torch.zeros(1, 8, dtype=torch.bool),
                   torch.ones(1, 8, dtype=torch.bool))
    out = be.step(s)
    assert out.present_keys[0].data_ptr() != keys[0].data_ptr() and out.logits.shape == (1, 2, ref.info.vocab_size)
    out2 = be.step(StepInputs(ids, torch.tensor([[2, 3]]), out.present_keys, out.present_values, s.stable_mask,
                              s.attention_mask))
    assert out2.present_keys[0].data_ptr() == keys[0].data_ptr()
    with pytest.raises(ValueError, match="its own new_cache"):
        be.step(StepInputs(ids, s.position_ids, [k.clone() for k in keys], values, s.stable_mask, s.attention_mask))


def test_an_engine_that_cannot_run_here_says_what_is_needed(exported, tmp_path):
    engine = write_manifest(exported("dream"), tmp_path)
    man = json.loads((tmp_path / "model.engine.json").read_text())
    with pytest.raises(EngineRuntimeError, match="executes on an NVIDIA GPU.*--device cpu was asked for"):
        check_executable(man, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(EngineRuntimeError, match="this machine has none"):
            TensorRTBackend(engine, device="cuda")


def test_missing_engine_or_manifest(tmp_path):
    from dlmtrt.errors import UsageError
    with pytest.raises(UsageError, match="build one with `dlmtrt build-engine"):
        TensorRTBackend(tmp_path / "nope.engine", device="cpu", context=object())
    (tmp_path / "x.engine").write_bytes(b"x")
    with pytest.raises(UsageError, match="has no manifest"):
        TensorRTBackend(tmp_path / "x.engine", device="cpu", context=object())
