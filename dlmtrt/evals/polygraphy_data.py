"""Polygraphy glue: the data-loader script for `polygraphy run`, which replays the step inputs of `dlmtrt compare`
(runners, tolerances and the comparison itself: dlmtrt/evals/compare.py).

Compare backends on step inputs from a real denoising trajectory (dlmtrt/evals/trajectory.py), with Polygraphy:

    dlmtrt export -m tiny-dream-tasks -o out/dream-onnx
    dlmtrt compare -m tiny-dream-tasks --onnx out/dream-onnx --save-outputs torch_outputs.json

runs the PyTorch fp32 model and ONNX Runtime (and TensorRT where it can run) on the same step inputs, compares
every output with its own tolerance, saves the PyTorch outputs and prints the equivalent Polygraphy command
line, which uses this file as its data loader. For a float32 graph, with the default policies (verified with
polygraphy 0.53.6 and ONNX Runtime on the CPU; `polygraphy` is .venv/bin/polygraphy):

    DLMTRT_MODEL=tiny-dream-tasks DLMTRT_POLICIES='none;decode;dual+parallel' \
    polygraphy run out/dream-onnx/model.onnx --onnxrt \
        --data-loader-script "$(dlmtrt compare --data-loader-path)" \
        --load-outputs torch_outputs.json \
        --rtol 1e-3 present_valid:0 --atol 1e-4 logits:1e-3 present_valid:0

Polygraphy's --rtol/--atol take one list each: the bare value is the default, `NAME:VALUE` sets one output
(repeating the flag replaces the list). `load_data` yields the same step inputs as `dlmtrt compare` with the
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
run; `dlmtrt compare` gives them their reference function (dlmtrt/export/attention.py `with_reference`), Polygraphy's
`--onnxrt` cannot: compare a standard export with it.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

from dlmtrt.errors import UsageError

# Imported lazily (the trajectory code needs torch) so that `dlmtrt compare --data-loader-path` stays instant.


def data_loader_script() -> str:
    """`polygraphy run --data-loader-script` for this installation: this file's absolute path, so that the
    command works from any directory (`dlmtrt compare --data-loader-path` prints it)."""
    return f"{Path(__file__).resolve()}:load_data"


def split_policies(text: str | None) -> list[str]:
    """'none;decode;dual+parallel' -> list (';' because policy options use ',')."""
    from dlmtrt.evals.trajectory import DEFAULT_POLICIES
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
        raise UsageError(f"{name}={v!r} must be an integer") from None


def feeds_from_env(env=None) -> list[OrderedDict]:
    """The feeds `load_data` yields, as configured by the DLMTRT_* environment variables."""
    from dlmtrt.evals.trajectory import DEFAULT_STEPS_PER_POLICY, load_feeds, spread, trajectory_feeds
    env = os.environ if env is None else env
    max_feeds = _env_int(env, "DLMTRT_MAX_FEEDS", None)
    if env.get("DLMTRT_FEEDS"):
        feeds = load_feeds(env["DLMTRT_FEEDS"])
    elif env.get("DLMTRT_MODEL"):
        steps = _env_int(env, "DLMTRT_STEPS_PER_POLICY", DEFAULT_STEPS_PER_POLICY)
        feeds = trajectory_feeds(env["DLMTRT_MODEL"], policies=split_policies(env.get("DLMTRT_POLICIES")),
                                 steps_per_policy=steps or None, seed=_env_int(env, "DLMTRT_SEED", 0))
    else:
        raise UsageError("set DLMTRT_MODEL to the checkpoint whose denoising trajectory gives the step inputs "
                         "(or DLMTRT_FEEDS to a file written by `dlmtrt compare --save-inputs`)")
    return spread(feeds, max_feeds)


def load_data():
    """Polygraphy data loader: `--data-loader-script "$(dlmtrt compare --data-loader-path)"`."""
    yield from feeds_from_env()
