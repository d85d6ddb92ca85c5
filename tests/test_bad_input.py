"""Every command refuses bad input with one clear line, before any work: no traceback, no exit 0 with nonsense,
no model loaded first (the model given is one that does not exist, so an option checked after the load would
report the model instead), and nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlmtrt.cli import main

MISSING = "no-such-dir/no-such-model"
# command -> (arguments that make it valid apart from the model, {option: (lowest, highest valid value)}); a
# highest of None: any larger value is valid too (a top-k beyond the vocabulary, a shard larger than the model)
SEED = (0, 2**64 - 1)
COMMANDS = {
    "generate": (["-m", MISSING, "-p", "hi"], {"--max-new-tokens": (1, 10**6), "--steps": (1, 10**6),
                                             "--block-length": (1, 10**6), "--top-k": (0, None), "--seed": SEED}),
    "eval": (["-m", MISSING, "--task", "sudoku4"], {"--n": (1, 10**5), "--steps": (1, 10**6), "--blocks": (1, 1000),
                                                   "--batch-size": (1, 10**5), "--seed": SEED}),
    "make-tiny": (["--arch", "dream", "--out", "{tmp}/t"], {"--layers": (1, 64), "--hidden": (16, 4096),
                                                          "--shard-bytes": (1, None), "--seed": SEED}),
    "export": (["-m", MISSING, "-o", "{tmp}/e"], {"--opset": (18, 23)}),
    "compare": (["-m", MISSING], {"--steps-per-policy": (0, None), "--max-feeds": (1, None), "--seed": SEED}),
}
FLOATS = {"generate": {"--temperature": 0.0, "--alg-temp": 0.0, "--cfg-scale": 0.0}}
CASES = [(c, o, lohi) for c, (_, opts) in COMMANDS.items() for o, lohi in opts.items()]


def run(tmp_path: Path, command: str, option: str, value) -> object:
    base, _ = COMMANDS[command]
    args = [command, *(a.format(tmp=tmp_path) for a in base), option, str(value)]
    return CliRunner().invoke(main, args)


def assert_refused(r, option: str, tmp_path: Path) -> None:
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert option in r.output, r.output  # the option is named, not the missing model
    assert "denoising" not in r.output  # nothing ran
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing written


@pytest.mark.parametrize("command,option,bounds", CASES)
def test_zero_negative_below_and_above_range(tmp_path, command, option, bounds):
    lo, hi = bounds
    for value in (lo - 1, lo - 10**9, *((hi + 1, hi * 10**6) if hi is not None else ())):
        assert_refused(run(tmp_path, command, option, value), option, tmp_path)


@pytest.mark.parametrize("command,option,bounds", CASES)
def test_wrong_types(tmp_path, command, option, bounds):
    for value in ("many", "1.5", "", "0x10"):
        r = run(tmp_path, command, option, value)
        assert r.exit_code == 2, r.output
        assert_refused(r, option, tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), value=st.one_of(st.integers(max_value=-1), st.integers(min_value=10**19)))
def test_out_of_range_integers(tmp_path_factory, case, value):
    command, option, (lo, hi) = case
    if lo <= value and (hi is None or value <= hi):
        return  # valid for this option
    tmp = tmp_path_factory.mktemp("bad")
    assert_refused(run(tmp, command, option, value), option, tmp)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(sorted(FLOATS["generate"])), value=st.one_of(
    st.floats(max_value=-1e-9, allow_nan=False), st.just("nan?"), st.just("-inf")))
def test_negative_floats(tmp_path_factory, option, value):
    tmp = tmp_path_factory.mktemp("bad")
    assert_refused(run(tmp, "generate", option, value), option, tmp)


@pytest.mark.parametrize("option,value", [("--top-p", "0"), ("--top-p", "1.5"), ("--eps", "0"), ("--eps", "1"),
                                          ("--max-new-tokens", str(10**7)), ("--steps", str(10**7)),
                                          ("--device", "tpu"), ("--device", "cuda:7"), ("--dtype", "int8")])
def test_generate_range_and_choice_errors(tmp_path, option, value):
    assert_refused(run(tmp_path, "generate", option, value), option, tmp_path)


@pytest.mark.parametrize("args,message", [
    (["generate", "-m", "tiny-llada-tasks", "-p", "x", "-n", "0"], "--max-new-tokens"),
    (["generate", "-m", "tiny-llada-tasks", "-p", "x", "-n", "12", "--block-length", "5"], "multiple of block_length"),
    (["generate", "-m", "tiny-llada-tasks", "-p", "x", "--policy", "decode:foo=1"], "'decode' has no option foo"),
    (["generate", "-m", "tiny-llada-tasks", "-p", "x", "--policy", "greedy"], "remasking random"),
    (["generate", "-m", "tiny-dream-tasks", "-p", "x", "--policy", "greedy"], "LLaDA"),
    (["generate", "-m", "tiny-dream-tasks", "-p", "x", "--remasking", "random"], "--remasking"),
    (["generate", "-m", "tiny-dream-tasks", "-p", "x", "-n", "100000"], "positions"),
    (["eval", "-m", "tiny-dream-tasks", "--task", "sudoku4", "--remasking", "random"], "--remasking"),
    (["eval", "-m", "tiny-llada-tasks", "--task", "sudoku4", "--policy", "pd"], "Dream only"),
    (["eval", "-m", "tiny-llada-tasks", "--task", "sudoku4:clues=99"], "clues must lie in 4..12"),
    (["eval", "-m", "tiny-llada-tasks", "--task", "tetris"], "unknown task 'tetris'"),
])
def test_semantic_errors_are_one_line_before_loading(tmp_path, monkeypatch, args, message):
    import dlmtrt.runtime.backends as backends

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")
    monkeypatch.setattr(backends, "make_backend", no_load)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and message in r.output, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, AssertionError), r.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def corrupt_exports(tmp_path_factory, exported):
    """Copies of a good export with model.onnx truncated, replaced by junk, and with a broken tokenizer."""
    import shutil
    good = Path(exported("llada"))
    out = {}
    for kind in ("truncated", "junk", "tokenizer"):
        d = tmp_path_factory.mktemp(kind) / "export"
        shutil.copytree(good, d)
        m = d / "model.onnx"
        if kind == "truncated":
            m.write_bytes(m.read_bytes()[: m.stat().st_size // 3])
        elif kind == "junk":
            m.write_bytes(b"\x08\x96\x01 this is not a protobuf" * 50)
        else:
            (d / "tokenizer.json").write_text("{not json")
        out[kind] = d
    return out


@pytest.mark.parametrize("kind", ["truncated", "junk", "tokenizer"])
@pytest.mark.parametrize("how", ["generate-dir", "generate-file", "eval", "compare"])
def test_corrupt_exports_are_one_line(corrupt_exports, tmp_path, monkeypatch, kind, how):
    d = corrupt_exports[kind]
    monkeypatch.chdir(tmp_path)
    args = {"generate-dir": ["generate", "-m", str(d), "--backend", "onnxruntime", "-p", "hi", "-n", "4"],
            "generate-file": ["generate", "-m", str(d / "model.onnx"), "--backend", "onnxruntime", "-p", "hi",
                              "-n", "4"],
            "eval": ["eval", "-m", str(d), "--backend", "onnxruntime", "--task", "sudoku4", "--n", "2"],
            "compare": ["compare", "-m", "tiny-llada-tasks", "--onnx", str(d), "--backends", "torch,onnxruntime",
                        "--steps-per-policy", "1", "--max-feeds", "1"]}[how]
    r = CliRunner().invoke(main, args)
    if kind == "tokenizer" and how == "compare":  # compare uses the checkpoint's tokenizer, not the export's
        assert r.exit_code == 0, r.output
        return
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError)), r.output
    error = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and ("export" in error[0]), r.output  # says how to make a good one
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["{junk", "[1, 2]", ""])
def test_compare_refuses_a_bad_inputs_file(tmp_path, content):
    f = tmp_path / "feeds.json"
    f.write_text(content)
    r = CliRunner().invoke(main, ["compare", "-m", "tiny-llada-tasks", "--backends", "torch,onnxruntime",
                                  "--load-inputs", str(f)])
    assert r.exit_code == 2 and "Traceback" not in r.output and "--save-inputs" in r.output, r.output
    assert "exporting" not in r.output and [p.name for p in tmp_path.iterdir()] == ["feeds.json"]


def test_eval_writes_results_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["eval", "-m", "tiny-llada-tasks", "--task", "sudoku4", "--n", "2",
                                  "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    files = list(tmp_path.glob("eval-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["results"][0]["n"] == 2


def test_eval_bad_n_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for n in ("0", "-1"):
        r = CliRunner().invoke(main, ["eval", "-m", "tiny-llada-tasks", "--task", "sudoku4", "--n", n])
        assert r.exit_code == 2 and "--n" in r.output
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- text and outputs

from dlmtrt.models.loading import open_checkpoint as _REAL_OPEN  # noqa: E402

NOT_UTF8 = "\udcff\udcfe bad"  # what Python makes of the bytes ff fe in argv (surrogateescape)


@pytest.fixture()
def no_load(monkeypatch):
    """Every way a command gets to weights or a model raises: a check that passes this was made first."""
    import dlmtrt.calibration.pipeline as pipeline
    import dlmtrt.evals.speed as speed
    import dlmtrt.models.loading as loading
    import dlmtrt.models.tiny as tiny
    import dlmtrt.runtime.backends as backends

    def boom(*a, **k):
        raise AssertionError("the model loader was reached before the inputs were checked")
    for mod, name in ((backends, "make_backend"), (backends, "describe_model"), (loading, "load"),
                      (loading, "open_checkpoint"), (speed, "random_model"), (tiny, "make_tiny"),
                      (pipeline, "calibrate")):
        monkeypatch.setattr(mod, name, boom)


def assert_one_line(r, *needles: str, code: int = 2) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and not isinstance(r.exception, (AssertionError, TypeError)), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.output
    for n in needles:
        assert n in errors[0], r.output


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_non_utf8_prompts_are_one_line(tmp_path, monkeypatch, no_load, family):
    monkeypatch.chdir(tmp_path)
    model = f"tiny-{family}-tasks"
    r = CliRunner().invoke(main, ["generate", "-m", model, "-p", NOT_UTF8, "-n", "4", "--steps", "4"])
    assert_one_line(r, "--prompt", "not valid UTF-8", "0xff")
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"caf\xe9\n")
    r = CliRunner().invoke(main, ["generate", "-m", model, "--prompt-file", str(bad), "-n", "4", "--steps", "4"])
    assert_one_line(r, "--prompt-file", "not UTF-8", "0xe9")
    r = CliRunner().invoke(main, ["calibrate", "-m", model, "--format", "fp8", "--prompts", str(bad),
                                  "--out", str(tmp_path / "q")])
    assert_one_line(r, "--prompts", "not UTF-8")
    r = CliRunner().invoke(main, ["generate", "-m", model, "-p", "", "-n", "4"])
    assert_one_line(r, "--prompt", "empty")
    r = CliRunner().invoke(main, ["eval", "-m", model, "--task", "sudoku4", "--policy", "decode" + NOT_UTF8])
    assert_one_line(r, "--policy", "not valid UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_non_utf8_argv_bytes_from_a_shell(tmp_path):
    """The real path: bytes in argv, decoded by Python, through the console script."""
    import shutil
    import subprocess
    import sys
    script = shutil.which("dlmtrt", path=str(Path(sys.executable).parent))
    p = subprocess.run([script, "generate", "-m", "tiny-llada-tasks", "-p", b"caf\xe9", "-n", "4"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "--prompt" in p.stderr and "not valid UTF-8 (byte 0xe9" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


def _unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root writes anywhere on disk: /sys refuses it)."""
    import os
    if os.geteuid() == 0:
        return Path("/sys")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


# command -> (arguments, the option naming the output, where the output goes, file or directory)
OUTPUTS = {
    "eval": (["eval", "-m", "tiny-llada-tasks", "--task", "sudoku4", "--n", "2"], "--out", "file"),
    "bench": (["bench", "--shape", "tiny-dream", "--prompt", "8", "--answer", "8"], "--out", "file"),
    "calibrate": (["calibrate", "-m", "tiny-llada-tasks", "--format", "fp8", "--task", "sudoku4"], "--out", "dir"),
    "compare-outputs": (["compare", "-m", "tiny-llada-tasks", "--backends", "torch,onnxruntime"], "--save-outputs",
                        "file"),
    "compare-inputs": (["compare", "-m", "tiny-llada-tasks", "--backends", "torch,onnxruntime"], "--save-inputs",
                       "file"),
    "make-tiny": (["make-tiny", "--arch", "dream"], "--out", "dir"),
    "bicache-profile": (["bicache-profile", "-m", "tiny-llada-tasks"], "--out", "file"),
    "export": (["export", "-m", "tiny-llada-tasks"], "--out", "dir"),
    "build-engine-cache": (["build-engine", "--onnx", "{tmp}", "--out", "{tmp}/e.engine"], "--timing-cache", "file"),
}


@pytest.mark.parametrize("where", ["unwritable", "impossible", "under-a-file", "a-directory"])
@pytest.mark.parametrize("command", sorted(OUTPUTS))
def test_unwritable_outputs_are_refused_before_any_work(tmp_path, monkeypatch, no_load, command, where):
    args, option, kind = OUTPUTS[command]
    if where == "a-directory" and kind == "dir":
        pytest.skip("a directory is what this option wants")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("x")
    target = {"unwritable": _unwritable_dir(tmp_path) / "r", "impossible": Path("/proc/no-such-dir/r"),
              "under-a-file": tmp_path / "file" / "r", "a-directory": tmp_path}[where]
    before = sorted(p.name for p in tmp_path.iterdir())
    import dlmtrt.engine.build as build

    monkeypatch.setattr(build, "build_engine", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    r = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args] + [option, str(target)])
    assert_one_line(r, option)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["eval", "bench"])
def test_default_outputs_in_an_unwritable_directory_are_refused_first(monkeypatch, no_load, tmp_path, command):
    monkeypatch.chdir(_unwritable_dir(tmp_path))
    monkeypatch.setattr("dlmtrt.runtime.backends.describe_model", _source_of("tiny-llada-tasks"))
    r = CliRunner().invoke(main, OUTPUTS[command][0])
    assert_one_line(r, "cannot write")


def _source_of(model: str):
    """A describe_model that answers for one real checkpoint (read before `no_load` patched the loader)."""
    from dlmtrt.runtime.backends import ModelSource
    ck = _REAL_OPEN(model)
    return lambda backend, m: ModelSource(ck.path, ck.family, ck.args)


# ---------------------------------------------------------------------------------------- step budgets


@pytest.mark.parametrize("args", [
    ["-m", "tiny-llada-tasks", "-n", "64", "--block-length", "32", "--steps", "8", "--policy", "dual+parallel"],
    ["-m", "tiny-llada-tasks", "-n", "16", "--steps", "4", "--policy", "none+parallel"],
    ["-m", "tiny-dream-tasks", "-n", "64", "--block-length", "32", "--steps", "8", "--policy", "dual+parallel"],
    ["-m", "tiny-dream-tasks", "-n", "4", "--steps", "1000000"],
    ["-m", "tiny-llada-tasks", "-n", "4", "--steps", "1000000"],
    ["-m", "tiny-llada-tasks", "-n", "8", "--steps", "16", "--block-length", "4"],
])
def test_steps_that_cannot_mean_what_was_asked_are_refused(monkeypatch, tmp_path, args):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dlmtrt.runtime.backends.make_backend", _unreachable)
    r = CliRunner().invoke(main, ["generate", "-p", "x", *args])
    assert_one_line(r, "--steps")
    assert list(tmp_path.iterdir()) == []


def _unreachable(*a, **k):
    raise AssertionError("the model was loaded")


class Reached(Exception):
    pass


@pytest.mark.parametrize("args", [
    ["-m", "tiny-dream-tasks", "-n", "16", "--steps", "4", "--policy", "none+parallel"],  # Dream's own schedule
    ["-m", "tiny-llada-tasks", "-n", "16", "--steps", "16", "--policy", "dual+parallel", "--block-length", "8"],
    ["-m", "tiny-llada-tasks", "-n", "16", "--policy", "dual+parallel", "--block-length", "8"],
])
def test_step_budgets_that_hold_are_accepted(monkeypatch, args):
    def reached(*a, **k):
        raise Reached
    monkeypatch.setattr("dlmtrt.runtime.backends.make_backend", reached)
    r = CliRunner().invoke(main, ["generate", "-p", "x", *args])
    assert isinstance(r.exception, Reached), r.output


def test_default_surplus_steps_are_said(monkeypatch):
    """Dream's upstream default is 512 steps for any length: kept, and said."""
    def reached(*a, **k):
        raise Reached
    monkeypatch.setattr("dlmtrt.runtime.backends.make_backend", reached)
    r = CliRunner().invoke(main, ["generate", "-m", "tiny-dream-tasks", "-p", "x", "-n", "20"])
    assert isinstance(r.exception, Reached)
    assert "note: 512 steps (the dream default) for 20 new tokens" in " ".join(r.output.split())
    assert "--steps 20" in r.output


def test_eval_refuses_parallel_with_a_step_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dlmtrt.runtime.backends.make_backend", _unreachable)
    r = CliRunner().invoke(main, ["eval", "-m", "tiny-llada-tasks", "--task", "sudoku4", "--steps", "4",
                                  "--policy", "none", "--policy", "dual+parallel"])
    assert_one_line(r, "--steps", "dual+parallel")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- the right backend


def test_an_export_or_engine_on_a_checkpoint_backend_names_the_backend(exported, tmp_path, monkeypatch):
    monkeypatch.setattr("dlmtrt.models.loading.load", _unreachable)
    d = exported("llada")
    for args in (["-m", str(d)], ["-m", str(d / "model.onnx")], ["-m", str(d), "--backend", "torch-graph"]):
        r = CliRunner().invoke(main, ["generate", "-p", "x", "-n", "4", *args])
        assert_one_line(r, "ONNX export", "--backend onnxruntime")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\0" * 16)
    r = CliRunner().invoke(main, ["generate", "-p", "x", "-n", "4", "-m", str(engine)])
    assert_one_line(r, "TensorRT engine", "--backend tensorrt")
    r = CliRunner().invoke(main, ["eval", "-m", str(d), "--task", "sudoku4"])
    assert_one_line(r, "--backend onnxruntime")


def test_tensorrt_backend_defaults_to_the_gpu(monkeypatch):
    seen = {}

    def describe(backend, model):
        from dlmtrt.runtime.backends import ModelSource
        ck = _REAL_OPEN("tiny-llada-tasks")
        return ModelSource(ck.path, ck.family, ck.args, "float32")

    def make(name, model, dtype=None, device=None, **k):
        seen["device"] = device
        raise Reached
    monkeypatch.setattr("dlmtrt.runtime.backends.describe_model", describe)
    monkeypatch.setattr("dlmtrt.runtime.backends.make_backend", make)
    r = CliRunner().invoke(main, ["generate", "-m", "x.engine", "--backend", "tensorrt", "-p", "x", "-n", "4"])
    assert isinstance(r.exception, Reached) and seen["device"] == "cuda"
    CliRunner().invoke(main, ["generate", "-m", "tiny-llada-tasks", "-p", "x", "-n", "4"])
    assert seen["device"] == "cpu"


# ---------------------------------------------------------------------------------------- bench on the CPU


def test_bench_on_the_cpu_writes_strict_json_with_measured_figures(tmp_path, monkeypatch):
    import re
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny-llada", "--prompt", "8", "--answer", "8",
                                  "--block-length", "8", "--policy", "none"])
    assert r.exit_code == 0, r.output
    assert "nan" not in r.output.lower() and "0.00 B parameters" not in r.output
    help_text = " ".join(CliRunner().invoke(main, ["bench", "--help"]).output.split())
    pattern = re.search(r"default: (bench-\S+\.json)", help_text).group(1)
    name = (pattern.replace("<shape>", "tiny-llada").replace("<device>", "cpu").replace("<backend>", "torch-graph")
            .replace("<batch>", "1"))
    assert [p.name for p in tmp_path.iterdir()] == [name]

    def no_constants(c):
        raise ValueError(f"non-standard JSON constant {c}")
    rep = json.loads((tmp_path / name).read_text(), parse_constant=no_constants)
    assert rep["copy_bytes_per_s"] > 1e8 and rep["floor_ms"] > 0 and rep["params"] > 0
    (run,) = rep["runs"]
    assert run["floor_ratio"] > 1 and run["step_ms_median"] > 0 and run["tokens_per_s"] > 0
    assert isinstance(run["peak_bytes"], int) and run["peak_bytes"] > 0


def test_bench_attention_choice_is_the_graph_backends_and_named_in_the_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny-llada", "--backend", "torch", "--attention", "auto"])
    assert r.exit_code == 2 and "--attention apply to the torch-graph backend" in r.output, r.output
    r = CliRunner().invoke(main, ["bench", "--shape", "tiny-llada", "--prompt", "8", "--answer", "8",
                                  "--block-length", "8", "--policy", "none", "--attention", "sdpa", "-o", "s.json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.json").read_text())["backend"] == "torch-graph+sdpa"


def test_bench_checks_every_policy_before_running_any(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dlmtrt.evals.speed.random_model", _unreachable)
    r = CliRunner().invoke(main, ["bench", "--answer", "8"])  # default --block-length 32 does not tile 8
    assert_one_line(r, "policy dual", "multiple of block_length (32)", "--answer 8")
    assert "running" not in r.output and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- start-up and help


def test_help_and_usage_errors_import_neither_torch_nor_transformers(tmp_path):
    import subprocess
    import sys
    probe = ("import json, sys\nfrom dlmtrt.cli import main\ncodes = []\n"
             "for args in (['--help'], ['generate', '--help'], ['generate', '--bogus'], ['--version'],\n"
             "             ['compare', '--data-loader-path'], ['eval', '--n', '0', '-m', 'x', '--task', 'y']):\n"
             "    try:\n        main(args, standalone_mode=True)\n    except SystemExit as e:\n"
             "        codes.append(e.code)\n"
             "print(json.dumps({'codes': codes, 'heavy': [m for m in ('torch', 'transformers') if m in sys.modules]}),"
             " file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    doc = json.loads(p.stderr.strip().splitlines()[-1])
    assert doc == {"codes": [0, 0, 2, 0, 0, 2], "heavy": []}, p.stderr


def _all_commands():
    return sorted(main.commands.items())


@pytest.mark.parametrize("name,cmd", _all_commands())
def test_every_option_says_what_it_does_and_out_has_its_short_form(name, cmd):
    import click
    for p in cmd.params:
        if isinstance(p, click.Option) and p.name != "help":
            assert p.help and p.help.strip(), f"{name} {p.opts[0]} has no description"
        if isinstance(p, click.Option) and "--out" in p.opts:
            assert "-o" in p.opts, f"{name} --out has no -o"


def test_generate_help_lists_exactly_the_policies_that_exist():
    from dlmtrt.cli.generate import POLICY_NAMES
    from dlmtrt.runtime.policies import CACHE_POLICIES
    assert POLICY_NAMES == tuple(CACHE_POLICIES)
    text = " ".join(CliRunner().invoke(main, ["generate", "--help"]).output.split())
    assert "window" not in text and " | ".join(POLICY_NAMES) in text


def test_serve_trt_offers_only_what_an_engine_takes():
    text = CliRunner().invoke(main, ["serve-trt", "--help"]).output
    assert "--dtype" not in text and "[default: cuda]" in text
    assert "--dtype" in CliRunner().invoke(main, ["serve", "--help"]).output


@pytest.mark.parametrize("args", [
    ["generate", "-m", "tiny-llada-tasks", "-p", "x", "--policy", "decode:foo=1"],
    ["generate", "-m", "tiny-llada-tasks", "-p", "x", "-n", "12", "--block-length", "5"],
    ["generate", "-m", "tiny-dream-tasks", "-p", "x", "--cfg-scale", "1"],
    ["eval", "-m", "tiny-llada-tasks", "--task", "tetris"],
    ["bench", "--shape", "tiny-dream", "--keep-blocks", "1"],
    ["make-tiny", "--arch", "dream", "--out", "{tmp}/x", "--hidden", "20"],
])
def test_usage_errors_exit_2_wherever_they_are_found(tmp_path, monkeypatch, args):
    monkeypatch.setattr("dlmtrt.runtime.backends.make_backend", _unreachable)
    r = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output


def test_eval_progress_moves_with_the_steps():
    from dlmtrt.evals.evaluate import evaluate
    from dlmtrt.runtime.backends import make_backend
    be, tok, _ = make_backend("torch", "tiny-llada-tasks")
    calls: list[float] = []
    evaluate(be, tok, "sudoku4", 2, ["none"], batch_size=2, progress=calls.append)
    assert len(calls) > 10 and all(c >= 0 for c in calls) and abs(sum(calls) - 2) < 1e-9


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every `dlmtrt ...` command line in the README's and docs' code blocks: (where, argv after dlmtrt)."""
    import shlex
    root = Path(__file__).resolve().parents[1]
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        in_code, pending = False, ""
        for k, line in enumerate(doc.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                in_code, pending = not in_code, ""
                continue
            if not in_code:
                continue
            text = pending + line.strip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            try:
                words = shlex.split(text, comments=True) if text else []
            except ValueError:  # not shell (Python, JSON) or a quote spanning lines
                continue
            while words and "=" in words[0] and not words[0].startswith("-"):
                words = words[1:]  # VAR=value prefixes
            if words[:1] in (["dlmtrt"], [".venv/bin/dlmtrt"]) and len(words) > 1:
                found.append((f"{doc.name}:{k}", words[1:]))
    return found


def test_every_documented_command_uses_options_that_exist():
    import click
    cmds = _documented_commands()
    assert len(cmds) >= 10
    for where, argv in cmds:
        if argv[0].startswith("-"):
            continue
        assert argv[0] in main.commands, f"{where}: no command {argv[0]!r}"
        cmd = main.commands[argv[0]]
        known = {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
        known |= {"-h", "--help"}
        for word in argv[1:]:
            if word.startswith("-") and not word.lstrip("-").replace(".", "").isdigit():
                assert word.split("=")[0] in known, f"{where}: {argv[0]} has no option {word}"
