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

import json
from pathlib import Path

import torch

from dlmtrt.dtypes import DTYPES
from dlmtrt.errors import DlmtrtError, UsageError
from dlmtrt.models.args import ModelArgs

from ..contract import ModelInfo, StepInputs, StepOutputs, input_names, named_inputs, output_names, read_metadata

NO_RTX_ON = {(9, 0): "Hopper (H100/H200)", (10, 0): "Blackwell datacenter (B200)"}


class EngineRuntimeError(DlmtrtError, RuntimeError):
    """An engine cannot execute here; the message names what was found and what is needed."""


def manifest_path(engine: str | Path) -> tuple[Path, Path]:
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
    m = p.with_name(p.name + ".json")
    if not m.is_file():
        m = p.with_suffix(".json")
    if not m.is_file():
        raise UsageError(f"{p} has no manifest ({p.name}.json) beside it: it was not built by `dlmtrt build-engine`; "
                         "build it again with that command")
    return p, m


def read_manifest(engine: str | Path) -> tuple[Path, dict, ModelArgs, dict]:
    """(engine file, manifest, ModelArgs, dlmtrt export metadata) without TensorRT."""
    p, m = manifest_path(engine)
    man = json.loads(m.read_text())
    props = man.get("metadata") or man.get("onnx", {}).get("metadata") or {}
    args, meta = read_metadata(props, m)
    return p, man, args, meta


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


class TensorRTBackend:
    name = "tensorrt"

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
        self.info = ModelInfo(family=a.family, num_layers=a.num_layers, num_kv_heads=a.num_kv_heads,
                              head_dim=a.head_dim, vocab_size=a.vocab_size, mask_token_id=a.mask_token_id,
                              eos_token_id=a.eos_token_id, pad_token_id=a.pad_token_id, logits_shift=a.logits_shift,
                              dtype=self.dtype, device=self.device)
        self.inputs, self.outputs = input_names(a.num_layers), output_names(a.num_layers)
        self._sets: list[tuple[list, list]] = []
        self._static: dict[tuple, dict] = {}
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

    def _static_for(self, B: int, A: int, L: int, out_set: int) -> dict:
        key = (B, A, L, out_set)
        st = self._static.get(key)
        if st is not None:
            return st
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
        self._static[key] = st
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
        B, A = s.input_ids.shape
        L = s.stable_mask.shape[1]
        out_set = self._present_set(s.past_keys)
        st = self._static_for(B, A, L, out_set)
        for n, t in named_inputs(s).items():
            if not n.startswith("past_key_values."):
                st[n].copy_(t)
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
        return StepOutputs(st["logits"], present[0], present[1], st["present_valid"].clone(), st["kv_drift"])


def describe(engine: str | Path) -> tuple[Path, ModelArgs, dict]:
    p, man, args, meta = read_manifest(engine)
    return p, args, meta


def load_tokenizer(be: TensorRTBackend):
    """The tokenizer the export wrote, found beside the engine or in its export directory (the manifest's)."""
    from .onnxruntime_backend import tokenizer_from_dir
    for d in (be.path.parent, Path(be.manifest.get("onnx", {}).get("dir", be.path.parent))):
        if (d / "tokenizer.json").exists():
            return tokenizer_from_dir(d, be.args.mask_token_id, "engine", be.path)
    raise UsageError(f"no tokenizer.json beside {be.path} or in its export directory; copy the model's tokenizer "
                     f"files next to the engine")
