"""The TensorRT plugin of the `dlmtrt::CachedAttention` ONNX node: a Python IPluginV3 and its creator.

Why a Python plugin and not a C++ one. A C++ IPluginV3 is compiled against TensorRT's headers
(NvInferRuntime.h, NvInferPluginBase.h), and neither TensorRT flavour's package registry wheel ships them
(`tensorrt-rtx-cu13` and `tensorrt-cu13` carry the libraries and Python bindings only; the headers come in
NVIDIA's tarballs and SDK installers, which this workplace cannot reach). TensorRT's Python API, on the other
hand, accepts plugins written in Python (`trt.IPluginV3` with the `IPluginV3One*` capabilities), for both
`tensorrt` and `tensorrt_rtx`: one plugin serves both flavours, and the classes are built against whichever
module `flavour.flavour()` picks, so the builder and the plugin always share one registry. Only the
plugin's bookkeeping is Python (shapes, types, fields, serialization); the work itself is the C++/CUDA
kernel behind the C ABI of `launcher.launch_ptrs`, which `enqueue` calls with TensorRT's device pointers and
stream, exactly as the torch op and the GPU tests do. What Python costs is a few microseconds of host time
per layer per step, and the engine needs this module imported (`register()`) in the process that
deserializes it (TensorRT looks the creator up by name, version and namespace).

How the ONNX parser finds it. TensorRT's ONNX parser has no importer for `CachedAttention`, so it falls back
to the plugin registry: it asks for the creator named after the node's op_type, version
`plugin_version` (attribute, default "1") in namespace `plugin_namespace` (attribute, default ""); the
node's ONNX domain (`dlmtrt`) plays no part. The exported node carries neither attribute (its schema in
export/attention.py has exactly num_heads, num_kv_heads, head_dim, scale, mask_type, block_size), so the
creator is registered as
`CachedAttention`, version "1", namespace "". Every node attribute becomes a plugin field of the same name
(INT -> INT32, FLOAT -> FLOAT32). Under TensorRT-RTX 1.7 that import needs `libtensorrt_rtx.so` on the
dynamic loader's path, which its wheel does not provide; engine/build.py says how builds get around it.

Contract (export/attention.py documents the semantics): inputs q [B,H,A,D], k and v [B,Hkv,L,D] of one float
type (fp32, fp16 or bf16), valid [B,L] bool, q_pos [B,A] and k_pos [B,L] int64; output o [B,H,A,D] of q's type;
every tensor linear and contiguous. The attention kind is the fields mask_type and block_size, as
TensorRT-LLM's attention plugin takes its mask type.
"""
from __future__ import annotations

import functools
from types import ModuleType

import numpy as np

from dlmtrt.errors import DlmtrtError
from dlmtrt.models.attention_kinds import AttentionKind

from .flavour import import_trt

PLUGIN_NAME = "CachedAttention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
INT_FIELDS = ("num_heads", "num_kv_heads", "head_dim", "mask_type", "block_size")
FIELDS = (*INT_FIELDS, "scale")


class PluginFieldError(DlmtrtError, ValueError):
    """A CachedAttention node's attributes are missing or inconsistent."""


def _fields(fc) -> dict[str, float | int]:
    """{name: value} of a PluginFieldCollection (the parser's node attributes, or a deserialized engine's)."""
    got = {}
    for f in fc:
        if f.name in FIELDS:
            data = np.asarray(f.data).reshape(-1)
            if data.size != 1:
                raise PluginFieldError(f"{PLUGIN_NAME}: field {f.name} must be a scalar, got {data.size} values")
            got[f.name] = float(data[0]) if f.name == "scale" else int(data[0])
    missing = [n for n in FIELDS if n not in got]
    if missing:
        raise PluginFieldError(f"{PLUGIN_NAME}: missing attribute(s) {', '.join(missing)}")
    H, Hkv, D = got["num_heads"], got["num_kv_heads"], got["head_dim"]
    if H <= 0 or Hkv <= 0 or D <= 0 or H % Hkv:
        raise PluginFieldError(f"{PLUGIN_NAME}: num_heads {H} must be a positive multiple of num_kv_heads {Hkv}, "
                               f"head_dim {D} positive")
    try:
        AttentionKind.of(got["mask_type"], got["block_size"])
    except DlmtrtError as e:
        raise PluginFieldError(f"{PLUGIN_NAME}: mask_type {got['mask_type']}, block_size {got['block_size']}: {e}") \
            from None
    return got


@functools.cache
def _classes(trt: ModuleType) -> tuple[type, type]:
    """(plugin class, creator class) built on `trt` (tensorrt or tensorrt_rtx).

    Over the project's ~80 lines on purpose: both classes must subclass the module picked at run time, so they
    are defined here (once per module), and the length is the plugin class's body, one short method per
    TensorRT callback; splitting it would spread one class over several factories."""
    FLOATS = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16"}

    class CachedAttentionPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                                trt.IPluginV3OneRuntime):
        def __init__(self, fields: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.fields = dict(fields)
            self.phase = phase
            self.num_outputs = 1
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            # nothing to time (one implementation); equal attributes share an id
            self.timing_cache_id = ""
            kind = AttentionKind.of(fields["mask_type"], fields["block_size"])
            self.metadata_string = (f"H={fields['num_heads']} Hkv={fields['num_kv_heads']} D={fields['head_dim']} "
                                    f"scale={fields['scale']:.9g} {kind.spec}")

        # ---- core
        def get_capability_interface(self, type):
            return self

        def clone(self):
            return CachedAttentionPlugin(self.fields, self.phase)

        # ---- build
        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:
                return desc.type in FLOATS
            if pos == 3:
                return desc.type == trt.DataType.BOOL
            if pos in (4, 5):  # q_pos, k_pos
                return desc.type == trt.DataType.INT64
            return desc.type == in_out[0].desc.type  # k, v, o: q's type

        def configure_plugin(self, inp, out):
            pass

        def workspace_bytes(self, trt_type) -> int:
            """The most any launch of these heads may use for its key splits; 0 where the library is not built
            here (a build without it: the engine then runs few-row steps with fewer splits, same result)."""
            from . import launcher
            f = self.fields
            try:
                return _workspace_bound(f["num_heads"], f["num_kv_heads"], f["head_dim"],
                                        launcher.DTYPE_CODES.get(FLOATS.get(trt_type, ""), 0))
            except launcher.PluginError:
                return 0

        def get_workspace_size(self, inp, out):
            return self.workspace_bytes(inp[0].desc.type)

        def get_valid_tactics(self):
            return []

        # ---- runtime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inp, out):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            f = self.fields
            return trt.PluginFieldCollection([
                trt.PluginField(n, np.array([f[n]], dtype=np.int32), trt.PluginFieldType.INT32) for n in INT_FIELDS
            ] + [trt.PluginField("scale", np.array([f["scale"]], dtype=np.float32), trt.PluginFieldType.FLOAT32)])

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            from . import launcher
            B, H, A, D = (int(d) for d in input_desc[0].dims)
            _, Hkv, L, _ = (int(d) for d in input_desc[1].dims)
            launcher.launch_ptrs(int(inputs[0]), int(inputs[1]), int(inputs[2]), int(inputs[3]), int(inputs[4]),
                                 int(inputs[5]), int(outputs[0]), B, H, Hkv, A, L, D, float(self.fields["scale"]),
                                 launcher.DTYPE_CODES[FLOATS[input_desc[0].type]], self.fields["mask_type"],
                                 self.fields["block_size"], int(stream), int(workspace),
                                 self.workspace_bytes(input_desc[0].type))

    class CachedAttentionCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(n, np.array([]), trt.PluginFieldType.INT32) for n in INT_FIELDS]
                + [trt.PluginField("scale", np.array([]), trt.PluginFieldType.FLOAT32)])

        def create_plugin(self, name, fc, phase):
            return CachedAttentionPlugin(_fields(fc), phase)

    return CachedAttentionPlugin, CachedAttentionCreator


@functools.lru_cache(maxsize=None)
def _workspace_bound(H: int, Hkv: int, D: int, dtype_code: int) -> int:
    """The library's workspace bound for these heads, asked once (enqueue needs it at every layer of every step;
    a missing library raises, which the cache does not keep)."""
    from . import launcher
    return launcher.workspace_size(1, H, Hkv, 0, 1, D, dtype_code)


_CREATORS: dict[str, object] = {}  # flavour module name -> the registered creator (kept alive here)


def register(trt: ModuleType | None = None):
    """Register the creator with `trt`'s plugin registry (the flavour's module by default), once per process;
    returns the creator. Call it before parsing a graph with CachedAttention nodes and before deserializing an
    engine that holds them."""
    trt = trt or import_trt()
    if trt.__name__ not in _CREATORS:
        _, Creator = _classes(trt)
        creator = Creator()
        registry = trt.get_plugin_registry()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise DlmtrtError(f"{trt.__name__} refused to register the {PLUGIN_NAME} plugin creator (another "
                              f"creator named {PLUGIN_NAME} version {PLUGIN_VERSION} is registered already)")
        _CREATORS[trt.__name__] = creator
    return _CREATORS[trt.__name__]
