"""Sanity tests of the reference oracles themselves (tests/reference_dream.py, tests/reference_llada.py).

They use a fake `forward` with fixed logits: position n favours token `favoured(n)` with a strength that grows
with n, so every confidence is distinct and the expected outcome can be worked out by hand.
"""
from __future__ import annotations

import pytest
import torch

from reference_dream import dream_reference_generate, prepare_dream_masks
from reference_llada import llada_num_transfer_tokens, llada_reference_generate

V = 40
MASK = V - 1


def favoured(n: int) -> int:
    return 1 + (n * 7) % (V - 3)  # never 0, never MASK


def fixed_logits(batch: int, length: int) -> torch.Tensor:
    logits = torch.zeros(batch, length, V)
    for n in range(length):
        logits[:, n, favoured(n)] = 2.0 + 0.25 * n
    return logits


class Recorder:
    """Fake model: returns `fixed_logits` and keeps a copy of every input it was given."""

    def __init__(self):
        self.xs: list[torch.Tensor] = []
        self.masks: list[object] = []
        self.tok_idx: list[torch.Tensor | None] = []

    def dream(self, x, attention_mask, tok_idx):
        self.xs.append(x.clone())
        self.masks.append(attention_mask)
        self.tok_idx.append(tok_idx)
        return fixed_logits(*x.shape)

    def llada(self, x):
        self.xs.append(x.clone())
        return fixed_logits(*x.shape)


def prompt(batch: int = 1, length: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(1, MASK, (batch, length), generator=g)


# --------------------------------------------------------------------------------------------------- Dream


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_dream_fills_every_mask_and_keeps_prompt(alg):
    p = prompt(2, 5)
    rec = Recorder()
    out = dream_reference_generate(rec.dream, p, max_new_tokens=12, steps=6, alg=alg, mask_token_id=MASK)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :5], p)
    assert not (out == MASK).any()
    # logits are shifted right by one: position n gets the token favoured at n - 1
    expected = torch.tensor([favoured(n - 1) for n in range(5, 17)])
    assert torch.equal(out[:, 5:], expected.expand(2, -1))
    assert len(rec.xs) == 6  # no early exit
    assert all(m == "full" and t is None for m, t in zip(rec.masks, rec.tok_idx))


def _expected_dream_transfers(num_masks: int, steps: int, eps: float) -> list[int]:
    """The upstream schedule computed independently in float64 Python arithmetic."""
    ts = [1 + k * (eps - 1) / steps for k in range(steps + 1)]
    left, out = num_masks, []
    for i in range(steps):
        k = int(left * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else left
        out.append(k)
        left -= k
    return out


@pytest.mark.parametrize("new,steps", [(16, 5), (24, 7), (10, 10), (9, 13)])
def test_dream_maskgit_schedule(new, steps):
    rec = Recorder()
    out = dream_reference_generate(rec.dream, prompt(1, 4), max_new_tokens=new, steps=steps,
                                   alg="maskgit_plus", temperature=0.0, mask_token_id=MASK)
    counts = [int((x == MASK).sum()) for x in rec.xs] + [int((out == MASK).sum())]
    transferred = [a - b for a, b in zip(counts[:-1], counts[1:])]
    assert counts[0] == new
    assert transferred == _expected_dream_transfers(new, steps, 1e-3)
    assert counts[-1] == 0
    assert len(rec.xs) == steps


def test_dream_maskgit_commits_most_confident_first():
    rec = Recorder()
    dream_reference_generate(rec.dream, prompt(1, 3), max_new_tokens=8, steps=8, alg="maskgit_plus",
                             mask_token_id=MASK)
    # confidence grows with position (after the shift too), so the canvas fills from the right
    for x in rec.xs:
        gen = x[0, 3:] == MASK
        n_masked = int(gen.sum())
        assert gen[:n_masked].all() and not gen[n_masked:].any()


def test_dream_padded_batch_masks_and_positions():
    p = prompt(2, 4)
    am = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    rec = Recorder()
    out = dream_reference_generate(rec.dream, p, am, max_new_tokens=6, steps=3, alg="maskgit_plus",
                                   mask_token_id=MASK)
    assert torch.equal(out[:, :4], p)
    mask4d, tok_idx = rec.masks[0], rec.tok_idx[0]
    assert mask4d.dtype == torch.bool and mask4d.shape == (2, 1, 10, 10)
    assert torch.equal(tok_idx[0], torch.tensor([1, 1, 0, 1, 2, 3, 4, 5, 6, 7]))
    assert torch.equal(tok_idx[1], torch.arange(10))
    valid0 = torch.tensor([False, False] + [True] * 8)
    assert torch.equal(mask4d[0, 0], valid0[:, None] & valid0[None, :])
    assert mask4d[1].all()
    # an all-ones mask is treated like no mask at all
    assert prepare_dream_masks(torch.ones(2, 4, dtype=torch.long), 10) == ("full", None)
    assert prepare_dream_masks(None, 10) == ("full", None)


def test_dream_batch_average_budget_quirk():
    """Rows with different mask counts share one budget, int(mean); the row with more masks keeps one."""
    p = prompt(2, 4)
    p[0, 1] = MASK  # row 0: 1 + 12 masks, row 1: 12 masks -> mean 12.5
    rec = Recorder()
    out = dream_reference_generate(rec.dream, p, max_new_tokens=12, steps=4, alg="maskgit_plus",
                                   mask_token_id=MASK)
    steps, eps = 4, 1e-3
    ts = [1 + k * (eps - 1) / steps for k in range(steps + 1)]
    snaps = rec.xs + [out]
    for i, (a, b) in enumerate(zip(snaps[:-1], snaps[1:])):
        before = (a == MASK).sum(1)
        mean = float(before.sum()) / 2
        budget = int(mean * (1 - ts[i + 1] / ts[i])) if i < steps - 1 else int(mean)
        per_row = before - (b == MASK).sum(1)
        assert per_row.tolist() == [budget, budget]
    assert int((out[0] == MASK).sum()) == 1
    assert int((out[1] == MASK).sum()) == 0


def test_dream_origin_last_step_transfers_everything():
    """origin: p_transfer is forced to 1 on the last step, whatever eps leaves for 1 - s / t."""
    for steps in (1, 2):
        out = dream_reference_generate(Recorder().dream, prompt(1, 4), max_new_tokens=12, steps=steps, eps=0.9,
                                       alg="origin", mask_token_id=MASK)
        assert not (out == MASK).any()


def test_dream_rng_use():
    p = prompt(1, 4)
    rec = Recorder()
    state = torch.get_rng_state()
    dream_reference_generate(rec.dream, p, max_new_tokens=8, steps=4, alg="maskgit_plus", mask_token_id=MASK)
    assert torch.equal(state, torch.get_rng_state()), "greedy maskgit_plus must not draw random numbers"
    dream_reference_generate(rec.dream, p, max_new_tokens=8, steps=4, alg="origin", mask_token_id=MASK)
    assert not torch.equal(state, torch.get_rng_state()), "origin draws torch.rand every step"


@pytest.mark.parametrize("kw", [dict(alg="origin", temperature=0.7, top_p=0.9),
                                dict(alg="maskgit_plus", temperature=1.0, top_k=3),
                                dict(alg="entropy", alg_temp=0.5, temperature=0.5)])
def test_dream_sampling_is_seed_deterministic(kw):
    p = prompt(2, 4)
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        outs.append(dream_reference_generate(Recorder().dream, p, max_new_tokens=10, steps=5,
                                             mask_token_id=MASK, **kw))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :4], p)
    assert not (outs[0] == MASK).any()


def test_dream_rejects_zero_new_tokens():
    with pytest.raises(ValueError):
        dream_reference_generate(Recorder().dream, prompt(1, 4), max_new_tokens=0, steps=2, mask_token_id=MASK)


# --------------------------------------------------------------------------------------------------- LLaDA


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_fills_every_mask_and_keeps_prompt(remasking):
    p = prompt(2, 5)
    rec = Recorder()
    out = llada_reference_generate(rec.llada, p, steps=8, gen_length=16, block_length=4, remasking=remasking,
                                   mask_id=MASK)
    assert out.shape == (2, 21)
    assert torch.equal(out[:, :5], p)
    assert not (out == MASK).any()
    expected = torch.tensor([favoured(n) for n in range(5, 21)])  # no shift for LLaDA
    assert torch.equal(out[:, 5:], expected.expand(2, -1))
    assert len(rec.xs) == 8


@pytest.mark.parametrize("steps,gen,block", [(8, 16, 4), (12, 12, 6), (5, 10, 10), (6, 12, 4)])
def test_llada_blocks_left_to_right(steps, gen, block):
    P = 3
    rec = Recorder()
    out = llada_reference_generate(rec.llada, prompt(1, P), steps=steps, gen_length=gen, block_length=block,
                                   mask_id=MASK)
    assert len(rec.xs) == steps
    per_block = steps // (gen // block)
    snaps = rec.xs + [out]
    for c, x in enumerate(rec.xs):
        b = c // per_block
        lo, hi = P + b * block, P + (b + 1) * block
        assert (x[0, hi:] == MASK).all(), f"call {c}: token committed beyond block {b}"
        assert not (x[0, P:lo] == MASK).any(), f"call {c}: earlier block not finished"
        # what this step commits lies inside the current block, in the amount get_num_transfer_tokens says
        committed = (x[0] == MASK) & (snaps[c + 1][0] != MASK)
        assert not committed[:lo].any() and not committed[hi:].any()
        n_block_masks = int((rec.xs[b * per_block][0, lo:hi] == MASK).sum())
        sched = llada_num_transfer_tokens(torch.ones(1, n_block_masks, dtype=torch.bool), per_block)
        assert int(committed.sum()) == int(sched[0, c % per_block])
    assert not (out == MASK).any()


def test_llada_num_transfer_tokens():
    m = torch.zeros(2, 10, dtype=torch.bool)
    m[0, :7] = True
    m[1, :] = True
    assert llada_num_transfer_tokens(m, 3).tolist() == [[3, 2, 2], [4, 3, 3]]


def test_llada_cfg_batch_and_prompt_masking():
    B, P = 2, 4
    p = prompt(B, P)
    rec = Recorder()
    out = llada_reference_generate(rec.llada, p, steps=4, gen_length=8, block_length=4, cfg_scale=1.5,
                                   mask_id=MASK)
    assert len(rec.xs) == 4
    for x in rec.xs:
        assert x.shape == (2 * B, P + 8)
        cond, uncond = x[:B], x[B:]
        assert torch.equal(cond[:, :P], p)
        assert (uncond[:, :P] == MASK).all()
        assert torch.equal(cond[:, P:], uncond[:, P:])
    assert out.shape == (B, P + 8)
    assert torch.equal(out[:, :P], p)
    assert not (out == MASK).any()


def test_llada_cfg_combines_logits():
    """logits = un + (s + 1) * (cond - un): the guided choice follows the conditional row."""
    P = 3

    def forward(x):
        logits = torch.zeros(*x.shape, V)
        half = x.shape[0] // 2
        logits[:half, :, 5] = 3.0   # conditional favours 5
        logits[:half, :, 6] = 2.9
        logits[half:, :, 6] = 3.0   # unconditional favours 6
        return logits

    out = llada_reference_generate(forward, prompt(1, P), steps=2, gen_length=4, block_length=4, cfg_scale=0.5,
                                   mask_id=MASK)
    assert (out[0, P:] == 5).all()


def test_llada_rng_use_and_determinism():
    p = prompt(1, 4)
    state = torch.get_rng_state()
    llada_reference_generate(Recorder().llada, p, steps=4, gen_length=8, block_length=4, mask_id=MASK)
    assert torch.equal(state, torch.get_rng_state()), "temperature 0 + low_confidence must not draw"
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        outs.append(llada_reference_generate(Recorder().llada, p, steps=4, gen_length=8, block_length=4,
                                             temperature=1.0, remasking="random", mask_id=MASK))
    assert not torch.equal(state, torch.get_rng_state())
    assert torch.equal(outs[0], outs[1])
    assert not (outs[0] == MASK).any()
