"""`DecodeSession.keep`: a server drops answered sequences from a running batch. The sequences that stay must
decode exactly the tokens they decode in the full batch (float32), under every kind of per-sequence state a
session carries: LLaDA's per-block transfer counts and classifier-free guidance, Dream's parallel decoding
counters, a policy's memory (`adaptive`'s calm rows), dual-cache blocks, SDAR's per-sequence block state."""
from __future__ import annotations

import pytest
import torch

from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.families import get as get_family
from dlmtrt.runtime.policies import parse_policy

PROMPTS = ["sudoku\n0120\n4231\n2000\n", "countdown 3 5 7 -> 22\n", "sudoku\n1000\n0300\n", "hello there\n"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from click.testing import CliRunner

    from dlmtrt.cli import main
    sdar = tmp_path_factory.mktemp("sdar") / "ckpt"
    r = CliRunner().invoke(main, ["make-tiny", "--arch", "sdar", "--out", str(sdar), "--seed", "5"])
    assert r.exit_code == 0, r.output
    return {**{f: make_backend("torch", f"tiny-{f}-tasks")[:2] for f in ("dream", "llada")},
            "sdar": make_backend("torch", str(sdar))[:2]}


def session(models, family: str, params: dict, policy: str):
    be, tok = models[family]
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    fam = get_family(family)
    return fam.session(be, enc["input_ids"], enc["attention_mask"], fam.params(**params).validate().to_dict(),
                       parse_policy(policy))


CASES = [
    ("dream", dict(max_new_tokens=16, steps=16, temperature=0.0, alg="entropy"), "decode"),
    ("dream", dict(max_new_tokens=16, steps=16, temperature=0.0, alg="entropy"), "pd"),
    ("dream", dict(max_new_tokens=16, steps=16, temperature=0.0, alg="entropy"), "adaptive:cache_steps=4"),
    ("dream", dict(max_new_tokens=16, steps=8, temperature=0.0, alg="maskgit_plus"), "none+parallel:threshold=0.5"),
    ("dream", dict(max_new_tokens=16, steps=16, temperature=0.0, alg="entropy", block_length=8), "dual"),
    ("llada", dict(gen_length=16, steps=16, block_length=4, temperature=0.0), "dual"),
    ("llada", dict(gen_length=16, steps=16, block_length=8, temperature=0.0, cfg_scale=1.0), "none"),
    ("llada", dict(gen_length=16, steps=16, block_length=16, temperature=0.0), "none+parallel:threshold=0.5"),
    ("sdar", dict(gen_length=16, block_length=4, denoising_steps=4, top_k=1,
                  remasking_strategy="low_confidence_dynamic", confidence_threshold=0.05), "append"),
    ("sdar", dict(gen_length=16, block_length=8, denoising_steps=2, top_k=1,
                  remasking_strategy="sequential"), "append"),
]


@pytest.mark.parametrize("family,params,policy", CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
@torch.inference_mode()
def test_kept_rows_decode_as_in_the_full_batch(models, family, params, policy):
    full = session(models, family, params, policy)
    while not full.done:
        full.step()
    cut = session(models, family, params, policy)
    for _ in range(3):
        cut.step()
    cut.keep([3, 1])  # reordered on purpose: row k of the session is the k-th kept row from now on
    assert cut.x.shape[0] == 2 and cut.cache.keys[0].shape[0] == (4 if params.get("cfg_scale") else 2)
    while not cut.done:
        cut.step()
    assert torch.equal(cut.x, full.x[[3, 1]])
    assert cut.stats.rows_computed < full.stats.rows_computed


def test_keep_refuses_rows_outside_the_batch(models):
    s = session(models, "dream", CASES[0][1], "decode")
    for bad in ([], [0, 0], [4], [-1]):
        with pytest.raises(ValueError, match="distinct rows"):
            s.keep(bad)
