"""Polygraphy glue: the data-loader script for `polygraphy run`, and the runners and tolerances of `cli.py compare`.

Compare backends on step inputs from a real denoising trajectory (export/trajectory.py), with Polygraphy:

    python cli.py export -m tiny-dream-tasks -o out/dream-onnx
    python cli.py compare -m tiny-dream-tasks --onnx out/dream-onnx --save-outputs torch_outputs.json

runs the PyTorch fp32 model and ONNX Runtime (and TensorRT where it can run) on the same step inputs, compares
every output with its own tolerance, saves the PyTorch outputs and prints the equivalent Polygraphy command
line, which uses this file as its data loader. For a float32 graph, with the default policies (verified with
polygraphy 0.53.6 and ONNX Runtime on the CPU; `polygraphy` is .venv/bin/polygraphy):

    DLMTRT_MODEL=tiny-dream-tasks DLMTRT_POLICIES='none;decode;dual+parallel' \
    polygraphy run out/dream-onnx/model.onnx --onnxrt \
        --data-loader-script export/polygraphy_data.py:load_data \
        --load-outputs torch_outputs.json \
        --rtol 1e-3 present_valid:0 --atol 1e-4 logits:1e-3 present_valid:0

Polygraphy's --rtol/--atol take one list each: the bare value is the default, `NAME:VALUE` sets one output
(repeating the flag replaces the list). `load_data` yields the same step inputs as `cli.py compare` with the
same model, policies, steps, seed and cap: the trajectory is greedy and recomputed in fp32 on the CPU. To
replay exactly the inputs a `compare` run used (another machine, a GPU), save them with
`compare --save-inputs feeds.json` and set DLMTRT_FEEDS=feeds.json instead of DLMTRT_MODEL (or give
polygraphy `--load-inputs feeds.json` and no data loader).

Environment of `load_data`:
    DLMTRT_MODEL              checkpoint directory, alias or cached repo id whose trajectory gives the inputs
    DLMTRT_FEEDS              a feeds file (`compare --save-inputs`) to replay instead of DLMTRT_MODEL
    DLMTRT_POLICIES           cache policies, separated by ';' [none;decode;dual+parallel]
    DLMTRT_STEPS_PER_POLICY   steps kept per policy, evenly spaced over its trajectory [6]; 0 keeps all
    DLMTRT_MAX_FEEDS          cap on the number of feeds yielded, evenly spaced over them [none]
    DLMTRT_SEED               seed of the task problems and of the RNG [0]

Plugin-attention graphs (`--attention plugin`) hold `dlmtrt::CachedAttention` nodes that ONNX Runtime cannot
run; `cli.py compare` gives them their reference function (export/attention.py `with_reference`), Polygraphy's
`--onnxrt` cannot: compare a standard export with it.
"""
from __future__ import annotations

import os
import sys
from collections import OrderedDict
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _ensure_root_on_path() -> None:
    """Polygraphy imports this file as a script: it puts export/ first on sys.path and afterwards deletes
    sys.path[0], whatever is there then; the repository root must be importable when load_data runs."""
    if str(_ROOT) not in sys.path:
        sys.path.insert(1 if sys.path and Path(sys.path[0]).resolve() == _ROOT / "export" else 0, str(_ROOT))


_ensure_root_on_path()

from export.step_graph import input_names, output_kind, output_names  # noqa: E402
from export.trajectory import (DEFAULT_POLICIES, DEFAULT_STEPS_PER_POLICY, load_feeds, spread,  # noqa: E402
                               trajectory_feeds)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
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


# ----------------------------------------------------------------------------------------------------------
# the data loader script


def split_policies(text: str | None) -> list[str]:
    """'none;decode;dual+parallel' -> list (';' because policy options use ',')."""
    if not text or not text.strip():
        return list(DEFAULT_POLICIES)
    return [p.strip() for p in text.replace("\n", ";").split(";") if p.strip()]


def _env_int(env, name: str, default: int | None) -> int | None:
    v = env.get(name, "").strip()
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} must be an integer") from None


def feeds_from_env(env=None) -> list[OrderedDict]:
    """The feeds `load_data` yields, as configured by the DLMTRT_* environment variables."""
    _ensure_root_on_path()
    env = os.environ if env is None else env
    max_feeds = _env_int(env, "DLMTRT_MAX_FEEDS", None)
    if env.get("DLMTRT_FEEDS"):
        feeds = load_feeds(env["DLMTRT_FEEDS"])
    elif env.get("DLMTRT_MODEL"):
        steps = _env_int(env, "DLMTRT_STEPS_PER_POLICY", DEFAULT_STEPS_PER_POLICY)
        feeds = trajectory_feeds(env["DLMTRT_MODEL"], policies=split_policies(env.get("DLMTRT_POLICIES")),
                                 steps_per_policy=steps or None, seed=_env_int(env, "DLMTRT_SEED", 0))
    else:
        raise ValueError("set DLMTRT_MODEL to the checkpoint whose denoising trajectory gives the step inputs "
                         "(or DLMTRT_FEEDS to a file written by `cli.py compare --save-inputs`)")
    return spread(feeds, max_feeds)


def load_data():
    """Polygraphy data loader: `--data-loader-script export/polygraphy_data.py:load_data`."""
    yield from feeds_from_env()


# ----------------------------------------------------------------------------------------------------------
# runners and tolerances for `cli.py compare`


def make_torch_runner(model, name: str = "torch"):
    """A Polygraphy runner over the PyTorch step graph (export/step_graph.py StepGraph) of `model`.

    Polygraphy 0.53.6's PytRunner moves every input to CUDA and returns (outputs, time) where the runner
    protocol wants the outputs (and `inference_time` set); this one keeps the inputs on the model's device and
    follows the protocol."""
    import numpy as np
    import torch
    from polygraphy.backend.pyt import PytRunner
    from polygraphy.common import TensorMetadata

    from export.step_graph import StepGraph

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
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype

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
    """ONNX Runtime (CPU) over the exported graph, through export/checks.py `session_for_check`: a plugin graph
    gets its reference attention function and bf16 is widened to fp32 (no CPU bf16 kernels), external data
    (graphs over 2 GiB) included."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from export.checks import session_for_check
    return OnnxrtRunner(lambda: session_for_check(Path(path), attention, dtype), name=name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def make_tensorrt_runner(path: Path, feeds: list, name: str = "tensorrt"):
    """(runner, None) when a TensorRT engine of `path` builds and runs one feed here, else (None, reason)."""
    import importlib.util
    if importlib.util.find_spec("tensorrt") is not None:
        rtx = False
    elif importlib.util.find_spec("tensorrt_rtx") is not None:
        rtx = True
    else:
        return None, "neither the tensorrt nor the tensorrt_rtx Python package is installed"
    import torch
    if not torch.cuda.is_available():
        return None, "no CUDA GPU is visible (TensorRT engines run on NVIDIA GPUs)"
    try:
        from polygraphy import config
        if "polygraphy.backend.trt" not in sys.modules:
            config.USE_TENSORRT_RTX = rtx
        from polygraphy.backend.trt import (CreateConfig, NetworkFromOnnxPath, Profile, TrtRunner,
                                            engine_from_network)
        profile = Profile()
        for n in feeds[0]:
            shapes = [f[n].shape for f in feeds]
            lo = tuple(min(s[d] for s in shapes) for d in range(len(shapes[0])))
            hi = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
            profile.add(n, min=lo, opt=hi, max=hi)
        engine = engine_from_network(NetworkFromOnnxPath(str(path), strongly_typed=True),
                                     config=CreateConfig(profiles=[profile]))
        with TrtRunner(engine, name=name) as probe:
            probe.infer(feeds[0])
        return TrtRunner(engine, name=name), None
    except BaseException as e:  # Polygraphy reports failures as PolygraphyException (or SystemExit)
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, f"{'tensorrt_rtx' if rtx else 'tensorrt'} cannot build or run the engine: {_first_line(e)}"


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
            raise ValueError(f"--{what} {spec!r}: expected VALUE or OUTPUT:VALUE, for example --{what} "
                             f"logits:1e-3") from None
        if v < 0:
            raise ValueError(f"--{what} {spec!r}: a tolerance must be >= 0")
        if not sep:
            targets = names
        elif key in OUTPUT_KINDS:
            targets = [n for n in names if output_kind(n) == key]
        elif key in names:
            targets = [key]
        else:
            raise ValueError(f"--{what} {spec!r}: unknown output {key!r}; use one of {', '.join(OUTPUT_KINDS)} "
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
    """(environment, argv) of the `polygraphy run` that repeats a `cli.py compare` against its saved outputs:
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
    script = Path(__file__).resolve()
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    argv = ["polygraphy", "run", str(onnx_file), "--onnxrt", "--data-loader-script", f"{script}:load_data",
            "--load-outputs", str(outputs_file), "--rtol", *_compact(rtols), "--atol", *_compact(atols)]
    return env, argv


def shell_command(env: dict, argv: list[str]) -> str:
    import shlex
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])
