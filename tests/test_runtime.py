"""The denoising loop and the generation entry points on tiny random checkpoints (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.decode import pack_rows
from dlmtrt.runtime.generate import dream_generate, generate_text, llada_generate
from dlmtrt.runtime.families.dream import DreamParams
from dlmtrt.runtime.policies import Policy
from dlmtrt.runtime.families.llada import LLaDAParams
from dlmtrt.runtime.unmasking import DreamRule, LLaDARule, num_transfer_tokens


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from dlmtrt.models.tiny import make_tiny
    out = {}
    for fam in ("dream", "llada"):
        out[fam] = make_backend("torch", str(make_tiny(fam, tmp_path_factory.mktemp(fam) / "ck", seed=3)))
    return out


def test_pack_rows_lists_active_slots_and_pads_with_last():
    active = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert pack_rows(active).tolist() == [[1, 2, 4], [0, 0, 0]]


def test_num_transfer_tokens_distributes_remainder_first():
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, :7] = True
    m[1, :] = True
    assert num_transfer_tokens(m, 3).tolist() == [[3, 2, 2], [4, 3, 3]]


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_fills_every_mask_and_keeps_prompt(backends, alg):
    be, tok, ck = backends["dream"]
    ids = torch.randint(0, 200, (2, 7))
    x, st = dream_generate(be, ids, max_new_tokens=12, steps=5, alg=alg)
    assert torch.equal(x[:, :7], ids)
    assert not (x == ck.args.mask_token_id).any()
    assert st.steps == st.forward_passes == 5
    assert st.rows_computed == 5 * 2 * 19 and st.rows_fraction == 1.0


def test_dream_steps_commit_schedule(backends):
    """maskgit_plus commits int(n * (1 - s/t)) of the remaining masks per step, all at the last one."""
    be, _, ck = backends["dream"]
    ids = torch.randint(0, 200, (1, 4))
    seen = []

    class Spy(Policy):
        name = "spy"

        def plan(self, s):
            seen.append(int(s.needed_rows.sum()))
            return torch.ones_like(s.needed_rows), torch.zeros_like(s.needed_rows)
    rule = DreamRule(ck.args.mask_token_id, DreamParams(steps=4, alg="maskgit_plus"))
    dream_generate(be, ids, max_new_tokens=20, steps=4, alg="maskgit_plus", temperature=0.0, policy=Spy())
    remaining, expect = 20, []
    for i in range(4):
        expect.append(remaining)
        t, s = rule.timesteps[i], rule.timesteps[i + 1]
        remaining -= remaining if i == 3 else int(remaining * (1 - s / t))
    assert seen == expect  # needed rows = masked positions (shifted), counted before each step


def test_llada_blocks_are_decoded_left_to_right(backends):
    be, _, ck = backends["llada"]
    mask = ck.args.mask_token_id
    ids = torch.randint(0, 200, (1, 5))
    states = []
    x, st = llada_generate(be, ids, steps=6, gen_length=12, block_length=4,
                           on_step=lambda i, n: states.append(i))
    assert st.steps == 6 and states == list(range(1, 7))
    assert not (x == mask).any() and torch.equal(x[:, :5], ids)


def test_llada_block_order_with_spy(backends):
    be, _, ck = backends["llada"]
    mask = ck.args.mask_token_id
    ids = torch.randint(0, 200, (1, 5))
    rule = LLaDARule(LLaDAParams(steps=6, gen_length=12, block_length=4), prompt_length=5)
    x = torch.nn.functional.pad(ids, (0, 12), value=mask)
    from dlmtrt.runtime.decode import denoise
    snapshots = []
    orig = rule.commit

    def commit(i, x_, preds, rows, seq):
        new = orig(i, x_, preds, rows, seq)
        snapshots.append(new.clone())
        return new
    rule.commit = commit
    denoise(be, x, torch.ones_like(x, dtype=torch.bool), rule)
    for i, snap in enumerate(snapshots):
        end = 5 + (i // 2 + 1) * 4
        assert (snap[:, end:] == mask).all()  # nothing beyond the current block
        if i % 2 == 1:
            assert not (snap[:, :end] == mask).any()  # the block is complete when its steps end


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_batch_with_left_padding_equals_each_prompt_alone(backends, family):
    be, tok, _ = backends[family]
    prompts = ["a much longer prompt here", "hi", "medium one"]
    params = (dict(max_new_tokens=10, steps=10, alg="entropy", temperature=0.0) if family == "dream"
              else dict(gen_length=10, steps=10, block_length=5))
    batch = generate_text(be, tok, prompts, **params)
    P = batch.prompt_length
    for b, p in enumerate(prompts):
        alone = generate_text(be, tok, [p], **params)
        assert torch.equal(batch.sequences[b, P:], alone.sequences[0, alone.prompt_length:])
        assert batch.texts[b] == alone.texts[0]


def test_llada_cfg_runs_unconditional_copy(backends):
    be, _, ck = backends["llada"]
    ids = torch.randint(0, 200, (1, 6))
    x0, s0 = llada_generate(be, ids, steps=4, gen_length=8, block_length=8)
    x1, s1 = llada_generate(be, ids, steps=4, gen_length=8, block_length=8, cfg_scale=2.0)
    assert s1.rows_computed == 2 * s0.rows_computed
    assert not (x1 == ck.args.mask_token_id).any()


def test_llada_cfg_combines_logits_like_reference(backends):
    """un + (s+1)(cond - un): with scale 0 the guided path must give the plain result."""
    be, _, _ = backends["llada"]
    ids = torch.randint(0, 200, (2, 6))
    a, _ = llada_generate(be, ids, steps=4, gen_length=8, block_length=4)
    b, _ = llada_generate(be, ids, steps=4, gen_length=8, block_length=4, cfg_scale=1e-9)
    assert torch.equal(a, b)


def test_decode_answer_stops_at_eos(backends):
    from dlmtrt.runtime.generate import decode_answer
    _, tok, ck = backends["dream"]
    ids = tok("abc")["input_ids"] + [ck.args.eos_token_id] + tok("zzz")["input_ids"]
    assert decode_answer(tok, torch.tensor(ids), ck.args.eos_token_id) == "abc"


@pytest.mark.parametrize("kw,msg", [
    (dict(alg="greedy"), "unknown alg"),
    (dict(steps=0), "steps must be"),
    (dict(top_k=0), "top_k must be"),
    (dict(block_length=3), "multiple of block_length"),
    (dict(eps=1.5), "eps must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(max_new_tokens=5000), "exceeds the model"),
])
def test_dream_bad_parameters(backends, kw, msg):
    be, _, ck = backends["dream"]
    args = dict(max_new_tokens=8, steps=4, max_positions=ck.args.max_position_embeddings) | kw
    with pytest.raises(ValueError, match=msg):
        dream_generate(be, torch.zeros(1, 3, dtype=torch.long), **args)


@pytest.mark.parametrize("kw,msg", [
    (dict(block_length=5), "multiple of block_length"),
    (dict(steps=3), "multiple of the number of blocks"),
    (dict(remasking="oracle"), "unknown remasking"),
])
def test_llada_bad_parameters(backends, kw, msg):
    be, _, _ = backends["llada"]
    args = dict(steps=4, gen_length=8, block_length=4) | kw
    with pytest.raises(ValueError, match=msg):
        llada_generate(be, torch.zeros(1, 3, dtype=torch.long), **args)


def test_generate_text_rejects_other_family_parameters_and_mask_in_prompt(backends):
    be, tok, _ = backends["llada"]
    with pytest.raises(ValueError, match="does not take alg"):
        generate_text(be, tok, ["x"], gen_length=4, steps=4, block_length=4, alg="entropy")
    with pytest.raises(ValueError, match="mask token"):
        generate_text(be, tok, ["x<|mdm_mask|>"], gen_length=4, steps=4, block_length=4)
    with pytest.raises(ValueError, match="no prompt"):
        generate_text(be, tok, [], gen_length=4, steps=4, block_length=4)
