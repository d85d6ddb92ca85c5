"""SDAR (block diffusion) as its authors' `block_diffusion_generate` defines it: every case their code produced on
the tiny checkpoint (tests/fixtures/upstream/sdar/) token-identical, with the same forward passes over the same
rows and, where recorded, the same logits; batched generation equal to each prompt alone; the refusals of what
upstream cannot run; the append-only cache equal to recomputing every row."""
from __future__ import annotations

import dataclasses
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from dlmtrt.errors import UsageError
from dlmtrt.models.loading import load
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.contract import StepInputs, StepOutputs
from dlmtrt.runtime.generate import sdar_generate

FIX = Path(__file__).resolve().parent / "fixtures" / "upstream" / "sdar"


@cache
def suite() -> dict:
    return json.loads((FIX / "sdar.json").read_text())


def _runs(case: dict) -> bool:
    """Cases we run: upstream's output, except `entropy_bounded` with nothing to denoise (gen_length 0), which
    upstream returns before reaching its broken branch and we refuse with the strategy."""
    return "output" in case and case["upstream"].get("remasking_strategy") != "entropy_bounded"


def _cases(runs: bool) -> list:
    return [pytest.param(c, id=c["name"]) for c in suite()["cases"] if _runs(c) == runs]


class Recording:
    """A backend wrapper that keeps, per step, the rows computed and their logits."""

    selects_logit_rows = False
    shares_cache = False

    def __init__(self, backend):
        self.inner, self.info, self.name = backend, backend.info, backend.name
        self.rows: list[list[int]] = []
        self.logits: list[np.ndarray] = []

    def new_cache(self, batch, length):
        return self.inner.new_cache(batch, length)

    def step(self, s: StepInputs) -> StepOutputs:
        out = self.inner.step(s)
        self.rows.append(sorted(set(s.position_ids[0].tolist())))
        self.logits.append(out.logits.float().numpy().copy())
        return out


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    model, tok, _ = load(str(FIX / "ckpt-sdar"), dtype="float32", device="cpu")
    return TorchBackend(model), tok


@pytest.fixture(scope="module")
def logits():
    return np.load(FIX / "sdar-logits.npz")


def upstream_kwargs(case: dict) -> dict:
    kw = {k: v for k, v in case["upstream"].items() if k != "mask_id"}
    if kw.get("stopping_criteria_idx") is not None:
        kw["stopping_criteria_idx"] = tuple(kw["stopping_criteria_idx"])
    return kw


def run(backend, case: dict, policy: str = "append"):
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])
    return sdar_generate(backend, torch.tensor(case["input_ids"]), None, policy=policy, **upstream_kwargs(case))


@pytest.mark.parametrize("case", _cases(True))
def test_token_identical_to_upstream(case, backend, logits):
    rec = Recording(backend[0])
    x, stats = run(rec, case, policy="append:store=separate")
    assert x.tolist() == case["output"], f"{case['name']}: tokens differ from upstream"
    assert stats.forward_passes == case["forward_calls"] == len(case["rows"])
    for k, (ours, call) in enumerate(zip(rec.rows, case["rows"])):
        assert ours == sorted(set(call[0])), f"{case['name']}: step {k} computed rows {ours}, upstream {call[0]}"
    if case.get("logits"):
        for k, got in enumerate(rec.logits):
            ref = logits[f"{case['name']}/{k}"]
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0), f"{case['name']}: call {k}"


def upstream_calls(case: dict) -> tuple[list[int], list[int]]:
    """Upstream's (prefill, denoising) calls: its calls come in runs over the same rows (a block's denoising steps,
    then its store pass); a run of one is the prompt's prefill, the last call of a longer run the store."""
    rows = [sorted(set(c[0])) for c in case["rows"]]
    runs, start = [], 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k] != rows[start]:
            runs.append(range(start, k))
            start = k
    return ([r[0] for r in runs if len(r) == 1], [k for r in runs if len(r) > 1 for k in list(r)[:-1]])


@pytest.mark.parametrize("case", _cases(True))
def test_the_fused_store_is_upstream_with_a_pass_less_per_block(case, backend, logits):
    """The default append cache stores a finished block in the next block's first pass: the same tokens, and the
    same logits at every denoising step, with no store pass of its own (and none after the last block)."""
    rec = Recording(backend[0])
    x, stats = run(rec, case)
    assert x.tolist() == case["output"], f"{case['name']}: tokens differ from upstream"
    pre, den = upstream_calls(case)
    assert pre in ([], [0])
    prefill = len(pre)
    assert stats.forward_passes == len(den) + prefill
    assert stats.forward_passes < case["forward_calls"]
    ours = rec.logits[prefill:]
    for k, (got, call) in enumerate(zip(ours, den)):
        n = len(sorted(set(case["rows"][call][0])))
        assert rec.rows[prefill + k][-n:] == sorted(set(case["rows"][call][0]))
        if case.get("logits"):
            ref = logits[f"{case['name']}/{call}"]
            assert np.abs(got[:, -n:] - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1.0), f"{case['name']}: {k}"


@pytest.mark.parametrize("case", _cases(False))
def test_what_upstream_cannot_run_is_refused(case, backend):
    with pytest.raises(UsageError) as e:
        run(backend[0], case)
    assert case.get("upstream_error") or case["upstream"]["gen_length"] == 0  # upstream raised, or did nothing
    assert any(w in str(e.value) for w in ("temperature 0", "entropy_bounded", "gen_length")), str(e.value)


def test_no_reuse_recomputes_every_row_with_the_same_tokens(backend):
    picked = [c for c in suite()["cases"] if _runs(c)][::17]
    for case in picked:
        x, st = run(backend[0], case, policy="none")
        assert x.tolist() == case["output"], case["name"]
        _, cached = run(backend[0], case)
        assert cached.rows_computed < st.rows_computed


@pytest.mark.parametrize("strategy", ["low_confidence_static", "low_confidence_dynamic", "sequential"])
@pytest.mark.parametrize("block,steps", [(4, 4), (4, 2), (8, 3)])
def test_a_batch_decodes_as_each_prompt_alone(backend, strategy, block, steps):
    """Left padding moves no block boundary: prompts of lengths that differ modulo the block decode in one batch
    exactly as alone (top_k=1, where the random draws decide nothing), stop ids included."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 250, (n,), generator=g) for n in (3, 4, 8, 11)]
    kw = dict(gen_length=16, block_length=block, denoising_steps=steps, top_k=1, remasking_strategy=strategy,
              stopping_criteria_idx=(258, 256))
    alone = [sdar_generate(backend[0], p[None], None, **kw)[0][0] for p in prompts]
    P = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.full((P - len(p),), 256), p]) for p in prompts])
    am = torch.stack([torch.arange(P) >= P - len(p) for p in prompts]).long()
    batched, _ = sdar_generate(backend[0], ids, am, **kw)
    for b, (p, x) in enumerate(zip(prompts, alone)):
        row = batched[b, P - len(p):]
        assert row[:len(x)].tolist() == x.tolist(), (b, len(p))
        assert (row[len(x):] == 259).all()  # a shorter canvas: the rest of the row stays masked


def test_the_checkpoints_defaults_are_generate_pys(backend):
    from dlmtrt.runtime.params import family_params
    p = family_params("sdar", FIX / "ckpt-sdar")
    assert (p["temperature"], p["top_k"], p["top_p"]) == (0.6, 20, 0.95)  # generation_config.json
    assert (p["block_length"], p["denoising_steps"]) == (4, 4) and p["stopping_criteria_idx"] == (258, 256)
    assert p["remasking_strategy"] == "low_confidence_dynamic" and p["confidence_threshold"] == 0.85


def test_answers_end_at_any_stop_id(backend):
    from dlmtrt.runtime.generate import generate_text
    be, tok = backend
    out = generate_text(be, tok, ["hello", "a"], gen_length=16, block_length=4, denoising_steps=4, top_k=1,
                        remasking_strategy="low_confidence_static", stopping_criteria_idx=(258, 256),
                        policy="append")
    for text, row in zip(out.texts, out.sequences):
        answer = row[out.prompt_length:].tolist()
        ends = [answer.index(i) for i in (258, 256) if i in answer]
        expected = tok.decode(answer[:min(ends)] if ends else answer, skip_special_tokens=True)
        assert text == expected


def test_the_store_option_is_checked():
    from dlmtrt.runtime.policies import PolicyError, parse_policy
    assert parse_policy("append").rule_options() == {"exact_ties": False, "scoped": True, "fuse_store": True}
    assert parse_policy("append:store=separate").rule_options() == {"exact_ties": False, "scoped": True}
    with pytest.raises(PolicyError, match="store must be fused or separate"):
        parse_policy("append:store=later")


class MaskAt(Recording):
    """Makes the mask id the top logit of every row from one step on: the samples leave their rows masked."""

    def __init__(self, backend, at: int):
        super().__init__(backend)
        self.at = at

    def step(self, s: StepInputs) -> StepOutputs:
        out = self.inner.step(s)
        if len(self.rows) >= self.at:
            logits = out.logits.clone()
            logits[..., self.info.mask_token_id] = 1e4
            out = dataclasses.replace(out, logits=logits)
        self.rows.append([])
        return out


@pytest.mark.parametrize("strategy", ["low_confidence_static", "sequential", "low_confidence_dynamic"])
def test_a_block_left_masked_after_its_steps_is_refused(backend, strategy):
    """A sampled mask id leaves its row masked; after the block's last step upstream fails, and so do we, whether
    the host predicted the block's steps or read every one back."""
    kw = dict(gen_length=8, block_length=4, denoising_steps=4, top_k=1, remasking_strategy=strategy)
    prompt = torch.arange(8)[None]
    with pytest.raises(UsageError, match="still has masks after its denoising steps"):
        sdar_generate(MaskAt(backend[0], at=1), prompt, None, **kw)  # from the first denoising step on


@pytest.mark.parametrize("strategy,per_block", [("low_confidence_static", True), ("sequential", True),
                                                ("low_confidence_dynamic", False)])
def test_the_host_reads_back_once_per_block_where_the_schedule_is_known(backend, strategy, per_block):
    """Static and sequential remasking commit a known share per step: the rule reads the device back at the
    first step and where a block ends (a stop or the next block is decided there), and the append cache's row
    count needs no read-back in between; the dynamic threshold reads back every step. Tokens are the same."""
    from dlmtrt.runtime.families.sdar import FAMILY
    from dlmtrt.runtime.policies import parse_policy
    kw = dict(gen_length=16, block_length=4, denoising_steps=4, top_k=1, remasking_strategy=strategy)
    prompt = torch.arange(8)[None]
    session = FAMILY.session(backend[0], prompt, None, FAMILY.params(**kw).validate().to_dict(),
                             parse_policy("append"))
    hinted = 0
    while not session.done:
        session.step()
        hinted += session.rule.known_rows is not None
    assert session.x.tolist() == sdar_generate(backend[0], prompt, None, policy="none", **kw)[0].tolist()
    blocks = 16 // 4
    if per_block:
        assert session.rule.read_backs == blocks + 1  # the prefill, then each block's end
        assert hinted == session.stats.steps - session.rule.read_backs + 1
    else:
        assert session.rule.read_backs == session.stats.steps + 1 and hinted == 0


def test_greedy_decoding_defaults_to_the_block_the_model_was_trained_for():
    from dlmtrt.runtime.params import greedy_params
    assert greedy_params("sdar", 32, attention="block_causal:16")["block_length"] == 16
    assert greedy_params("sdar", 32, attention="block_causal:16")["denoising_steps"] == 16
    assert greedy_params("sdar", 32, attention="block_causal:16", block_length=8)["block_length"] == 8
    assert greedy_params("sdar", 32, attention="block_causal:16", blocks=4)["block_length"] == 8
    assert greedy_params("sdar", 32)["block_length"] == 4
    assert greedy_params("llada", 32, attention="bidirectional") == greedy_params("llada", 32)
