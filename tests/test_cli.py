"""The command line as a user runs it (click's runner, same process)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dlmtrt.cli import main


@pytest.fixture()
def runner():
    return CliRunner()


@pytest.mark.parametrize("arch", ["dream", "llada"])
def test_make_tiny_then_generate_json(runner, tmp_path, arch):
    out = tmp_path / arch
    r = runner.invoke(main, ["make-tiny", "--arch", arch, "--out", str(out), "--shard-bytes", "60000"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    r = runner.invoke(main, ["generate", "-m", str(out), "-p", "hello", "-p", "two", "--chat", "-n", "8", "-s", "4",
                             "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert len(doc["answers"]) == 2
    st = doc["stats"]
    assert st["batch"] == 2 and st["new_tokens"] == 8 and st["steps"] == st["forward_passes"] == 4
    assert st["rows_computed"] == 4 * 2 * st["canvas_length"]


def test_generate_table_output(runner, tiny_dir):
    r = runner.invoke(main, ["generate", "-m", str(tiny_dir("dream")), "-p", "hi", "-n", "6", "-s", "3"])
    assert r.exit_code == 0, r.output
    assert "answer 0" in r.stdout and "tok/s" in r.stdout


def test_make_tiny_refuses_non_empty_dir(runner, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    r = runner.invoke(main, ["make-tiny", "--arch", "dream", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "not empty" in r.output
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_generate_wrong_family_option(runner, tiny_dir):
    r = runner.invoke(main, ["generate", "-m", str(tiny_dir("llada")), "-p", "hi", "--alg", "entropy"])
    assert r.exit_code == 2 and "--alg" in r.output and "llada" in r.output


def test_generate_missing_alias_says_how_to_download(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    r = runner.invoke(main, ["generate", "-m", "llada-8b", "-p", "hi"])
    assert r.exit_code == 1
    assert "GSAI-ML/LLaDA-8B-Instruct" in r.output and "hf download" in r.output
    assert "Traceback" not in r.output


def test_help_lists_commands_and_options(runner):
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0 and "make-tiny" in r.output and "generate" in r.output and "build-engine" in r.output
    r = runner.invoke(main, ["generate", "--help"])
    assert "--max-new-tokens" in r.output and "--block-length" in r.output and "--alg" in r.output


def test_generate_with_policy_reports_work_saved(runner, tiny_dir):
    args = ["generate", "-m", str(tiny_dir("llada")), "-p", "hello there", "-n", "12", "-s", "12",
            "--block-length", "4", "--json"]
    base = runner.invoke(main, args)
    r = runner.invoke(main, args + ["--policy", "dual+parallel:threshold=0.5+early:gaps=0.5/0.4/0.3"])
    assert base.exit_code == 0 and r.exit_code == 0, r.output
    doc, ref = (json.loads(x.stdout[x.stdout.index("{"):]) for x in (r, base))
    assert doc["policy"] == "dual+parallel:threshold=0.5+early:gaps=0.5/0.4/0.3"
    assert doc["stats"]["rows_computed"] < ref["stats"]["rows_computed"]
    assert doc["stats"]["forward_passes"] <= ref["stats"]["forward_passes"]


def test_generate_bad_policy_is_one_clean_error(runner, tiny_dir):
    r = runner.invoke(main, ["generate", "-m", str(tiny_dir("dream")), "-p", "x", "--policy", "decode:cache_steps=0"])
    assert r.exit_code != 0 and "cache_steps must be an integer >= 1" in r.output and "Traceback" not in r.output


def test_source_checkout_entry_point_and_console_script_are_the_same_tool():
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "cli.py", "--help"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0 and "make-tiny" in r.stdout and "compare" in r.stdout
    script = shutil.which("dlmtrt", path=str(Path(sys.executable).parent))
    assert script is not None, "the dlmtrt console script is not installed next to this python"
    r2 = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert r2.returncode == 0 and r2.stdout.replace("dlmtrt", "cli.py") == r.stdout.replace("dlmtrt", "cli.py")
