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
    assert r.exit_code == 1 and "Traceback" not in r.output and "--save-inputs" in r.output, r.output
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
