"""`dlmtrt build-engine`: an export directory to a serialized TensorRT engine and its manifest."""
from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ._common import console, friendly_errors, out, output_file

PRECISION_CHOICES = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


def _check_profiles(ctx, param, value):
    from dlmtrt.engine.build import AXES, parse_profile
    from dlmtrt.errors import UsageError
    for spec in value:
        try:
            parse_profile(spec, {a: (1, 1, 1) for a in AXES})
        except UsageError as e:
            raise click.BadParameter(str(e).removeprefix(f"--profile {spec!r}: "), param_hint=f"--profile {spec!r}")
    return value


class _BuildProgress:
    """TensorRT's progress-monitor events as rich progress bars: parsing, then each top-level builder phase
    (its current sub-phase in the description)."""

    def __init__(self, progress: Progress):
        self.p = progress
        self.parse = None
        self.top: dict[str, int] = {}
        self.parents: dict[str, str] = {}

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "parse_start":
            self.parse = self.p.add_task("parsing the ONNX graph", total=1)
        elif kind == "parse_finish" and self.parse is not None:
            self.p.update(self.parse, completed=1)
        elif kind == "phase_start":
            name, parent = ev["phase"], ev.get("parent")
            if parent is None:
                self.top[name] = self.p.add_task(name, total=max(1, ev.get("steps", 1)))
            else:
                self.parents[name] = parent
                root = self._root(name)
                if root in self.top:
                    self.p.update(self.top[root], description=f"{root} · {name}")
        elif kind == "step" and ev.get("phase") in self.top:
            self.p.update(self.top[ev["phase"]], completed=ev["step"] + 1)
        elif kind == "phase_finish" and ev.get("phase") in self.top:
            task = self.top[ev["phase"]]
            self.p.update(task, description=ev["phase"], completed=self.p.tasks[task].total)

    def _root(self, name: str) -> str:
        while name in self.parents:
            name = self.parents[name]
        return name


@click.command("build-engine")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path),
              help="Export directory written by `dlmtrt export` (or its model.onnx).")
@click.option("--out", "-o", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Engine file to write; the manifest goes beside it as OUT.json.")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default=None,
              help="Must be the export's dtype (the network is strongly typed: the graph's types are the "
                   "engine's) [default: the export's].")
@click.option("--profile", "profiles", multiple=True, callback=_check_profiles, metavar="AXIS=MIN:OPT:MAX,...",
              help="One optimization profile over the dynamic axes batch, active (rows computed per step) and "
                   "canvas, e.g. batch=1:1:8,active=1:32:512,canvas=1:512:512; an axis left out keeps its "
                   "default, N alone means N:N:N; repeat for several profiles [default: batch=1:1:8, "
                   "active=1:32:C, canvas=1:512:C with C = min(max positions, 2048)].")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, callback=output_file(),
              help="Timing cache file: read when it exists, written back after the build.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only once the new engine is built).")
@friendly_errors
def build_engine_cmd(onnx_dir, out_file, precision, profiles, timing_cache, overwrite):
    """Build a TensorRT engine of an exported step graph (TensorRT, else TensorRT-RTX, which builds on the CPU).

    \b
    A graph exported with --attention plugin gets the dlmtrt CachedAttention plugin (dlmtrt/plugins/trt_plugin.py).
      dlmtrt export -m tiny-dream-tasks -o out/dream-onnx --attention plugin
      dlmtrt build-engine --onnx out/dream-onnx --out out/dream.engine
    """
    from dlmtrt.engine.build import build_engine

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    with progress:
        res = build_engine(onnx_dir, out_file, precision=precision, profiles=profiles, timing_cache=timing_cache,
                           overwrite=overwrite, events=_BuildProgress(progress))
    m = res.manifest
    t = Table(title=f"build-engine · {res.engine_path}", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("engine", f"{m['engine']['bytes'] / 2**20:.2f} MiB, sha256 {m['engine']['sha256'][:16]}…")
    t.add_row("TensorRT", f"{m['tensorrt']['flavour']} {m['tensorrt']['version']}, built {m['tensorrt']['built']}")
    t.add_row("precision", f"{m['precision']} (strongly typed)")
    for k, p in enumerate(m["profiles"]):
        t.add_row(f"profile {k}", ", ".join(f"{a}={':'.join(map(str, v))}" for a, v in p["axes"].items()))
    t.add_row("IO", f"{len(m['inputs'])} inputs, {len(m['outputs'])} outputs")
    layers = m["layers"]
    t.add_row("layers", f"{layers['network']} in the network, {layers['engine']} in the engine")
    if m["plugin"]:
        pl = m["plugin"]
        lib = pl["library_sha256"][:16] + "…" if pl["library_sha256"] else "[yellow]not built (make plugin)[/]"
        t.add_row("plugin", f"CachedAttention: {pl['onnx_nodes']} nodes, {len(pl['engine_layers'])} engine layers; "
                            f"kernel library {lib}")
    else:
        t.add_row("plugin", "none (standard attention)")
    tc = m["timing_cache"]
    if tc:
        t.add_row("timing cache", f"{tc['path']} ({'reused' if tc['reused'] else 'new'}, {tc['bytes_after']} bytes)"
                  + (f"; {tc['note']}" if tc.get("note") else ""))
    t.add_row("manifest", str(res.manifest_path))
    s = m["seconds"]
    t.add_row("time", f"{s['total']:.1f} s (parse {s['parse']:.1f} s, build {s['build']:.1f} s, "
                      f"hash {s['hash']:.1f} s)")
    out.print(t)
