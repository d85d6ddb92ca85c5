"""The users' path end to end through the command line: export -> generate --backend onnxruntime -> compare."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dlmtrt import cli

from dlmtrt.evals.tasks import get_task

SHIFT = get_task("shift128").problems(1, seed=5)[0]
PROMPT = {"dream": (SHIFT.prompt, ["-n", "129", "--steps", "129"]),
          "llada": ("sudoku\n0120\n4231\n2000\n0040\n", ["-n", "20", "--steps", "20", "--block-length", "20"])}


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_export_generate_compare(tmp_path, family):
    run = CliRunner().invoke
    model = f"tiny-{family}-tasks"
    out = tmp_path / "onnx"
    r = run(cli.main, ["export", "-m", model, "-o", str(out)])
    assert r.exit_code == 0, r.output
    prompt, opts = PROMPT[family]
    answers = {}
    for backend, m in (("torch", model), ("onnxruntime", str(out))):
        r = run(cli.main, ["generate", "-m", m, "--backend", backend, "-p", prompt, *opts, "--policy", "decode",
                           "--json"])
        assert r.exit_code == 0, r.output
        answers[backend] = json.loads(r.stdout)["answers"]
    assert answers["onnxruntime"] == answers["torch"]
    if family == "dream":
        assert get_task("shift128").check(SHIFT, answers["torch"][0])
    else:
        assert answers["torch"] == ["3124\n4231\n2413\n1342"]
    r = run(cli.main, ["compare", "-m", model, "--onnx", str(out), "--backends", "torch,onnxruntime",
                       "--steps-per-policy", "3"])
    assert r.exit_code == 0, r.output
    assert "logits" in r.output and "present_valid" in r.output
