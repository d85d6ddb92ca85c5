"""ONNX Runtime backend: runs an exported step graph (`dlmtrt export`) from the .onnx file and its tokenizer alone.

Every input and output is bound to a torch tensor through IO binding, so ONNX Runtime reads the past K/V from,
and writes the present K/V into, memory the decode loop already owns: nothing is copied between steps, and
with a GPU execution provider the cache never leaves the device.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dlmtrt.dtypes import DTYPES
from dlmtrt.errors import UsageError

from ..artifacts import ArtifactError, onnx_metadata, read_metadata
from ..contract import fixed_attention, named_inputs
from . import Backend
from dlmtrt.models.args import ModelArgs

from ..contract import ModelInfo, StepInputs, StepOutputs

_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
              "tensor(int64)": torch.long, "tensor(bool)": torch.bool}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.long: np.int64, torch.bool: np.bool_}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def onnx_path(model: str | Path) -> Path:
    """The .onnx file of an export directory (or the file itself), with a clear error when it is not one."""
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise UsageError(f"no exported model at {model}: the onnxruntime backend takes the directory written by "
                         "`dlmtrt export --model M --out DIR` (or its model.onnx); run the export first")
    return p


def describe(model: str | Path) -> tuple[Path, ModelArgs, dict[str, str]]:
    """(path, ModelArgs, dlmtrt metadata) of an exported model, without loading weights."""
    p = onnx_path(model)
    args, meta = read_metadata(onnx_metadata(p), p)
    return p, args, meta


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    takes = "export"
    polygraphy_runner = "onnxruntime"

    @classmethod
    def describe(cls, model: str):
        from . import ModelSource
        path, args, meta = describe(model)
        return ModelSource(path.parent, args.family, args, meta["dtype"])

    @classmethod
    def open(cls, model: str, dtype: str | None = None, device: str | None = None, progress=None):
        from . import ModelSource
        be = cls(model, device=device or cls.default_device)
        if dtype is not None and dtype != be.meta["dtype"]:
            raise UsageError(f"{be.path} was exported as {be.meta['dtype']}, not {dtype}: pass --dtype "
                             f"{be.meta['dtype']} (or leave it out), or export again with --dtype {dtype}",
                             field="dtype")
        return be, load_tokenizer(be), ModelSource(be.path.parent, be.args.family, be.args, be.meta["dtype"])

    def __init__(self, model: str | Path, device: str = "cpu", providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort
        self.path, self.args, self.meta = describe(model)
        dev = torch.device(device)
        if self.meta.get("attention") == "plugin":
            raise UsageError(f"{self.path} uses the dlmtrt::CachedAttention plugin node, which only the TensorRT "
                             "plugin implements; export with --attention standard for onnxruntime")
        dtype = DTYPES[self.meta["dtype"]]
        providers = providers or [PROVIDERS.get(dev.type, "")]
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise UsageError(f"ONNX Runtime execution provider(s) {missing} are not available in this onnxruntime "
                             f"build (it has {ort.get_available_providers()}); use --device cpu, or install the "
                             "onnxruntime build for your accelerator")
        if dtype == torch.bfloat16:
            raise UsageError(f"{self.path} is a bfloat16 graph: ONNX Runtime has no bf16 kernels on the CPU and its "
                             "Python IO binding has no bf16 element type; bf16 graphs are for TensorRT. Export with "
                             "--dtype float32 or float16 for onnxruntime")
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except Exception as e:  # ONNX Runtime raises its own Fail/InvalidGraph/... types for unreadable files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"ONNX Runtime cannot load {self.path} ({first[:300]}): the export is incomplete "
                                "or corrupt; export the checkpoint again with `dlmtrt export`") from None
        self.device = dev
        self.out_types = {o.name: _ORT_TYPES[o.type] for o in self.session.get_outputs()}
        a = self.args
        self.info = ModelInfo.of(a, dtype, dev)

    def new_cache(self, batch: int, length: int):
        a = self.args
        shape = (batch, a.num_kv_heads, length, a.head_dim)
        mk = lambda: torch.zeros(shape, dtype=self.info.dtype, device=self.device)  # noqa: E731
        return [mk() for _ in range(a.num_layers)], [mk() for _ in range(a.num_layers)]

    def _bind(self, io, name: str, t: torch.Tensor, output: bool) -> None:
        args = (name, t.device.type, t.device.index or 0, _NP[t.dtype], list(t.shape), t.data_ptr())
        (io.bind_output if output else io.bind_input)(*args)

    def step(self, s: StepInputs) -> StepOutputs:
        fixed_attention(s, self.info, "export")
        a = self.args
        B, A = s.input_ids.shape
        L = s.stable_mask.shape[1]
        io = self.session.io_binding()
        keep = []  # inputs made contiguous must outlive the run
        for name, t in named_inputs(s).items():
            t = t.to(self.device).contiguous()
            keep.append(t)
            self._bind(io, name, t, output=False)
        kv_shape = (B, a.num_kv_heads, L, a.head_dim)
        shapes = {"logits": (B, A, a.vocab_size), "present_valid": (B, L), "kv_drift": (B, A)}
        outs = {}
        for name, dtype in self.out_types.items():
            outs[name] = torch.empty(shapes.get(name, kv_shape), dtype=dtype, device=self.device)
            self._bind(io, name, outs[name], output=True)
        self.session.run_with_iobinding(io)
        n = a.num_layers
        return StepOutputs(outs["logits"], [outs[f"present.{i}.key"] for i in range(n)],
                           [outs[f"present.{i}.value"] for i in range(n)], outs["present_valid"], outs["kv_drift"])


def load_tokenizer(be: OnnxRuntimeBackend):
    """The tokenizer exported next to the graph, checked against the graph's mask token."""
    return tokenizer_from_dir(be.path.parent, be.args.mask_token_id, "graph", be.path)


def tokenizer_from_dir(d: Path, mask_token_id: int, what: str, artifact: Path):
    """The tokenizer files `dlmtrt export` wrote into `d`, checked against the mask token id in the metadata
    of `artifact` (a `what`: graph or engine)."""
    from transformers import PreTrainedTokenizerFast
    if not (d / "tokenizer.json").exists():
        raise UsageError(f"tokenizer.json missing next to {artifact}; copy the model's tokenizer files into {d} "
                         "(dlmtrt export does this)")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(d))
    except Exception as e:  # tokenizers raises bare Exceptions on malformed JSON
        raise ArtifactError(f"the tokenizer files in {d} cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else 'corrupt'}); copy the model's tokenizer "
                            "files there again (dlmtrt export does this)") from None
    mask_id = tok.convert_tokens_to_ids(tok.mask_token) if tok.mask_token else None
    if mask_id != mask_token_id:
        raise UsageError(f"the tokenizer in {d} does not match the {what}: mask token id {mask_id}, {what} metadata "
                         f"says {mask_token_id}; use the tokenizer the model was exported with")
    return tok


BACKEND = OnnxRuntimeBackend
