"""TensorRT backend: the step contract over a deserialized engine (`dlmtrt build-engine`).

Every input and output is a torch tensor on the GPU bound to the engine by address (`set_tensor_address`), so
nothing crosses PCIe and the K/V cache never moves: the cache is two sets of per-layer buffers, and each step
reads the past from one set and writes the present into the other (the decode loop hands the present back as the
next step's past, so the sets alternate). Inputs are copied into static per-shape buffers, which is what lets the
full TensorRT's enqueue be captured once per (batch, active rows, canvas, cache set) as a CUDA graph and replayed.

Where an engine cannot run, `check_executable` says so in one message before anything is deserialized: no
GPU, TensorRT-RTX on compute capability 9.0/10.0 (its runtime refuses Hopper and Blackwell datacenter parts),
or an engine built by another TensorRT flavour or version than the one installed. The engine's IO contract comes
from the JSON manifest written next to it, so nothing here needs TensorRT to plan the bindings; the tests drive
the whole backend on the CPU through an emulated execution context.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dlmtrt.dtypes import DTYPES
from dlmtrt.errors import DlmtrtError, UsageError
from dlmtrt.models.args import ModelArgs

from ..artifacts import read_manifest
from ..buckets import StaticSteps, bucket, pad_rows
from ..contract import ModelInfo, StepInputs, StepOutputs, fixed_attention, input_names, output_names
from . import Backend

NO_RTX_ON = {(9, 0): "Hopper (H100/H200)", (10, 0): "Blackwell datacenter (B200)"}


class EngineRuntimeError(DlmtrtError, RuntimeError):
    """An engine cannot execute here; the message names what was found and what is needed."""


def check_executable(man: dict, device: str | torch.device) -> str:
    """The TensorRT flavour that will run the engine, or EngineRuntimeError saying why none can here."""
    from dlmtrt.plugins.flavour import TensorRTMissingError, flavour, import_trt
    built = man.get("tensorrt", {})
    built_by = f"{built.get('flavour', '?')} {built.get('version', '?')}"
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise EngineRuntimeError(f"a TensorRT engine executes on an NVIDIA GPU, and "
                                 f"{'--device ' + str(dev) + ' was asked for' if dev.type != 'cuda' else 'this machine has none (torch.cuda.is_available() is False)'}"
                                 f"; run it with --device cuda on a GPU machine with {built_by} installed (engines "
                                 "build on any machine, they run only where they were built for)")
    try:
        name = flavour()
    except TensorRTMissingError as e:
        raise EngineRuntimeError(f"{e}; the engine was built with {built_by}") from None
    version = import_trt().__version__
    cc = torch.cuda.get_device_capability(dev)
    gpu = torch.cuda.get_device_name(dev)
    if name == "tensorrt_rtx" and cc in NO_RTX_ON:
        raise EngineRuntimeError(f"TensorRT-RTX {version} does not execute on compute capability {cc[0]}.{cc[1]} "
                                 f"({gpu}, {NO_RTX_ON[cc]}); install the full TensorRT (`tensorrt-cu13` from NVIDIA) "
                                 "on this machine and rebuild the engine with it (`dlmtrt build-engine`)")
    if (name, version) != (built.get("flavour"), built.get("version")):
        raise EngineRuntimeError(f"the engine was built with {built_by}, this process has {name} {version}: rebuild "
                                 "it here with `dlmtrt build-engine` (TensorRT engines are tied to the version that "
                                 "built them)")
    return name


def _deserialize(path: Path):
    from dlmtrt.plugins.flavour import import_trt
    from dlmtrt.plugins.trt_plugin import register
    trt = import_trt()
    register(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineRuntimeError(f"{trt.__name__} could not deserialize {path} (see its log above): rebuild it with "
                                 "`dlmtrt build-engine` on this machine")
    return engine, engine.create_execution_context()


class TensorRTBackend(Backend):
    name = "tensorrt"
    takes = "engine"
    default_device = "cuda"
    shares_cache = True  # two cache sets per backend: one session at a time
    polygraphy_runner = "tensorrt"
    STATIC = 128  # static buffer sets (and graphs) kept, least recently used out

    @classmethod
    def describe(cls, model: str):
        from . import ModelSource, export_dir_of
        p, man, args, meta = read_manifest(model)
        return ModelSource(export_dir_of(p), args.family, args, meta["dtype"])

    @classmethod
    def open(cls, model: str, dtype: str | None = None, device: str | None = None, progress=None):
        from . import ModelSource, export_dir_of
        _, _, _, meta = read_manifest(model)
        if dtype is not None and dtype != meta["dtype"]:
            raise UsageError(f"{model} was built from a {meta['dtype']} export, not {dtype}: leave --dtype out",
                             field="dtype")
        be = cls(model, device=device or cls.default_device)
        return be, load_tokenizer(be), ModelSource(export_dir_of(be.path), be.args.family, be.args, be.meta["dtype"])

    def __init__(self, engine: str | Path, device: str = "cuda", *, context=None, graphs: bool | None = None):
        """`context` replaces the engine's execution context (anything with set_input_shape, set_tensor_address
        and execute_async_v3): the tests pass an emulator so that everything but TensorRT itself runs on the CPU."""
        self.path, self.manifest, self.args, self.meta = read_manifest(engine)
        self.engine = None
        if context is None:
            flav = check_executable(self.manifest, device)
            self.engine, context = _deserialize(self.path)
            graphs = (flav == "tensorrt") if graphs is None else graphs  # RTX's JIT makes capture its own business
        self.context = context
        self.graphs = bool(graphs)
        self.device = torch.device(device)
        self.dtype = DTYPES[self.meta["dtype"]]
        a = self.args
        self.info = ModelInfo.of(a, self.dtype, self.device)
        self.inputs, self.outputs = input_names(a.num_layers), output_names(a.num_layers)
        self._sets: list[tuple[list, list]] = []
        self._static = StaticSteps(self._make_static, self.STATIC)
        self.bound: dict[str, torch.Tensor] = {}  # name -> tensor whose address the context has now
        self.enqueues = 0
        self.replays = 0

    def new_cache(self, batch: int, length: int):
        """Two cache sets; the first is the past of the first step."""
        a = self.args
        shape = (batch, a.num_kv_heads, length, a.head_dim)
        mk = lambda: [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(a.num_layers)]  # noqa: E731
        self._sets = [(mk(), mk()), (mk(), mk())]
        self._static.clear()
        return self._sets[0]

    def _present_set(self, past_keys: list) -> int:
        if not self._sets or self._sets[0][0][0].shape != past_keys[0].shape:
            raise ValueError("the tensorrt backend steps over the cache its own new_cache() returned")
        ptr = past_keys[0].data_ptr()
        if ptr == self._sets[0][0][0].data_ptr():
            return 1
        if ptr == self._sets[1][0][0].data_ptr():
            return 0
        raise ValueError("the tensorrt backend steps over the cache its own new_cache() returned")

    def _bind(self, name: str, t: torch.Tensor) -> None:
        self.context.set_tensor_address(name, t.data_ptr())
        self.bound[name] = t

    def _make_static(self, key: tuple) -> dict:
        B, A, L, out_set = key
        a, dev = self.args, self.device
        past = self._sets[1 - out_set]
        present = self._sets[out_set]
        st = {"input_ids": torch.zeros(B, A, dtype=torch.long, device=dev),
              "position_ids": torch.zeros(B, A, dtype=torch.long, device=dev),
              "stable_mask": torch.zeros(B, L, dtype=torch.bool, device=dev),
              "attention_mask": torch.ones(B, L, dtype=torch.bool, device=dev),
              "logits": torch.empty(B, A, a.vocab_size, dtype=self.dtype, device=dev),
              "present_valid": torch.empty(B, L, dtype=torch.bool, device=dev),
              "kv_drift": torch.empty(B, A, dtype=torch.float32, device=dev)}
        for i in range(a.num_layers):
            st[f"past_key_values.{i}.key"], st[f"past_key_values.{i}.value"] = past[0][i], past[1][i]
            st[f"present.{i}.key"], st[f"present.{i}.value"] = present[0][i], present[1][i]
        return st

    def _enqueue(self, st: dict, stream) -> None:
        for n in self.inputs:
            self.context.set_input_shape(n, tuple(st[n].shape))
            self._bind(n, st[n])
        for n in self.outputs:
            self._bind(n, st[n])
        if not self.context.execute_async_v3(stream):
            raise EngineRuntimeError(f"TensorRT failed to enqueue {self.path} (see its log above)")
        self.enqueues += 1

    @torch.no_grad()
    def step(self, s: StepInputs) -> StepOutputs:
        """The active rows are padded to their row bucket (runtime/buckets.py: the last row repeated, which
        rewrites the same slot), so a generation runs a few shapes, each with its static buffers and graph."""
        fixed_attention(s, self.info, "engine")
        B, A = s.input_ids.shape
        L = s.stable_mask.shape[1]
        out_set = self._present_set(s.past_keys)
        rows = bucket(A, L)
        st = self._static.get((B, rows, L, out_set))
        st["input_ids"].copy_(pad_rows(s.input_ids, rows))
        st["position_ids"].copy_(pad_rows(s.position_ids, rows))
        st["stable_mask"].copy_(s.stable_mask)
        st["attention_mask"].copy_(s.attention_mask)
        cuda = self.device.type == "cuda"
        stream = torch.cuda.current_stream(self.device).cuda_stream if cuda else 0
        if self.graphs and cuda:
            if "graph" not in st:
                self._enqueue(st, stream)  # TensorRT needs one enqueue with these shapes before a capture
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    self._enqueue(st, torch.cuda.current_stream(self.device).cuda_stream)
                st["graph"] = g
            st["graph"].replay()
            self.replays += 1
        else:
            self._enqueue(st, stream)
        present = self._sets[out_set]
        return StepOutputs(st["logits"][:, :A], present[0], present[1], st["present_valid"].clone(),
                           st["kv_drift"][:, :A])


def load_tokenizer(be: TensorRTBackend):
    """The tokenizer the export wrote, found beside the engine or in its export directory (the manifest's)."""
    from .onnxruntime_backend import tokenizer_from_dir
    for d in (be.path.parent, Path(be.manifest.get("onnx", {}).get("dir", be.path.parent))):
        if (d / "tokenizer.json").exists():
            return tokenizer_from_dir(d, be.args.mask_token_id, "engine", be.path)
    raise UsageError(f"no tokenizer.json beside {be.path} or in its export directory; copy the model's tokenizer "
                     f"files next to the engine")


BACKEND = TensorRTBackend
