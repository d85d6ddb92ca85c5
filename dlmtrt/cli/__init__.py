"""The `dlmtrt` command line (also `python cli.py` in a source checkout): one small file per command, each
calling library functions."""
from __future__ import annotations

import click

from dlmtrt import __version__

from .bench import bench_cmd
from .bicache_profile import bicache_profile_cmd
from .build_engine import build_engine_cmd
from .calibrate import calibrate_cmd
from .compare import compare_cmd
from .eval import eval_cmd
from .export import export_cmd
from .generate import generate
from .make_tiny import make_tiny_cmd
from .serve import serve_cmd, serve_trt_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dlmtrt")
def main():
    """Deploy diffusion language models (Dream, LLaDA): checkpoints, generation, export, engines.

    \b
    Quick start (CPU, no downloads):
      dlmtrt make-tiny --arch dream --out tiny/dream
      dlmtrt generate --model tiny/dream --prompt "Hello" --chat
    (in a source checkout `python cli.py` is the same as `dlmtrt`)
    """


for _cmd in (make_tiny_cmd, generate, calibrate_cmd, export_cmd, build_engine_cmd, eval_cmd, compare_cmd, bench_cmd,
             bicache_profile_cmd, serve_cmd, serve_trt_cmd):
    main.add_command(_cmd)
