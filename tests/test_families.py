"""Families are registered, not branched on: a test-only family (tests/toy_family: LLaDA's layout with another
mask id, other defaults and its own schedule name) goes through generate, eval, serve and export by adding one
model file and one runtime module, registered at run time; and no file outside a built-in family's own two
names that family."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import dlmtrt
from dlmtrt.cli import main

PKG = Path(dlmtrt.__file__).resolve().parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy family registered for this module, and a tiny random checkpoint of it."""
    from dlmtrt.models import families as model_families
    from dlmtrt.models.tiny import make_tiny
    from dlmtrt.runtime import families as runtime_families
    from tests.toy_family import toy_model, toy_runtime
    model_families.register(toy_model)
    runtime_families.register(toy_runtime.FAMILY)
    try:
        yield make_tiny("toy", tmp_path_factory.mktemp("toy") / "ckpt", seed=5)
    finally:
        del model_families.FAMILIES["toy"], runtime_families.FAMILIES["toy"]


def test_the_toy_checkpoint_is_its_own_family(toy):
    from dlmtrt.models.loading import open_checkpoint
    ck = open_checkpoint(str(toy))
    llada = open_checkpoint("tiny-llada-tasks")
    assert ck.family == "toy" and json.loads((toy / "config.json").read_text())["architectures"] == ["ToyDiffusionLM"]
    assert ck.args.mask_token_id == 256 != llada.args.mask_token_id


def test_generate_takes_the_familys_defaults_and_options(toy):
    r = CliRunner().invoke(main, ["generate", "-m", str(toy), "-p", "hello", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout[r.stdout.index("{"):])
    assert doc["params"]["gen_length"] == 8 and doc["stats"]["new_tokens"] == 8 and doc["stats"]["steps"] <= 8
    r = CliRunner().invoke(main, ["generate", "-m", str(toy), "-p", "hello", "--cfg-scale", "0.5", "-n", "8"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", "-m", str(toy), "-p", "hello", "--alg", "entropy"])
    assert r.exit_code == 2 and "--alg does not apply to toy models (dream only)" in r.output


def test_eval_names_the_familys_schedule(toy, tmp_path):
    out = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["eval", "-m", str(toy), "--task", "sudoku4", "--n", "2", "--policy", "none",
                                  "--policy", "dual", "-o", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["results"]
    assert [x["schedule"] for x in rows] == ["toy-blocks=1", "toy-blocks=1"] and all(x["n"] == 2 for x in rows)


def test_serve_answers_as_offline_generation(toy):
    from fastapi.testclient import TestClient

    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.params import family_params
    from dlmtrt.serve.app import ServeConfig, Served, create_app
    be, tok, src = make_backend("torch", str(toy))
    served = Served(be, tok, src, ServeConfig(model_id="toy", policy="dual"))
    params = family_params("toy", src.path, max_new_tokens=8, steps=8)
    offline = generate_text(be, tok, ["sudoku\n"], policy="dual", **params).texts[0]
    with TestClient(create_app(served)) as client:
        r = client.post("/v1/completions", json={"prompt": "sudoku\n", "max_tokens": 8, "steps": 8})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == offline
        bad = client.post("/v1/completions", json={"prompt": "x", "alg": "entropy"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "alg"


def test_export_and_onnxruntime(toy, tmp_path):
    from dlmtrt.export.onnx_export import export_step
    from dlmtrt.runtime.backends import make_backend
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.params import family_params
    res = export_step(str(toy), tmp_path / "onnx", log=lambda m: None)
    assert res.checks is not None and res.checks.ok
    ref, tok, src = make_backend("torch", str(toy))
    ort, ort_tok, ort_src = make_backend("onnxruntime", str(tmp_path / "onnx"))
    assert ort_src.family == "toy" and ort.info == ref.info
    params = family_params("toy", src.path)
    a = generate_text(ref, tok, ["abc", "hello"], **params)
    b = generate_text(ort, ort_tok, ["abc", "hello"], **params)
    assert torch.equal(a.sequences, b.sequences)


# ---- where the built-in families may be named

def _names_in(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, what) for each string literal (docstrings aside) or import naming one of the families."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words = set(node.value.replace("_", "-").split("-"))
            found += [(node.lineno, repr(node.value)) for n in names if n == node.value or n in words]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, f"import {node.module}") for n in names if node.module.split(".")[-1] == n
                      or any(a.name == n for a in node.names)]
    return found


def test_only_a_familys_own_files_name_it():
    from dlmtrt.models.families import FAMILIES
    names = set(FAMILIES)
    assert names >= {"dream", "llada"}
    allowed = {f"models/families/{n}.py" for n in names} | {f"runtime/families/{n}.py" for n in names}
    allowed.add("runtime/generate.py")  # the public API re-exports each family's upstream entry point
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel in allowed or "checkpoints" in path.parts:
            continue
        offenders += [f"{rel}:{line} {what}" for line, what in _names_in(path, names)]
    assert not offenders, "a family is named outside its own files:\n" + "\n".join(offenders)
