"""Decode policies: invariants of every cache policy, parallel decoding and early commit (tiny random
checkpoints, fp32, CPU), plus property tests of the plans over random decode states."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.backends import make_backend
from runtime.generate import generate_text
from runtime.policies import (NEVER, AdaptiveCache, BlockCache, DecodeState, DKVDecode, DKVGreedy, NoCache,
                              parse_policy, rows_of, window_positions)
from runtime.step import StepOutputs

PROMPTS = ["a much longer prompt here", "hi", "medium one"]
CACHED = ["decode", "decode:cache_steps=2", "greedy", "greedy:window=2,delay=1", "block", "dual", "adaptive",
          "adaptive:tol=0.5"]
MODIFIED = [p + m for p in ["none", "decode", "greedy", "dual"] for m in ["+parallel", "+early",
                                                                          "+parallel:threshold=0.5+early"]]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from models.tiny import make_tiny
    return {fam: make_backend("torch", str(make_tiny(fam, tmp_path_factory.mktemp(fam) / "ck", seed=3)))
            for fam in ("dream", "llada")}


def params(family: str, n: int = 12, **kw) -> dict:
    if family == "dream":
        return dict(max_new_tokens=n, steps=n, alg="maskgit_plus", **kw)
    return dict(gen_length=n, steps=n, block_length=n // 3, **kw)


class Recorder:
    """Wraps a backend and records what each step computed and declared stable."""

    def __init__(self, be):
        self.be, self.info, self.name, self.calls = be, be.info, be.name, []

    def new_cache(self, b, n):
        return self.be.new_cache(b, n)

    def step(self, inp) -> StepOutputs:
        self.calls.append((inp.position_ids.clone(), inp.stable_mask.clone()))
        return self.be.step(inp)


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("spec", ["decode:cache_steps=1", "greedy:cache_steps=1", "greedy:cache_steps=1,delay=1",
                                  "adaptive:cache_steps=1"])
def test_refresh_every_step_is_token_identical_to_no_cache(backends, family, spec):
    be, tok, _ = backends[family]
    ref = generate_text(be, tok, PROMPTS, **params(family))
    got = generate_text(be, tok, PROMPTS, policy=spec, **params(family))
    assert torch.equal(ref.sequences, got.sequences)
    assert got.stats.rows_computed == ref.stats.rows_computed


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("spec", ["none", *CACHED, *MODIFIED])
def test_every_policy_decodes_every_requested_token(backends, family, spec):
    be, tok, _ = backends[family]
    g = generate_text(be, tok, PROMPTS, policy=spec, **params(family))
    answer = g.sequences[:, g.prompt_length:]
    assert answer.shape[1] == 12 and not (answer == be.info.mask_token_id).any()
    s = g.stats
    assert s.new_tokens == 12 and s.forward_passes == s.steps == len(s.per_step_rows) >= 1
    assert s.rows_computed == sum(s.per_step_rows) <= s.rows_full
    assert s.seq_forward_passes <= s.forward_passes * s.batch
    if "parallel" not in spec and "early" not in spec:
        assert s.steps == 12 and s.seq_forward_passes == 12 * s.batch
    if spec in CACHED and spec != "adaptive":  # default tol 0.02: random weights' keys drift more than that
        assert s.rows_computed < s.rows_full  # the cache saved work


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("spec,refresh", [("decode:cache_steps=4", 4), ("greedy:cache_steps=3", 3),
                                          ("greedy:cache_steps=3,delay=1", 3), ("block", None), ("dual", None)])
def test_cached_decoded_rows_are_not_recomputed_until_refresh(backends, family, spec, refresh):
    be, tok, _ = backends[family]
    rec = Recorder(be)
    g = generate_text(rec, tok, PROMPTS, policy=spec, **params(family))
    B, L = g.sequences.shape
    P = g.prompt_length
    block = 4  # params(): block_length = 12 // 3
    cached = torch.zeros(B, L, dtype=torch.bool)
    for i, (pos, known) in enumerate(rec.calls):
        active = torch.zeros(B, L, dtype=torch.bool).scatter(1, pos, True)
        new_block = family == "llada" and spec in ("block", "dual") and i % block == 0
        if (refresh and i % refresh == 0) or new_block or i == 0:
            assert active[:, P:].all() or spec in ("block", "dual")
            cached[:] = False
            continue
        assert not (active & cached).any(), f"step {i} recomputed a cached row"
        stable = known & ~active
        cached |= stable & (g.sequences != be.info.mask_token_id) & (torch.arange(L) < P)  # prompt rows
    assert sum(p.numel() for p, _ in rec.calls) == g.stats.rows_computed


@pytest.mark.parametrize("family", ["dream", "llada"])
@pytest.mark.parametrize("spec", ["decode", "dual", "greedy:delay=1"])
def test_left_padded_batch_equals_each_prompt_alone(backends, family, spec):
    be, tok, _ = backends[family]
    batch = generate_text(be, tok, PROMPTS, policy=spec, **params(family))
    for b, p in enumerate(PROMPTS):
        alone = generate_text(be, tok, [p], policy=spec, **params(family))
        assert batch.texts[b] == alone.texts[0]


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_early_commit_with_loose_gap_stops_after_one_step_per_block(backends, family):
    be, tok, _ = backends[family]
    g = generate_text(be, tok, PROMPTS, policy="none+early:gaps=0.0001/0.0001/0.0001", **params(family))
    blocks = 1 if family == "dream" else 3
    assert g.stats.forward_passes == blocks
    assert g.stats.early_committed > 0 and not (g.sequences == be.info.mask_token_id).any()
    never = generate_text(be, tok, PROMPTS, policy="none+early:gaps=1/1/1", **params(family))
    ref = generate_text(be, tok, PROMPTS, **params(family))
    assert torch.equal(never.sequences, ref.sequences) and never.stats.early_committed == 0


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_parallel_threshold_bounds(backends, family):
    be, tok, _ = backends[family]
    low = generate_text(be, tok, PROMPTS, policy="none+parallel:threshold=0.0001", **params(family))
    assert low.stats.forward_passes == (1 if family == "dream" else 3)  # everything passes at once per block
    high = generate_text(be, tok, PROMPTS, policy="none+parallel:threshold=1", **params(family))
    assert high.stats.forward_passes == 12  # nothing reaches 1.0: one token per step, as many steps as tokens


def test_early_commit_threshold_schedule_loosens():
    e = parse_policy("none+early:gaps=0.9/0.8/0.7").early
    assert [e.threshold(p) for p in (0.0, 0.5, 0.9)] == [0.9, 0.8, 0.7]


@pytest.mark.parametrize("spec,msg", [("fast", "unknown cache policy 'fast'"), ("parallel", "modifiers"),
                                      ("decode+turbo", "unknown modifier 'turbo'"),
                                      ("decode:cache_steps=0", "cache_steps must be >= 1"),
                                      ("greedy:size=3", "bad options for 'greedy'"), ("decode:4", "key=value"),
                                      ("none+early:gaps=0.9/0.8", "three values"),
                                      ("none+parallel:threshold=2", "threshold must be in")])
def test_bad_policy_specs_name_the_problem(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_policy(spec)


# ---- property tests of the plans over random decode states ----

@st.composite
def states(draw):
    B, L = draw(st.integers(1, 3)), draw(st.integers(4, 24))
    P = draw(st.integers(1, L - 1))
    shift = draw(st.booleans())
    i = draw(st.integers(0, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pad = [draw(st.integers(0, P - 1)) for _ in range(B)]
    am = torch.ones(B, L, dtype=torch.bool)
    for b, n in enumerate(pad):
        am[b, :n] = False
    masked = (torch.rand(B, L, generator=g) < 0.6) & (torch.arange(L) >= P)
    decoded_at = torch.where(torch.arange(L) < P, -1, torch.randint(0, max(i, 1), (B, L), generator=g))
    decoded_at = torch.where(masked, NEVER, decoded_at)
    computed_at = torch.randint(-1, max(i, 1), (B, L), generator=g)
    valid = (torch.rand(B, L, generator=g) < 0.8) & am & (i > 0)
    needed = masked & am
    needed_rows = rows_of(needed, shift) & am
    must = needed_rows if draw(st.booleans()) else torch.zeros_like(needed_rows)
    conf = torch.where(needed, torch.rand(B, L, generator=g), torch.full((B, L), -torch.inf))
    quota = torch.minimum(needed.sum(1), torch.randint(1, 4, (B,), generator=g))
    return DecodeState(i, needed_rows, must, quota, valid, am, decoded_at, computed_at, conf, needed,
                       (P, L), shift)


POLICY_OBJECTS = [NoCache(), DKVDecode(3), DKVGreedy(2, 2, 0), DKVGreedy(3, 1, 1), BlockCache(False),
                  BlockCache(True), AdaptiveCache(0.1, 4)]


@settings(max_examples=150, deadline=None)
@given(states(), st.sampled_from(range(len(POLICY_OBJECTS))))
def test_plans_respect_the_step_contract(s, k):
    policy = POLICY_OBJECTS[k]
    active, stable = policy.plan(s)
    assert not (active & stable).any()
    assert not (stable & ~s.valid).any() and not (stable & ~s.attention_mask).any()
    assert not (s.must_rows & ~active).any()  # rows the rule cannot do without are computed
    if not isinstance(policy, (NoCache, DKVGreedy)):
        assert not (s.needed_rows & ~active).any()
    if not isinstance(policy, NoCache):
        assert not (active & ~s.attention_mask).any()  # padding is never computed
    assert not (~s.valid & s.attention_mask & ~active).any()  # rows without valid K/V are computed
    if isinstance(policy, DKVDecode):
        assert not (stable & (s.computed_at <= s.decoded_at)).any()  # only rows recomputed after decoding


@settings(max_examples=150, deadline=None)
@given(states(), st.integers(0, 4))
def test_window_holds_the_expected_next_positions(s, window):
    pos = window_positions(s.masked, s.confidence, s.quota, window)
    assert not (pos & ~s.masked).any()
    for b in range(pos.shape[0]):
        n = int(s.masked[b].sum())
        if n == 0:
            assert not pos[b].any()
            continue
        q = max(1, min(int(s.quota[b]), n))
        top = torch.topk(s.confidence[b].masked_fill(~s.masked[b], -torch.inf), q).values.min()
        assert pos[b][s.confidence[b] > top].all() or q == n
        assert q <= int(pos[b].sum()) <= min(n, q * (window + 1))
