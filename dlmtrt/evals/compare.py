"""Compare backends on the same step inputs with Polygraphy: the library behind `dlmtrt compare`.

Step inputs come from real denoising trajectories of the PyTorch fp32 model (dlmtrt/evals/trajectory.py) or
from a file saved earlier; every output of the step graph is compared with its own tolerance, keyed by the
graph's dtype (present_valid exactly). The TensorRT runner builds its engine with dlmtrt/engine.
"""
from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dlmtrt.errors import DlmtrtError, UsageError
from dlmtrt.runtime.contract import input_names, output_kind, output_names

from .trajectory import DEFAULT_POLICIES, DEFAULT_STEPS_PER_POLICY, default_policies

OUTPUT_KINDS = ("logits", "present", "present_valid", "kv_drift")
# export dtype -> output kind -> (rtol, atol), Polygraphy's element-wise check: an element fails only when it
# is off by more than atol AND by more than rtol relative to the reference (PyTorch fp32). present_valid is a
# boolean mask and must be equal. Measured on the tiny task models over their trajectories (ONNX Runtime CPU):
# float32 worst |logits| error 1.3e-4, |K/V| 2.6e-5, |kv_drift| 3.5e-7; float16 8.5e-2, 2.3e-2, 2.9e-4 (bf16
# runs widened to fp32 arithmetic on the CPU, so its defaults are a guess for real bf16 engines).
TOLERANCES = {
    "float32": {"logits": (1e-3, 1e-3), "present": (1e-3, 1e-4), "present_valid": (0.0, 0.0),
                "kv_drift": (1e-3, 1e-4)},
    "float16": {"logits": (5e-2, 2e-1), "present": (2e-2, 5e-2), "present_valid": (0.0, 0.0),
                "kv_drift": (5e-2, 5e-2)},
    "bfloat16": {"logits": (1e-1, 5e-1), "present": (5e-2, 1e-1), "present_valid": (0.0, 0.0),
                 "kv_drift": (1e-1, 1e-1)},
}


def make_torch_runner(model, name: str = "torch"):
    """A Polygraphy runner over the PyTorch step graph (dlmtrt/export/step_graph.py StepGraph) of `model`.

    Polygraphy 0.53.6's PytRunner moves every input to CUDA and returns (outputs, time) where the runner
    protocol wants the outputs (and `inference_time` set); this one keeps the inputs on the model's device and
    follows the protocol."""
    import numpy as np
    import torch
    from polygraphy.backend.pyt import PytRunner
    from polygraphy.common import TensorMetadata

    from dlmtrt.export.step_graph import StepGraph

    a = model.args
    meta = TensorMetadata()
    for n in input_names(a.num_layers):
        if n in ("input_ids", "position_ids"):
            meta.add(n, np.int64, ["batch", "active"])
        elif n in ("stable_mask", "attention_mask"):
            meta.add(n, bool, ["batch", "canvas"])
        else:
            meta.add(n, np.float32, ["batch", a.num_kv_heads, "canvas", a.head_dim])
    graph = StepGraph(model).eval()
    device = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype

    class TorchStepRunner(PytRunner):
        def infer_impl(self, feed_dict):
            import time
            with torch.inference_mode():
                inputs = []
                for n, (dt, _) in self.input_metadata.items():
                    t = torch.from_numpy(np.ascontiguousarray(feed_dict[n])).to(device)
                    inputs.append(t.to(dtype) if t.is_floating_point() else t)
                start = time.time()
                outputs = self.model(*inputs)
                self.inference_time = time.time() - start
            return OrderedDict((n, o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy())
                               for n, o in zip(self.output_names, outputs))

    # a callable is invoked on activation to get the module, and an nn.Module is callable: wrap it
    return TorchStepRunner(lambda: graph, meta, output_names(a.num_layers), name=name)


def make_onnxrt_runner(path: Path, attention: str, dtype: str, name: str = "onnxruntime"):
    """ONNX Runtime (CPU) over the exported graph, through dlmtrt/export/checks.py `session_for_check`: a plugin graph
    gets its reference attention function and bf16 is widened to fp32 (no CPU bf16 kernels), external data
    (graphs over 2 GiB) included."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from dlmtrt.export.checks import session_for_check
    return OnnxrtRunner(lambda: session_for_check(Path(path), attention, dtype), name=name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def make_tensorrt_runner(path: Path, feeds: list, name: str = "tensorrt", log: Callable[[str], None] = print):
    """(runner, None) when a TensorRT engine of `path` builds and runs one feed here, else (None, reason).
    What cannot work here (no TensorRT, no GPU) is found before the build is started or announced."""
    from dlmtrt.engine.build import EngineError, engine_from_onnx, flavour, profile_from_shapes
    try:
        trt_name = flavour()
    except EngineError as e:
        return None, str(e)
    import torch
    if not torch.cuda.is_available():
        return None, "no CUDA GPU is visible (TensorRT engines run on NVIDIA GPUs)"
    log(f"building a TensorRT engine ({trt_name})")
    try:
        from polygraphy.backend.trt import TrtRunner
        engine = engine_from_onnx(path, profile_from_shapes(feeds))
        with TrtRunner(engine, name=name) as probe:
            probe.infer(feeds[0])
        return TrtRunner(engine, name=name), None
    except BaseException as e:  # Polygraphy reports failures as PolygraphyException (or SystemExit)
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"{trt_name} cannot build or run the engine: {_first_line(e)}"


def parse_tolerances(specs, n_layers: int, dtype: str, what: str) -> OrderedDict:
    """Per-output tolerances for Polygraphy: the export dtype's defaults, overridden by `specs` ('VALUE' for
    every output, or 'NAME:VALUE' where NAME is an output name or kind: logits, present, present_valid,
    kv_drift). `what` is 'rtol' or 'atol'."""
    index = 0 if what == "rtol" else 1
    defaults = TOLERANCES.get(dtype, TOLERANCES["float32"])
    names = output_names(n_layers)
    tol = OrderedDict((n, defaults[output_kind(n)][index]) for n in names)
    parsed = [(spec, *str(spec).rpartition(":")) for spec in specs or ()]
    # like Polygraphy: a bare VALUE is the default of the outputs not named; kinds before single outputs
    parsed.sort(key=lambda p: 0 if not p[2] else 1 if p[1] in OUTPUT_KINDS else 2)
    for spec, key, sep, value in parsed:
        try:
            v = float(value)
        except ValueError:
            raise UsageError(f"--{what} {spec!r}: expected VALUE or OUTPUT:VALUE, for example --{what} "
                             f"logits:1e-3") from None
        if v < 0:
            raise UsageError(f"--{what} {spec!r}: a tolerance must be >= 0")
        if not sep:
            targets = names
        elif key in OUTPUT_KINDS:
            targets = [n for n in names if output_kind(n) == key]
        elif key in names:
            targets = [key]
        else:
            raise UsageError(f"--{what} {spec!r}: unknown output {key!r}; use one of {', '.join(OUTPUT_KINDS)} "
                             f"or an output name (present.0.key, ...)")
        for n in targets:
            tol[n] = v
    return tol


def _compact(tol: OrderedDict) -> list[str]:
    """Polygraphy's tolerance list: the most common value as the default, then the outputs that differ."""
    values = list(tol.values())
    default = max(set(values), key=values.count)
    return [f"{default:g}"] + [f"{n}:{v:g}" for n, v in tol.items() if v != default]


def polygraphy_run_command(onnx_file, outputs_file, rtols: OrderedDict, atols: OrderedDict, *, model: str | None = None,
                           policies=None, steps_per_policy: int | None = None, seed: int = 0,
                           max_feeds: int | None = None, feeds_file=None) -> tuple[dict, list[str]]:
    """(environment, argv) of the `polygraphy run` that repeats a `dlmtrt compare` against its saved outputs:
    ONNX Runtime on the same step inputs (replayed from `feeds_file`, else recomputed from `model`)."""
    env = {}
    if feeds_file is not None:
        env["DLMTRT_FEEDS"] = str(feeds_file)
    else:
        env["DLMTRT_MODEL"] = str(model)
        env["DLMTRT_POLICIES"] = ";".join(policies or DEFAULT_POLICIES)
        if steps_per_policy != DEFAULT_STEPS_PER_POLICY:
            env["DLMTRT_STEPS_PER_POLICY"] = str(steps_per_policy or 0)
        if seed:
            env["DLMTRT_SEED"] = str(seed)
    if max_feeds is not None:
        env["DLMTRT_MAX_FEEDS"] = str(max_feeds)
    from .polygraphy_data import data_loader_script
    argv = ["polygraphy", "run", str(onnx_file), "--onnxrt", "--data-loader-script", data_loader_script(),
            "--load-outputs", str(outputs_file), "--rtol", *_compact(rtols), "--atol", *_compact(atols)]
    return env, argv


def shell_command(env: dict, argv: list[str]) -> str:
    import shlex
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


@dataclass
class OutputResult:
    backend: str
    output: str
    steps_ok: int
    steps: int
    max_abs: float
    max_rel: float
    rel_l2: float
    atol: float
    rtol: float

    @property
    def ok(self) -> bool:
        return self.steps > 0 and self.steps_ok == self.steps


@dataclass
class CompareReport:
    model_path: Path
    feeds: int
    reference: str
    backends: list[str]
    graph_dtype: str
    graph_attention: str
    rows: list[OutputResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    polygraphy_command: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        return [f"{r.backend} {r.output}" for r in self.rows if not r.ok]


def comparable_backends() -> tuple[str, ...]:
    """The backends with a Polygraphy runner (runtime/backends: `polygraphy_runner`)."""
    from dlmtrt.runtime.backends import BACKENDS, backend_class
    return tuple(n for n in BACKENDS if backend_class(n).polygraphy_runner)


def check_backends(backends: str | list[str]) -> list[str]:
    names = [b.strip() for b in backends.split(",") if b.strip()] if isinstance(backends, str) else list(backends)
    known = comparable_backends()
    unknown = [b for b in names if b not in known]
    if unknown or len(set(names)) != len(names):
        raise UsageError(f"--backends {','.join(names)!r}: give distinct backends among {', '.join(known)}")
    if len(names) < 2:
        raise UsageError("--backends: name at least two backends to compare")
    return names


# the Polygraphy runners (a backend's `polygraphy_runner`) that run the exported graph rather than the checkpoint
GRAPH_RUNNERS = ("onnxruntime", "tensorrt")


@dataclass(frozen=True)
class _Graph:
    """The exported step graph the graph runners run (path None when no backend needs one)."""

    path: Path | None = None
    dtype: str = "float32"
    attention: str = "standard"


def compare_backends(model: str, *, onnx_path: Path | None = None, backends="torch,onnxruntime,tensorrt",
                     policies=None, steps_per_policy: int = DEFAULT_STEPS_PER_POLICY, max_feeds: int | None = None,
                     seed: int = 0, rtol=(), atol=(), load_inputs: Path | None = None, save_inputs: Path | None = None,
                     save_outputs: Path | None = None, dtype: str = "float32", attention: str = "standard",
                     verbose: bool = False, log: Callable[[str], None] = print) -> CompareReport:
    """Run the named backends on the same step inputs and compare each with the first, output by output.
    Without `onnx_path` the checkpoint is exported to a temporary directory first (when a graph is needed)."""
    from dlmtrt.models.loading import load
    from dlmtrt.runtime.backends import backend_class

    from .trajectory import load_feeds

    names = check_backends(backends)
    kinds = {b: backend_class(b).polygraphy_runner for b in names}
    policies = _check_options(model, policies, save_inputs, save_outputs)
    loaded = load_feeds(load_inputs) if load_inputs is not None else None  # a bad file fails before any work
    t0 = time.perf_counter()
    log(f"loading {model} (fp32)")
    m, tok, ck = load(model, dtype="float32", device="cpu")
    n_layers = ck.args.num_layers
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # Polygraphy logs to stdout: keep it for tables
        graph = _Graph()
        if set(GRAPH_RUNNERS) & set(kinds.values()):
            graph = _step_graph(model, ck, onnx_path, dtype, attention, stack, log)
        rtols = parse_tolerances(rtol, n_layers, graph.dtype, "rtol")
        atols = parse_tolerances(atol, n_layers, graph.dtype, "atol")
        feeds = _step_inputs(m, tok, ck, loaded, load_inputs, save_inputs, policies, seed, steps_per_policy,
                             max_feeds, log)
        report = CompareReport(Path(str(ck.path)), len(feeds), names[0], names, graph.dtype, graph.attention)
        runners = _make_runners(kinds, m, graph, feeds, report, log)
        results, accuracy = _run_polygraphy(runners, feeds, rtols, atols, verbose, stack)
        if save_outputs is not None:
            _save_reference(results, runners[0].name, save_outputs, log)
            if kinds[runners[0].name] == "torch" and graph.attention == "standard" and onnx_path is not None:
                env, argv = polygraphy_run_command(
                    graph.path, save_outputs, rtols, atols, model=model, policies=policies,
                    steps_per_policy=steps_per_policy, seed=seed, max_feeds=max_feeds, feeds_file=load_inputs)
                report.polygraphy_command = shell_command(env, argv)

    ref_name = runners[0].name
    for runner in runners[1:]:
        report.rows += _output_rows(runner.name, ref_name, results, accuracy[0][(runner.name, ref_name)],
                                    n_layers, rtols, atols)
    report.seconds = time.perf_counter() - t0
    return report


def _check_options(model: str, policies, save_inputs: Path | None, save_outputs: Path | None) -> list[str]:
    """The policies to record with (the defaults when none are given), after checking them against the model's
    family and the output files against what already exists: before anything slow is started."""
    from dlmtrt.models.loading import open_checkpoint
    from dlmtrt.paths import check_output_file
    from dlmtrt.runtime.policies import parse_policy

    for path, what in ((save_inputs, "--save-inputs"), (save_outputs, "--save-outputs")):
        if path is not None:
            check_output_file(path, what)
    family = open_checkpoint(model).family
    policies = list(policies or default_policies(family))
    for p in policies:
        parse_policy(p).check(family, "low_confidence")
    return policies


def _step_graph(model: str, ck, onnx_path: Path | None, dtype: str, attention: str, stack: contextlib.ExitStack,
                log: Callable[[str], None]) -> _Graph:
    """The given export (a directory or its model.onnx), else a fresh one in a temporary directory that lives as
    long as `stack`; refused when it was exported from a model of another architecture."""
    from dlmtrt.runtime.artifacts import onnx_metadata, read_metadata

    if onnx_path is None:
        from dlmtrt.export.onnx_export import export_step
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dlmtrt-compare-")))
        onnx_file = export_step(model, tmp / "export", dtype=dtype, attention=attention, numeric_check=False,
                                log=log).onnx_path
    else:
        onnx_file = onnx_path / "model.onnx" if onnx_path.is_dir() else onnx_path
        if not onnx_file.is_file():
            raise UsageError(f"--onnx {onnx_path} holds no model.onnx")
    g_args, meta = read_metadata(onnx_metadata(onnx_file), onnx_file)
    if g_args.to_dict() != ck.args.to_dict():
        raise DlmtrtError(f"{onnx_file} was exported from {meta.get('source_path')}, whose "
                          f"architecture differs from {model}'s; pass the matching --model")
    return _Graph(onnx_file, meta.get("dtype", "float32"), meta.get("attention", "standard"))


def _step_inputs(m, tok, ck, loaded: list | None, load_inputs: Path | None, save_inputs: Path | None, policies,
                 seed: int, steps_per_policy: int, max_feeds: int | None, log: Callable[[str], None]) -> list:
    """The step inputs to compare on: those loaded from a file, else recorded from the PyTorch model's denoising
    trajectories; spread down to `max_feeds`, described in the log and saved when asked."""
    from dlmtrt.runtime.backends.torch_backend import TorchBackend

    from .trajectory import describe, record_feeds, save_feeds, spread

    if loaded is not None:
        feeds, source = loaded, str(load_inputs)
    else:
        log("recording denoising trajectories")
        feeds = record_feeds(TorchBackend(m), tok, ck, policies=policies, seed=seed,
                             steps_per_policy=steps_per_policy or None, log=log)
        source = f"policies {', '.join(policies)}"
    feeds = spread(feeds, max_feeds)
    if not feeds:
        raise UsageError("no step inputs to compare (--max-feeds 0 or an empty --load-inputs)")
    cov = describe(feeds)
    log(f"{cov['feeds']} step inputs ({source}): {cov['partial_active']} with partial active rows, "
        f"{cov['with_stable_rows']} with stable rows, {cov['padded']} left padded")
    if save_inputs is not None:
        save_feeds(save_inputs, feeds)
        log(f"step inputs: {save_inputs}")
    return feeds


def _make_runner(kind: str, name: str, m, graph: _Graph, feeds: list, log: Callable[[str], None]):
    """(runner, None), or (None, why it cannot run here), for a backend whose Polygraphy runner is `kind`."""
    if kind == "torch":
        return make_torch_runner(m, name=name), None
    if kind == "onnxruntime":
        return make_onnxrt_runner(graph.path, graph.attention, graph.dtype, name=name), None
    if kind == "tensorrt":
        return make_tensorrt_runner(graph.path, feeds, name=name, log=log)
    raise ValueError(f"backend {name!r} declares an unknown Polygraphy runner {kind!r}")


def _make_runners(kinds: dict[str, str], m, graph: _Graph, feeds: list, report: CompareReport,
                  log: Callable[[str], None]) -> list:
    """The runners of the backends that can run here, in order; the others go to `report.skipped` with their
    reason, and fewer than two runners is an error. The first one is the report's reference."""
    runners = []
    for name, kind in kinds.items():
        r, why = _make_runner(kind, name, m, graph, feeds, log)
        if r is None:
            report.skipped[name] = why
        else:
            runners.append(r)
    if len(runners) < 2:
        raise DlmtrtError(f"nothing to compare: only {runners[0].name if runners else 'no backend'} can run "
                          f"here (skipped: {', '.join(report.skipped)})")
    report.reference = runners[0].name
    return runners


def _run_polygraphy(runners: list, feeds: list, rtols: OrderedDict, atols: OrderedDict, verbose: bool,
                    stack: contextlib.ExitStack):
    """(results, accuracy) of Polygraphy's Comparator: every runner on every feed, each compared with the first.
    Polygraphy's logging stays quiet (unless `verbose`) until `stack` closes."""
    from polygraphy.comparator import Comparator
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER
    severity = G_LOGGER.module_severity
    stack.callback(setattr, G_LOGGER, "module_severity", severity)
    # Polygraphy says PASSED for every output of every step at FINISH; our table is the summary
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR
    func = SimpleCompareFunc(rtol=dict(rtols), atol=dict(atols), check_error_stat="elemwise")
    pairs = [(i, 0) for i in range(1, len(runners))]
    try:
        results = Comparator.run(runners, data_loader=feeds)
        with np.errstate(divide="ignore", invalid="ignore"):  # relative error of boolean present_valid: 0/0
            accuracy = Comparator.compare_accuracy(results, comparisons=pairs, compare_func=func)
    except PolygraphyException as e:
        raise DlmtrtError(f"Polygraphy failed: {str(e).strip().splitlines()[0]}") from None
    return results, accuracy


def _save_reference(results, ref_name: str, path: Path, log: Callable[[str], None]) -> None:
    """The reference runner's outputs in Polygraphy's format, for `polygraphy run --load-outputs`."""
    from polygraphy.comparator import RunResults
    ref = RunResults()
    ref.append((ref_name, results[ref_name]))
    ref.save(str(path))
    log(f"{ref_name} outputs: {path}")


def _output_rows(name: str, ref_name: str, results, per_iter, n_layers: int, rtols: OrderedDict,
                 atols: OrderedDict) -> list[OutputResult]:
    """One row per output of the step graph for runner `name` against the reference, from Polygraphy's
    per-iteration accuracy results `per_iter`."""
    rows = []
    for out_name in output_names(n_layers):
        rs = [it[out_name] for it in per_iter if out_name in it]
        worst_abs, worst_rel = (_worst(rs, f) for f in ("max_absdiff", "max_reldiff"))
        rows.append(OutputResult(name, out_name, sum(bool(r) for r in rs), len(rs), worst_abs, worst_rel,
                                 _worst_rel_l2(results[name], results[ref_name], out_name),
                                 atols[out_name], rtols[out_name]))
    return rows


def _worst(rs: list, stat: str) -> float:
    """The largest `stat` over the iterations, NaN when none has one: the relative error of a boolean is 0/0
    where both are False."""
    v = np.array([getattr(r, stat, np.nan) for r in rs], dtype=float)
    return float(np.nanmax(v)) if (~np.isnan(v)).any() else np.nan


def _worst_rel_l2(got_iters, ref_iters, out_name: str) -> float:
    """The largest relative L2 error of output `out_name` over the iterations (inf where the shapes differ)."""
    l2 = 0.0
    for k in range(len(got_iters)):
        got = np.asarray(got_iters[k][out_name], dtype=np.float64)
        ref = np.asarray(ref_iters[k][out_name], dtype=np.float64)
        l2 = max(l2, float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
                 if got.shape == ref.shape else np.inf)
    return l2
