"""Peak resident memory and time of `cli.py export` on a Dream-7B-shaped checkpoint (issue 5, "Scale").

Why: the exporter promises that a 7B checkpoint exports on a 24 GB machine. It traces the step graph on the
meta device and gives every initializer a lazy tensor that reads its weight from the safetensors shard only
while `onnx_ir.save` writes the file, so its peak RSS should stay far below the weight bytes. Nothing else
checks that promise at the real shapes; this benchmark does, and verifies what was written.

What it does, per preset:
  1. writes a random bf16 checkpoint with the real Dream-v0-Instruct-7B config (hidden 3584, intermediate 18944,
     28 layers, 28 heads / 4 kv heads of 128, vocab 152064, rope_theta 1e6, eps 1e-6, qkv bias, untied head) to
     a temp dir, in a child process that streams each tensor into its safetensors shard
     (`models.tiny.stream_checkpoint`: one fp32 chunk of at most 64 MiB in memory at a time, where the
     project's `save_checkpoint` needs the whole state dict in memory).
     The tokenizer is the tiny byte-level one of `models.tiny`; the config's special ids (mask, eos, pad,
     bos) are moved to its ids so that the exporter's tokenizer checks pass. Shapes are untouched.
  2. exports it in a fresh interpreter (`export_step`, what `cli.py export` calls) and measures there: VmHWM
     (the kernel's high-water mark of resident memory, = ru_maxrss of a fresh mm) against the baselines
     after `import torch` and after importing the exporter; a sampler thread (`evals.memory.RssSampler`)
     splits the sampled peak into anonymous and file-backed pages and attributes peaks to the export's
     stages (trace, write, structure_check, numeric_check) via its log callback. The parent's own size
     cannot leak into VmHWM.
     The numeric check (fp32 reference + ONNX Runtime) runs only where it fits in RAM (`--numeric-check auto`).
  3. verifies the export: model.onnx (+ model.onnx.data), the data file's size against the weight bytes and
     the external-data records, and 4 initializers (embedding, lm_head, a middle down_proj, the last k_proj
     bias) read back from the written file are bit-identical to the checkpoint tensors in the export dtype.

    python -m bench.export_memory --preset tiny      # seconds
    python -m bench.export_memory --preset 1b        # 2.2 GB weights, ~3.5 minutes with the numeric check
    nice -n 5 python -m bench.export_memory          # 7b: 15.2 GB weights, ~31 GB of disk, ~6 minutes

Results go to bench/results/export_memory-<preset>[-<dtype>].json.
"""
from __future__ import annotations

import json
import os
import platform
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

from dlmtrt.evals.memory import RssSampler, proc_status

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
MiB, GiB = 2 ** 20, 2 ** 30
EVENT = "@@export_memory "  # prefix of the JSON event lines a child prints on stdout
CHUNK_ELEMS = 16 * 2 ** 20  # fp32 elements drawn at once while writing a tensor (64 MiB)

# Dream-layout sizes. 7b: Dream-v0-Instruct-7B (models.tiny.shaped_like). 1b: bench/load_memory.py's sizes with 11
# layers, the fewest whose bf16 weights (2.06 GiB) exceed the exporter's 2 GiB external-data threshold, so that it
# takes the same path as 7b. tiny: models.tiny's default sizes with the tiny tokenizer's vocabulary; its export is
# forced to external data (threshold 0) so that the side file and its read-back are exercised in seconds.
PRESETS = {
    "7b": dict(sizes={}, shard_bytes=4 * 10 ** 9, force_external=False),
    "1b": dict(sizes=dict(hidden_size=2048, intermediate_size=5632, num_heads=16, num_kv_heads=2, head_dim=128,
                          num_layers=11, max_position_embeddings=32768), shard_bytes=10 ** 9, force_external=False),
    "tiny": dict(sizes=dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                            num_layers=2, max_position_embeddings=2048, vocab_size=264), shard_bytes=100_000,
                 force_external=True),
}


def emit(kind: str, **data) -> None:
    print(EVENT + json.dumps({"event": kind, **data}), flush=True)


# ------------------------------------------------------------------------------------------- the checkpoint

def preset_args(preset: str):
    """ModelArgs of the preset, with the special ids of the tiny tokenizer that is shipped with it."""
    from dlmtrt.models.tiny import build_tokenizer, shaped_like, token_ids
    tok = build_tokenizer("dream")
    ids = token_ids("dream", tok)
    args = shaped_like("dream-7b", mask_token_id=ids["mask"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                       bos_token_id=ids["eos"], **PRESETS[preset]["sizes"])  # Dream's bos is its eos
    return args, tok


def _fill(name: str, shape, args, g, chunk):
    """Yield the tensor's values in fp32 row chunks with models.tiny.random_state_dict's initialisation."""
    import math

    from dlmtrt.models.tiny import init_random_
    numel = math.prod(shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else numel
    assert row <= CHUNK_ELEMS, f"{name}: rows of {row} elements exceed the {CHUNK_ELEMS}-element chunk"
    rows_per = max(1, CHUNK_ELEMS // row)
    for i in range(0, numel // row, rows_per):
        n = min(rows_per, numel // row - i) * row
        yield init_random_(name, chunk[:n].normal_(generator=g), args)


def write_checkpoint(out: Path, preset: str, seed: int = 0) -> dict:
    """Stream a random bf16 checkpoint of the preset into `out` (HF layout: sharded safetensors + index, config,
    generation config, tokenizer) with models.tiny.stream_checkpoint. Tensors are drawn and written one fp32
    chunk at a time, never held whole."""
    import torch

    from dlmtrt.models.tiny import stream_checkpoint
    args, tok = preset_args(preset)
    total = args.param_count * 2
    chunk = torch.empty(CHUNK_ELEMS)
    bf = torch.empty(CHUNK_ELEMS, dtype=torch.bfloat16)
    g = torch.Generator()
    seen: dict[str, int] = {}
    done = 0

    def chunks(name: str, shape):
        nonlocal done
        g.manual_seed(seed * 1_000_003 + seen.setdefault(name, len(seen)))  # one seed per tensor, in order
        for t in _fill(name, shape, args, g, chunk):
            b = bf[: t.numel()]
            b.copy_(t)
            yield b
            done += b.numel() * 2  # written by now
            emit("progress", done=done)

    t0 = time.perf_counter()
    emit("start", total=total, params=args.param_count)
    stream_checkpoint(out, args, chunks, torch.bfloat16, tok, max_shard_bytes=PRESETS[preset]["shard_bytes"])
    return {"params": args.param_count, "weight_bytes": total, "shards": len(list(out.glob("*.safetensors"))),
            "make_s": time.perf_counter() - t0,
            "make_peak_rss": proc_status()["VmHWM"], "config": args.to_dict()}


# ------------------------------------------------------------------------------------------------ the export

STAGES = (("tracing", "trace"), ("writing", "write"), ("checking: onnx.checker", "structure_check"),
          ("checking: ONNX Runtime", "numeric_check"))


def export_child(ckpt: Path, out: Path, dtype: str, numeric_check: bool, force_external: bool) -> dict:
    """Runs in a fresh interpreter: export `ckpt` with export_step and measure this process."""
    s_python = proc_status()
    import torch
    s_torch = proc_status()
    import onnx  # noqa: F401
    import onnx_ir  # noqa: F401
    import onnxscript  # noqa: F401

    import dlmtrt.export.checks  # noqa: F401
    import dlmtrt.export.onnx_export as oe
    s_base = proc_status()
    if force_external:
        oe.EXTERNAL_DATA_BYTES = 0  # tiny preset: take the side-file path that 7b takes
    sampler = RssSampler(period_s=0.01)
    sampler.start()

    def log(msg: str) -> None:
        stage = next((s for prefix, s in STAGES if msg.startswith(prefix)), None)
        if stage:
            sampler.set_stage(stage)
        emit("stage", stage=stage or "log", message=msg)

    t0 = time.perf_counter()
    res = oe.export_step(str(ckpt), out, dtype=dtype, numeric_check=numeric_check, log=log)
    export_s = time.perf_counter() - t0
    stages = sampler.finish()
    end = proc_status()
    return {
        "export_s": export_s, "stage_seconds": res.seconds, "weight_bytes": res.weight_bytes,
        "external_data": res.data_path is not None, "structure_check": "passed",
        "numeric_check": None if res.checks is None else {
            "ok": res.checks.ok, "worst": {k: {"case": r.case, "rel_err": r.rel_err, "tol": r.tol}
                                           for k, r in res.checks.worst().items()}},
        "rss_python": s_python["VmRSS"], "rss_after_torch": s_torch["VmRSS"], "baseline_rss": s_base["VmRSS"],
        "peak_rss": end["VmHWM"], "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "end_rss": end["VmRSS"], "stages": stages, "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------- child process plumbing

def run_child(argv: list[str], on_event=None, poll=None, log_path: Path | None = None) -> dict:
    """Run this module in a fresh interpreter; relay its events; return its result event. `poll` is called about
    four times a second while it runs (progress from file sizes)."""
    err = open(log_path, "w+") if log_path else tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "bench.export_memory", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=err, text=True, bufsize=1)
    events: queue.Queue = queue.Queue()

    def reader():
        for line in proc.stdout:
            if line.startswith(EVENT):
                events.put(json.loads(line[len(EVENT):]))
        events.put(None)

    threading.Thread(target=reader, daemon=True).start()
    result, finished = None, False
    while not finished:
        try:
            ev = events.get(timeout=0.25)
        except queue.Empty:
            ev = ...
        if ev is None:
            finished = True
        elif ev is not ...:
            if ev["event"] == "result":
                result = ev["data"]
            elif on_event:
                on_event(ev)
        if poll:
            poll()
    rc = proc.wait()
    err.seek(0)
    tail = err.read()[-6000:]
    err.close()
    if rc or result is None:
        raise RuntimeError(f"child {' '.join(argv)} failed (exit {rc}):\n{tail}")
    return result


def _dir_bytes(d: Path) -> int:
    n = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                n += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return n


# ------------------------------------------------------------------------------------------------ verification

def _initializer_bytes(t, onnx_dir: Path) -> bytes | memoryview:
    """Raw little-endian bytes of an initializer, from the external data file (memmap at the recorded offset)
    or from the proto."""
    import numpy as np
    from onnx import TensorProto, numpy_helper
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        mm = np.memmap(onnx_dir / info["location"], dtype=np.uint8, mode="r", offset=int(info.get("offset", 0)),
                       shape=(int(info["length"]),))
        return memoryview(mm)
    if t.raw_data:
        return t.raw_data
    return numpy_helper.to_array(t).tobytes()


def verify(export_dir: Path, ckpt: Path, dtype: str, weight_bytes: int, expect_external: bool) -> dict:
    """Files present, data file size against the weight bytes and the external records, and 4 initializers read
    back from the written file bit-identical to the checkpoint's tensors converted to the export dtype."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto

    from dlmtrt.dtypes import DTYPES
    from dlmtrt.export.onnx_export import DATA_FILE, ONNX_FILE
    from dlmtrt.models.loading import open_checkpoint, read_tensor, tensor_index
    t0 = time.perf_counter()
    onnx_path, data_path = export_dir / ONNX_FILE, export_dir / DATA_FILE
    files = sorted(p.name for p in export_dir.iterdir())
    m = onnx.load(str(onnx_path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    ext = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    ext_len = sum(int({e.key: e.value for e in t.external_data}["length"]) for t in ext)
    ext_end = max((int({e.key: e.value for e in t.external_data}.get("offset", 0))
                   + int({e.key: e.value for e in t.external_data}["length"]) for t in ext), default=0)
    data_size = data_path.stat().st_size if data_path.exists() else 0
    ck = open_checkpoint(str(ckpt))
    index = tensor_index(ck)
    L = ck.args.num_layers
    names = ["model.embed_tokens.weight", "lm_head.weight", f"model.layers.{L // 2}.mlp.down_proj.weight",
             f"model.layers.{L - 1}.self_attn.k_proj.bias"]
    spot = []
    for name in names:
        t = inits.get(name)
        if t is None:
            spot.append({"name": name, "found": False, "equal": False})
            continue
        want = read_tensor(index[name], DTYPES[dtype]).contiguous()
        got = np.frombuffer(_initializer_bytes(t, export_dir), dtype=np.uint8)
        exp = want.view(torch.uint8).numpy().reshape(-1)
        spot.append({"name": name, "found": True, "external": t.data_location == TensorProto.EXTERNAL,
                     "shape": list(t.dims), "bytes": int(exp.size), "equal": bool(got.size == exp.size
                                                                                 and np.array_equal(got, exp))})
        del want, got, exp
    return {
        "files": files, "onnx_bytes": onnx_path.stat().st_size, "data_file": data_path.exists(),
        "data_bytes": data_size, "external_initializers": len(ext), "inline_initializers": len(inits) - len(ext),
        "external_length_sum": ext_len, "external_extent": ext_end,
        "data_minus_weight_bytes": data_size - weight_bytes,
        "data_matches_records": data_size == ext_end,
        "data_close_to_weights": (not expect_external) or abs(data_size - weight_bytes) <= max(1 << 20,
                                                                                              weight_bytes // 1000),
        "spot_checks": spot, "spot_checks_ok": all(s["equal"] for s in spot),
        "checker": "passed (onnx.checker full_check + strict shape inference inside export_step)",
        "verify_s": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ orchestration

def machine_info() -> dict:
    import onnx
    import onnx_ir
    import onnxscript
    import torch
    info = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "onnx": onnx.__version__, "onnx_ir": onnx_ir.__version__,
            "onnxscript": onnxscript.__version__}
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            info["ram_bytes"] = int(line.split()[1]) * 1024
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    return info


def numeric_check_fits(args, weight_bytes: int) -> bool:
    from dlmtrt.export.checks import available_memory, memory_needed
    return memory_needed(args, weight_bytes) <= available_memory()


def results_path(preset: str, dtype: str) -> Path:
    return RESULTS_DIR / (f"export_memory-{preset}.json" if dtype == "bfloat16" else
                          f"export_memory-{preset}-{dtype}.json")


def run_benchmark(preset: str = "7b", dtype: str = "bfloat16", workdir: Path | None = None, keep: bool = False,
                  numeric_check: str = "auto", out_json: Path | None = None, console=None) -> dict:
    """Create the checkpoint, export it in a child, verify; write and return the result dict."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
    console = console or Console(stderr=True)
    p = PRESETS[preset]
    args, _ = preset_args(preset)
    export_bytes = args.param_count * {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    run_numeric = {"on": True, "off": False}.get(numeric_check)
    reason = f"--numeric-check {numeric_check}"
    if run_numeric is None:
        run_numeric = numeric_check_fits(args, export_bytes)
        reason = "auto: " + ("its fp32 reference fits in available RAM" if run_numeric else
                             "its fp32 reference + ONNX Runtime copy would not fit in available RAM")
    tmp = Path(tempfile.mkdtemp(prefix=f"export_memory-{preset}.", dir=workdir))
    ckpt, export_dir = tmp / "ckpt", tmp / "export"
    t_all = time.perf_counter()
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                      TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console) as prog:
            task = prog.add_task(f"{preset}: checkpoint", total=None, note="")

            def on_make(ev):
                if ev["event"] == "start":
                    prog.update(task, total=ev["total"])
                elif ev["event"] == "progress":
                    prog.update(task, completed=ev["done"])

            t0 = time.perf_counter()
            made = run_child(["--child-make", str(ckpt), "--preset", preset], on_make, log_path=tmp / "make.log")
            made["wall_s"] = time.perf_counter() - t0
            prog.update(task, completed=made["weight_bytes"], note=f"{made['wall_s']:.0f} s")
            etask = prog.add_task(f"{preset}: export", total=export_bytes, note="starting")

            def on_export(ev):
                if ev["event"] == "stage":
                    prog.update(etask, note=ev["message"][:70])

            def poll():  # bytes written so far, from the exporter's temp dir beside export_dir
                prog.update(etask, completed=min(export_bytes, sum(_dir_bytes(d) for d in tmp.glob(".export.tmp-*"))))

            t0 = time.perf_counter()
            argv = ["--child-export", str(ckpt), "--export-dir", str(export_dir), "--dtype", dtype,
                    "--numeric-check", "on" if run_numeric else "off"] + (["--force-external"] if p["force_external"]
                                                                          else [])
            exp = run_child(argv, on_export, poll, log_path=tmp / "export.log")
            exp["wall_s"] = time.perf_counter() - t0
            prog.update(etask, completed=export_bytes, note=f"{exp['export_s']:.0f} s")
        console.log("verifying the export (files, data size, spot checks)")
        ver = verify(export_dir, ckpt, dtype, exp["weight_bytes"], p["force_external"] or exp["weight_bytes"] > 2 * GiB)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    wb = exp["weight_bytes"]
    pre_numeric = max((st["peak"] for name, st in exp["stages"].items() if name != "numeric_check"), default=0)
    result = {
        "command": "python -m bench.export_memory " + " ".join(sys.argv[1:]) if sys.argv[0].endswith(
            "export_memory.py") else f"run_benchmark(preset={preset!r}, dtype={dtype!r})",
        "preset": preset, "dtype": dtype, "numeric_check": run_numeric, "numeric_check_reason": reason,
        "kept": str(tmp) if keep else None,
        "checkpoint": {k: made[k] for k in ("params", "weight_bytes", "shards", "config")},
        "weight_bytes": wb, "weight_mib": wb / MiB,
        "times": {"checkpoint_s": made["wall_s"], "checkpoint_write_s": made["make_s"],
                  "export_process_s": exp["wall_s"], "export_step_s": exp["export_s"],
                  "export_stages_s": exp["stage_seconds"], "verify_s": ver["verify_s"],
                  "total_s": time.perf_counter() - t_all},
        "memory": {
            "peak_rss_mib": exp["peak_rss"] / MiB,
            "baseline_rss_mib": exp["baseline_rss"] / MiB,
            "rss_after_import_torch_mib": exp["rss_after_torch"] / MiB,
            "peak_minus_baseline_mib": (exp["peak_rss"] - exp["baseline_rss"]) / MiB,
            "ratio_peak_to_weights": exp["peak_rss"] / wb,
            "ratio_peak_minus_baseline_to_weights": (exp["peak_rss"] - exp["baseline_rss"]) / wb,
            "peak_before_numeric_check_mib": pre_numeric / MiB,
            "ratio_before_numeric_check": pre_numeric / wb,
            "stages": {k: {kk: (v / MiB if kk != "seconds" else v) for kk, v in st.items()}
                       for k, st in exp["stages"].items()},
            "checkpoint_writer_peak_rss_mib": made["make_peak_rss"] / MiB,
            "method": "VmHWM of the exporting interpreter (fresh process, parent size cannot leak in); baseline = "
                      "its VmRSS after importing torch, onnx, onnx_ir, onnxscript and export/; stage peaks from "
                      "VmHWM at the stage's end where it rose during the stage, else the largest 10 ms sample; "
                      "anon/file split from the sample",
        },
        "export": {k: exp[k] for k in ("external_data", "structure_check", "numeric_check", "torch_threads")},
        "verify": ver,
        "machine": machine_info(),
    }
    out_json = out_json or results_path(preset, dtype)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    result["json"] = str(out_json)
    return result


def report(r: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console(width=160)
    mem, times, ver = r["memory"], r["times"], r["verify"]
    t = Table(title=f"export · preset {r['preset']} · {r['checkpoint']['params']:,} params · {r['dtype']} · "
                    f"{r['machine']['cpus']} CPUs, {r['machine']['ram_bytes'] / GiB:.0f} GiB RAM")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("weights (export dtype)", f"{r['weight_bytes'] / GiB:.3f} GiB ({r['weight_mib']:.2f} MiB)"),
        ("checkpoint creation", f"{times['checkpoint_s']:.1f} s ({r['checkpoint']['shards']} shards, writer peak "
                                f"{mem['checkpoint_writer_peak_rss_mib']:.0f} MiB)"),
        ("export total (child process)", f"{times['export_process_s']:.1f} s"),
        *((f"  {k}", f"{v:.1f} s") for k, v in times["export_stages_s"].items()),
        ("baseline RSS (after imports)", f"{mem['baseline_rss_mib']:.0f} MiB (torch alone "
                                         f"{mem['rss_after_import_torch_mib']:.0f} MiB)"),
        *((f"  peak in {k}", f"{st['peak']:.0f} MiB (anon {st['anon_at_max']:.0f} / file {st['file_at_max']:.0f} "
                             f"at sampled max)") for k, st in mem["stages"].items()),
        ("peak RSS (VmHWM)", f"{mem['peak_rss_mib']:.0f} MiB = {mem['peak_rss_mib'] / 1024:.2f} GiB"),
        ("peak / weights", f"{mem['ratio_peak_to_weights']:.3f}"),
        ("(peak - baseline) / weights", f"{mem['ratio_peak_minus_baseline_to_weights']:.3f}"),
        ("peak before numeric check / weights", f"{mem['ratio_before_numeric_check']:.3f}"),
        ("numeric check", f"skipped ({r['numeric_check_reason']})" if not r["numeric_check"] else
         ("passed" if r["export"]["numeric_check"]["ok"] else "FAILED")),
        ("data file", f"{ver['data_bytes'] / GiB:.3f} GiB, weights + {ver['data_minus_weight_bytes']} B, "
                      f"{ver['external_initializers']} external / {ver['inline_initializers']} inline initializers"
         if ver["data_file"] else "none (weights inline)"),
        ("spot checks (bit-identical)", ", ".join(f"{s['name'].removeprefix('model.')} "
                                                   f"{'ok' if s['equal'] else 'MISMATCH'}"
                                                   for s in ver["spot_checks"])),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(list(PRESETS)), default="7b", show_default=True,
              help="7b: Dream-v0-Instruct-7B shapes; 1b: 11-layer 2048-wide Dream; tiny: seconds, for tests.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="bfloat16", show_default=True,
              help="Export dtype.")
@click.option("--keep", is_flag=True, help="Keep the temp checkpoint and export (their path is printed).")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Parent of the temp dir [default: system temp]; 7b needs ~31 GB free there.")
@click.option("--numeric-check", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="auto: run the export's numeric check only if its fp32 reference fits in available RAM.")
@click.option("--out", "out_json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Result JSON [default: bench/results/export_memory-<preset>.json].")
@click.option("--child-make", type=click.Path(path_type=Path), hidden=True)
@click.option("--child-export", type=click.Path(path_type=Path), hidden=True)
@click.option("--export-dir", type=click.Path(path_type=Path), hidden=True)
@click.option("--force-external", is_flag=True, hidden=True)
def main(preset, dtype, keep, workdir, numeric_check, out_json, child_make, child_export, export_dir, force_external):
    """Peak RSS and time of exporting a Dream-7B-shaped random checkpoint to ONNX (see the module docstring)."""
    if child_make:
        return emit("result", data=write_checkpoint(child_make, preset))
    if child_export:
        return emit("result", data=export_child(child_export, export_dir, dtype, numeric_check == "on",
                                                force_external))
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    r = run_benchmark(preset, dtype, workdir, keep, numeric_check, out_json)
    report(r)
    click.echo(f"wrote {r['json']}" + (f"; kept {r['kept']}" if r["kept"] else ""))


if __name__ == "__main__":
    main()
