"""Build TensorRT engines of the exported step graph.

`tensorrt` is used where it is importable, else `tensorrt_rtx` (TensorRT for RTX: the same Python API, and its
ONNX parser and builder run on a machine without a GPU); `plugins.flavour` decides, so the CachedAttention
plugin subclasses the very module that builds. `build_engine` is `dlmtrt build-engine`: export directory in,
serialized engine plus a JSON manifest out, with the TensorRT API directly (a strongly typed network, one
optimization profile per `--profile`, a timing cache, a progress monitor). `engine_from_onnx` is the
Polygraphy build the comparison tools use.

TensorRT-RTX 1.7's ONNX parser, when it meets a plugin node, dlopen()s `libtensorrt_rtx.so` by that bare name
(to reach the builder's private plugin API), but the wheel ships only `libtensorrt_rtx.so.1`: in a plain
process the parser then calls std::terminate. The dynamic loader reads its search path once, at process start,
so a build of a plugin graph under TensorRT-RTX runs in a child process (`_child_main`) whose
LD_LIBRARY_PATH holds a symlink of that name to the wheel's library; everything else runs in-process.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dlmtrt.errors import DlmtrtError, OutputExistsError, UsageError
from dlmtrt.plugins.flavour import TensorRTMissingError, import_trt
from dlmtrt.plugins.flavour import flavour as _flavour
from dlmtrt.runtime.artifacts import read_manifest, write_manifest
from dlmtrt.runtime.buckets import bucket

AXES = ("batch", "active", "canvas")
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DEFAULT_CANVAS_CAP = 2048  # default max canvas when the model's positions allow more (pass --profile for longer)

Events = Callable[[dict], None]


class EngineError(DlmtrtError, RuntimeError):
    """No TensorRT flavour is installed, or the engine cannot be built; the message says what is needed."""


def flavour() -> str:
    """'tensorrt' or 'tensorrt_rtx', whichever is installed (the full TensorRT first)."""
    try:
        return _flavour()
    except TensorRTMissingError as e:
        raise EngineError(str(e)) from None


def _polygraphy_trt(rtx: bool):
    """Polygraphy's TensorRT backend, told which flavour to import before its first import."""
    from polygraphy import config
    if "polygraphy.backend.trt" not in sys.modules:
        config.USE_TENSORRT_RTX = rtx
    import polygraphy.backend.trt as trt_backend
    return trt_backend


def profile_from_shapes(feeds: Sequence[Mapping]) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) shape per input covering every feed: min the smallest, opt and max the largest."""
    out = {}
    for n in feeds[0]:
        shapes = [tuple(f[n].shape) for f in feeds]
        lo = tuple(min(s[d] for s in shapes) for d in range(len(shapes[0])))
        hi = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
        out[n] = (lo, hi, hi)
    return out


def engine_from_onnx(path: str | Path, shapes: Mapping[str, tuple[tuple, tuple, tuple]]):
    """A built (in-memory) engine of `path` with one optimization profile of `shapes`, strongly typed so the
    graph's own dtypes are kept. A plugin graph gets the CachedAttention plugin registered first."""
    name = flavour()
    if _plugin_node_count(Path(path)):
        from dlmtrt.plugins.trt_plugin import register
        if not parser_can_import_plugins(name):
            raise EngineError(_RTX_LOADER_NOTE)
        register()
    trt = _polygraphy_trt(name == "tensorrt_rtx")
    profile = trt.Profile()
    for n, (lo, opt, hi) in shapes.items():
        profile.add(n, min=lo, opt=opt, max=hi)
    return trt.engine_from_network(trt.NetworkFromOnnxPath(str(path), strongly_typed=True),
                                   config=trt.CreateConfig(profiles=[profile]))


# ---- the TensorRT-RTX loader problem (module docstring)

_RTX_LIB = "libtensorrt_rtx.so"
_RTX_LOADER_NOTE = (f"TensorRT-RTX's ONNX parser needs {_RTX_LIB} on the dynamic loader's path to import a plugin "
                    "node, and this process cannot load it (the wheel ships only libtensorrt_rtx.so.1); build with "
                    "`dlmtrt build-engine`, which runs such builds in a child process with that path set")


def parser_can_import_plugins(trt_name: str) -> bool:
    """Whether this process's ONNX parser can add plugin layers (always for the full TensorRT)."""
    if trt_name != "tensorrt_rtx":
        return True
    try:
        ctypes.CDLL(_RTX_LIB)
        return True
    except OSError:
        return False


def _rtx_library_file() -> Path:
    """The libtensorrt_rtx.so.1 this interpreter loads (from the wheel's tensorrt_rtx_libs)."""
    import_trt()
    for line in Path("/proc/self/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if Path(path).name.startswith(_RTX_LIB + "."):
            return Path(path)
    import importlib.util
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            for f in sorted(Path(d).glob(_RTX_LIB + ".*")):
                return f
    raise EngineError(f"cannot find the {_RTX_LIB}.* that tensorrt_rtx loads; reinstall tensorrt-rtx")


# ---- optimization profiles over the export's dynamic axes

def default_axes(meta: Mapping[str, str]) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) per dynamic axis from the export's metadata: batch 1:1:8; canvas 1:512:cap where
    cap = min(max_position_embeddings, 2048); active rows 1:32:cap. The opt values are the row buckets
    (runtime/buckets.py) the TensorRT backend pads 32 active rows (a typical block) and a 512-row canvas to."""
    cap = max(1, min(int(meta.get("max_position_embeddings") or DEFAULT_CANVAS_CAP), DEFAULT_CANVAS_CAP))
    return {"batch": (1, 1, 8), "active": (1, bucket(min(32, cap), cap), cap),
            "canvas": (1, bucket(min(512, cap), cap), cap)}


def parse_profile(spec: str, defaults: Mapping[str, tuple[int, int, int]]) -> dict[str, tuple[int, int, int]]:
    """'batch=1:2:8,canvas=1:256:512' (an axis left out keeps its default; N alone means N:N:N) -> axes."""
    axes = dict(defaults)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise UsageError(f"--profile {spec!r}: {part!r} is not AXIS=MIN:OPT:MAX with AXIS one of "
                             f"{', '.join(AXES)}")
        try:
            nums = tuple(int(v) for v in value.split(":"))
        except ValueError:
            raise UsageError(f"--profile {spec!r}: {name}={value} is not MIN:OPT:MAX in integers") from None
        if len(nums) == 1:
            nums = nums * 3
        if len(nums) != 3 or not 1 <= nums[0] <= nums[1] <= nums[2]:
            raise UsageError(f"--profile {spec!r}: {name} needs 1 <= MIN <= OPT <= MAX (or one value N), got {value}")
        axes[name] = nums
    return axes


def input_shapes(inputs: Sequence[tuple[str, list]], axes: Mapping[str, tuple[int, int, int]]) -> dict[str, dict]:
    """{input: {min, opt, max}} for graph inputs given as (name, dims), a dim a size or an axis name."""
    out = {}
    for name, dims in inputs:
        shape = {}
        for k, which in enumerate(("min", "opt", "max")):
            s = []
            for d in dims:
                if isinstance(d, int):
                    s.append(d)
                elif d in axes:
                    s.append(axes[d][k])
                else:
                    raise EngineError(f"input {name} has the dynamic dimension {d!r}, which is none of the export's "
                                      f"axes ({', '.join(AXES)}); re-export the model with `dlmtrt export`")
            shape[which] = s
        out[name] = shape
    return out


# ---- the export directory

@dataclass
class ExportInfo:
    onnx_path: Path
    meta: dict[str, str]  # the dlmtrt metadata without its prefix
    props: dict[str, str]  # metadata_props as stored (what runtime.contract.read_metadata reads)
    inputs: list[tuple[str, str, list]]  # (name, dtype, dims: ints and axis names)
    outputs: list[tuple[str, str, list]]
    plugin_nodes: int
    files: list[Path]


def _onnx_dtype(elem: int) -> str:
    import onnx
    name = onnx.TensorProto.DataType.Name(elem).lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _plugin_node_count(path: Path) -> int:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in m.graph.node if n.domain == "dlmtrt" and n.op_type == "CachedAttention")


def read_export(onnx_dir: str | Path) -> ExportInfo:
    """What a build needs from an export directory (or its model.onnx), without loading external weights."""
    import onnx
    from dlmtrt.runtime.artifacts import ArtifactError, read_metadata
    p = Path(onnx_dir).expanduser()
    if not p.exists():
        raise ArtifactError(f"--onnx {onnx_dir}: no such directory; pass the directory `dlmtrt export --out DIR` "
                            "wrote")
    path = p / "model.onnx" if p.is_dir() else p
    if not path.is_file():
        raise ArtifactError(f"--onnx {onnx_dir} is not an export: it has no model.onnx; run `dlmtrt export --model M "
                            "--out DIR` and pass DIR")
    from google.protobuf.message import DecodeError
    try:
        m = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}); export the checkpoint "
                            "again with `dlmtrt export`") from None
    props = {q.key: q.value for q in m.metadata_props}
    _, meta = read_metadata(props, path)

    def io(values):
        return [(v.name, _onnx_dtype(v.type.tensor_type.elem_type),
                 [d.dim_param if d.dim_param else int(d.dim_value) for d in v.type.tensor_type.shape.dim])
                for v in values]
    init = {t.name for t in m.graph.initializer}
    files = [path] + [path.parent / f for f in sorted({e.value for t in m.graph.initializer for e in t.external_data
                                                       if e.key == "location"})]
    plugin = sum(1 for n in m.graph.node if n.domain == "dlmtrt" and n.op_type == "CachedAttention")
    inputs = io([v for v in m.graph.input if v.name not in init])
    return ExportInfo(path, meta, props, inputs, io(m.graph.output), plugin, files)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * 2 ** 20):
            h.update(chunk)
    return h.hexdigest()


# ---- the TensorRT calls (in this process or in the child)

def _trt_dtype(dt) -> str:
    return {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
            "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}.get(dt.name, dt.name.lower())


def _layer_report(text: str) -> list[dict]:
    """Layers (name, type) from the builder's verbose layer report: TensorRT-RTX writes
    'Name: X, LayerType: T, ...' lines, TensorRT 'Layer(T): X, ...' lines."""
    rows = []
    for line in text.splitlines():
        if m := re.match(r"\s*Name: ([^,]+), LayerType: ([^,]+),", line):
            rows.append({"name": m.group(1), "type": m.group(2)})
        elif m := re.match(r"\s*Layer\(([^)]+)\): ([^,]+),", line):
            rows.append({"name": m.group(2), "type": m.group(1)})
    return rows


def _build(onnx_path: str, engine_path: str, profiles: list[dict], timing_cache: str | None, events: Events) -> dict:
    """Parse, configure, build and write the serialized engine; returns what the manifest records."""
    from dlmtrt.plugins.trt_plugin import register
    trt = import_trt()
    register(trt)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)  # kept alive until the build: it owns the parsed weights
    t_parse = _parse(trt, parser, logger, onnx_path, events)
    config = _builder_config(trt, builder, profiles, events)
    cache_info = _use_timing_cache(config, timing_cache)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    t_build = time.perf_counter() - t0
    if serialized is None:
        why = "; ".join(logger.errors)[:800] or "no reason given"
        raise EngineError(f"{trt.__name__} could not build the engine: {why}")
    data = memoryview(serialized)
    with open(engine_path, "wb") as f:
        f.write(data)
    if cache_info is not None:
        cache_info["bytes_after"] = _save_timing_cache(config, timing_cache)
    return {"flavour": trt.__name__, "version": trt.__version__, "engine_bytes": len(data),
            **_network_summary(network), "engine_layers": logger.layers,
            "timing_cache": cache_info, "warnings": logger.warnings[:20],
            "seconds": {"parse": t_parse, "build": t_build}}


def _make_logger(trt):
    """A logger on `trt` (whichever flavour builds) that keeps the errors, warnings and the verbose layer report
    for the manifest and the error messages."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors, self.warnings, self.layers = [], [], []

        def log(self, severity, msg):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(msg)
            elif msg.startswith(("Layers:", "Engine Layer Information")):
                self.layers += _layer_report(msg)
    return Logger()


def _make_monitor(trt, events: Events):
    """A progress monitor on `trt` that turns the builder's phases and steps into `events`."""
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            events({"event": "phase_start", "phase": phase_name, "parent": parent_phase, "steps": int(num_steps)})

        def step_complete(self, phase_name, step):
            events({"event": "step", "phase": phase_name, "step": int(step)})
            return True

        def phase_finish(self, phase_name):
            events({"event": "phase_finish", "phase": phase_name})
    return Monitor()


def _parse(trt, parser, logger, onnx_path: str, events: Events) -> float:
    """Parse the ONNX file into the parser's network; returns the seconds it took."""
    events({"event": "parse_start"})
    t0 = time.perf_counter()
    if not parser.parse_from_file(onnx_path):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "; ".join(logger.errors)
        raise EngineError(f"{trt.__name__} cannot parse {onnx_path}: {errs[:600]}")
    t_parse = time.perf_counter() - t0
    events({"event": "parse_finish", "seconds": t_parse})
    return t_parse


def _builder_config(trt, builder, profiles: list[dict], events: Events):
    """The builder config: detailed layer report, progress events, one optimization profile per `profiles`."""
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer report in the log and in the engine
    config.progress_monitor = _make_monitor(trt, events)
    for axes_shapes in profiles:
        prof = builder.create_optimization_profile()
        for name, s in axes_shapes.items():
            prof.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(prof)
    return config


def _use_timing_cache(config, timing_cache: str | None) -> dict | None:
    """Start the build from the timing cache file when there is one; None when no cache was asked for, else
    what the manifest says of it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TensorRT-RTX: timing cache calls are no-ops
        if not timing_cache:
            return None
        old = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(old)
        config.set_timing_cache(cache, False)
        return {"path": str(timing_cache), "reused": bool(old), "bytes_before": len(old)}


def _save_timing_cache(config, timing_cache: str) -> int:
    """Write the build's timing cache back (atomically: a concurrent build never reads half a file); returns its
    size in bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        blob = bytes(memoryview(config.get_timing_cache().serialize()))
    Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{timing_cache}.tmp-{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, timing_cache)
    return len(blob)


def _network_summary(network) -> dict:
    """The parsed network's IO tensors, layer counts by type and plugin layer names, for the manifest."""
    def tensors(n, get):
        return [{"name": t.name, "dtype": _trt_dtype(t.dtype), "shape": list(t.shape)} for t in map(get, range(n))]
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return {"inputs": tensors(network.num_inputs, network.get_input),
            "outputs": tensors(network.num_outputs, network.get_output),
            "network_layers": network.num_layers, "network_layer_types": _count(la.type.name for la in layers),
            "network_plugin_layers": [la.name for la in layers if la.type.name in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN")]}


def _child_main() -> None:
    """`python -c 'from dlmtrt.engine.build import _child_main; _child_main()'`: one `_build` whose request is
    JSON on stdin; events and the result are JSON lines on stdout."""
    req = json.loads(sys.stdin.read())

    def emit(ev):
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()
    try:
        result = _build(req["onnx"], req["engine"], req["profiles"], req["timing_cache"], emit)
    except DlmtrtError as e:
        emit({"event": "error", "message": str(e)})
        sys.exit(1)
    emit({"event": "result", "result": result})


def _build_in_child(req: dict, events: Events) -> dict:
    """`_build` in a child process whose loader path has libtensorrt_rtx.so (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="dlmtrt-rtx-") as d:
        (Path(d) / _RTX_LIB).symlink_to(_rtx_library_file())
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [d, env.get("LD_LIBRARY_PATH")]))
        env["DLMTRT_TENSORRT"] = "tensorrt_rtx"
        with open(Path(d) / "stderr.txt", "w+") as err:  # a file, not a pipe: a full pipe would block the child
            proc = subprocess.Popen([sys.executable, "-c",
                                     "from dlmtrt.engine.build import _child_main; _child_main()"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            proc.stdin.write(json.dumps(req))
            proc.stdin.close()
            result, error = None, None
            for line in proc.stdout:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("event") == "result":
                    result = ev["result"]
                elif ev.get("event") == "error":
                    error = ev["message"]
                else:
                    events(ev)
            rc = proc.wait()
            err.seek(0)
            stderr = err.read()
    if error is not None:
        raise EngineError(error)
    if rc != 0 or result is None:
        tail = " | ".join(stderr.strip().splitlines()[-4:])
        raise EngineError(f"the TensorRT-RTX build process failed (exit {rc}): {tail[-800:] or 'no output'}")
    return result


# ---- dlmtrt build-engine

@dataclass
class BuildResult:
    engine_path: Path
    manifest_path: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)


def build_engine(onnx_dir: str | Path, out: str | Path, *, precision: str | None = None,
                 profiles: Sequence[str] = (), timing_cache: str | Path | None = None, overwrite: bool = False,
                 events: Events | None = None) -> BuildResult:
    """Build a serialized engine of an export directory into `out` and write `out`.json beside it (the
    manifest: IO, profiles, TensorRT flavour and version, plugin library hash, and under "onnx" the export
    directory, its files' sha256 and its metadata_props as stored, which the tensorrt backend reads).

    precision: fp32 / fp16 / bf16 (or float32 / ...), which must be the export's dtype: the network is strongly
    typed, so the graph's types are the engine's. profiles: `--profile` specs (parse_profile), one optimization
    profile each; none gives one profile of `default_axes`. timing_cache: a file read if present and written
    back after the build (default: none)."""
    events = events or (lambda ev: None)
    t_start = time.perf_counter()
    info = read_export(onnx_dir)
    out = _check_out(out, overwrite)
    dtype = info.meta.get("dtype", "float32")
    _check_precision(precision, dtype)
    defaults = default_axes(info.meta)
    axes_list = [parse_profile(s, defaults) for s in profiles] or [dict(defaults)]
    shapes_list = [input_shapes([(n, dims) for n, _, dims in info.inputs], axes) for axes in axes_list]
    name = flavour()
    lib_sha, lib_file = _plugin_library(info)
    tmp = _reserve_tmp(out)
    t_hash = time.perf_counter()
    source_hashes = {f.name: _sha256(f) for f in info.files if f.is_file()}
    t_hash = time.perf_counter() - t_hash
    req = {"onnx": str(info.onnx_path), "engine": str(tmp), "profiles": shapes_list,
           "timing_cache": str(Path(timing_cache).expanduser().absolute()) if timing_cache else None}
    res, where, engine_sha = _build_into(out, tmp, req, bool(info.plugin_nodes), name, events)

    from dlmtrt import __version__
    manifest = {
        "engine": {"file": out.name, "bytes": res["engine_bytes"], "sha256": engine_sha},
        "tensorrt": {"flavour": res["flavour"], "version": res["version"], "strongly_typed": True,
                     "built": where, "host": {"machine": platform.machine(), "python": platform.python_version()}},
        "precision": dtype,
        **_manifest_io(info, res),
        "profiles": [{"axes": {a: list(v) for a, v in axes.items()}, "shapes": shapes}
                     for axes, shapes in zip(axes_list, shapes_list)],
        "plugin_library_sha256": lib_sha,
        "plugin": _manifest_plugin(info, res, lib_file, lib_sha),
        "layers": {"network": res["network_layers"], "network_types": res["network_layer_types"],
                   "engine": len(res["engine_layers"]),
                   "engine_types": _count(r["type"] for r in res["engine_layers"])},
        "timing_cache": res["timing_cache"] and {
            **res["timing_cache"],
            **({"note": "timing cache calls are no-ops in TensorRT-RTX"} if res["flavour"] == "tensorrt_rtx" else {})},
        "onnx": {"dir": str(info.onnx_path.parent.absolute()), "file": str(info.onnx_path.absolute()),
                 "sha256": source_hashes, "metadata": info.props},
        "dlmtrt": __version__,
        "seconds": {"hash": round(t_hash, 3), **{k: round(v, 3) for k, v in res["seconds"].items()},
                    "total": round(time.perf_counter() - t_start, 3)},
    }
    mpath = write_manifest(out, manifest)
    return BuildResult(out, mpath, read_manifest(out)[1], manifest["seconds"])


def _check_out(out: str | Path, overwrite: bool) -> Path:
    """`out` as an absolute path, refused when it is a directory or (without `overwrite`) exists."""
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise OutputExistsError(f"--out {out} is a directory; give the engine's file name (e.g. "
                                f"{out / 'model.engine'})")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"--out {out} exists; choose another file or pass --overwrite")
    return out


def _check_precision(precision: str | None, dtype: str) -> None:
    """A strongly typed network keeps the graph's types, so an asked precision must be the export's dtype."""
    if precision is None:
        return
    wanted = PRECISIONS.get(precision, precision)
    if wanted != dtype:
        raise UsageError(f"--precision {precision} does not match the export, which is {dtype}: the engine is "
                         f"strongly typed (the graph's types are kept), so re-export with `dlmtrt export --dtype "
                         f"{wanted}` or leave --precision out")


def _plugin_library(info: ExportInfo) -> tuple[str | None, str | None]:
    """(sha256, path) of the plugin library a plugin graph's engine runs with (path None when it is not found
    here), (None, None) for a graph without plugin nodes."""
    if not info.plugin_nodes:
        return None, None
    from dlmtrt.plugins.launcher import library_path, library_sha256, PluginError
    lib_sha = library_sha256()
    try:
        return lib_sha, str(library_path())
    except PluginError:
        return lib_sha, None


def _reserve_tmp(out: Path) -> Path:
    """The temporary file beside `out` the engine is written to (and renamed from), created now so that an
    unwritable --out fails before the build."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.touch()
    except OSError as e:
        raise EngineError(f"cannot write the engine to {out}: {e.strerror or e}; choose a writable --out") from None
    return tmp


def _build_into(out: Path, tmp: Path, req: dict, plugin_graph: bool, trt_name: str,
                events: Events) -> tuple[dict, str, str]:
    """(build result, where it was built, engine sha256): the engine built into `tmp`, in a child process when
    this one's parser cannot import the plugin nodes, then renamed to `out`; `tmp` is gone afterwards either way."""
    try:
        if plugin_graph and not parser_can_import_plugins(trt_name):
            res = _build_in_child(req, events)
            where = "in a child process (TensorRT-RTX loader path)"
        else:
            res = _build(req["onnx"], req["engine"], req["profiles"], req["timing_cache"], events)
            where = "in this process"
        engine_sha = _sha256(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return res, where, engine_sha


def _manifest_io(info: ExportInfo, res: dict) -> dict:
    """The manifest's inputs and outputs: the engine's tensors with the export's dtypes and dimension names."""
    dims = {n: d for n, _, d in info.inputs + info.outputs}
    onnx_types = {n: t for n, t, _ in info.inputs + info.outputs}
    return {kind: [{"name": t["name"], "dtype": t["dtype"], "onnx_dtype": onnx_types.get(t["name"]),
                    "shape": dims.get(t["name"], t["shape"])} for t in res[kind]] for kind in ("inputs", "outputs")}


def _manifest_plugin(info: ExportInfo, res: dict, lib_file: str | None, lib_sha: str | None) -> dict | None:
    """The manifest's plugin entry (None for a graph without plugin nodes)."""
    if not info.plugin_nodes:
        return None
    engine_layers = [r["name"] for r in res["engine_layers"]
                     if r["type"] in ("custom_layer", "PluginV3", "PluginV2") or "CachedAttention" in r["type"]]
    return {"name": "CachedAttention", "version": "1", "namespace": "", "onnx_nodes": info.plugin_nodes,
            "network_layers": res["network_plugin_layers"], "engine_layers": engine_layers,
            "python_module": "dlmtrt.plugins.trt_plugin", "library": lib_file, "library_sha256": lib_sha}


def _count(items) -> dict[str, int]:
    c: dict[str, int] = {}
    for x in items:
        c[x] = c.get(x, 0) + 1
    return c
