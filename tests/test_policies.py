"""Decode policies: invariants of every cache policy, parallel decoding and early commit (tiny random
checkpoints, fp32, CPU), plus property tests of the plans over random decode states. Row-for-row and
token-for-token identity with the authors' code is tests/test_upstream_fixtures.py."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.generate import dream_generate, generate_text, llada_generate
from dlmtrt.runtime.policies import (NEVER, AdaptiveCache, BlockCache, DecodeState, DelayedCache, DKVDecode, DKVGreedy,
                              DKVPD, DKVPrefill, NoCache, dream_cached_rows, parse_policy, rows_of, window_tokens)
from dlmtrt.runtime.contract import StepOutputs

PROMPTS = ["a much longer prompt here", "hi", "medium one"]
CACHED = {"dream": ["decode", "decode:cache_steps=2,shift=un_right", "decode:shift=right", "prefill", "pd",
                    "pd:cache_steps=2,shift=un_right", "block", "dual", "adaptive", "adaptive:tol=0.5", "delayed"],
          "llada": ["decode", "decode:cache_steps=2", "block", "dual", "adaptive", "adaptive:tol=0.5", "delayed"]}
MODIFIED = [p + m for p in ["none", "decode", "delayed", "dual"] for m in ["+parallel", "+early",
                                                                          "+parallel:threshold=0.5+early"]]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from dlmtrt.models.tiny import make_tiny
    return {fam: make_backend("torch", str(make_tiny(fam, tmp_path_factory.mktemp(fam) / "ck", seed=3)))
            for fam in ("dream", "llada")}


def params(family: str, n: int = 12, **kw) -> dict:
    if family == "dream":
        return {**dict(max_new_tokens=n, steps=n, alg="maskgit_plus", temperature=0.0), **kw}
    return {**dict(gen_length=n, steps=n, block_length=n // 3), **kw}


@settings(max_examples=30, deadline=None)
@given(family=st.sampled_from(["dream", "llada"]), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       new=st.sampled_from([4, 6, 8, 12]), steps_div=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       alg=st.sampled_from(["maskgit_plus", "topk_margin", "entropy"]), blocks=st.sampled_from([1, 2]),
       spec=st.sampled_from(["decode:cache_steps=1", "decode:cache_steps=1,shift=right", "adaptive:cache_steps=1",
                             "delayed:cache_steps=1"]))
def test_refresh_every_step_is_token_identical_to_no_cache(backends, family, lengths, new, steps_div, seed, alg,
                                                           blocks, spec):
    """Over random canvases (prompt lengths, left padding, batch) and schedules: a cache refreshed at every
    step computes every row every step, so it must decode exactly what no cache decodes."""
    if family == "llada" and "shift" in spec:
        spec = "decode:cache_steps=1"
    be, _, _ = backends[family]
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.stack([torch.cat([torch.full((n - k,), be.info.pad_token_id), torch.randint(0, 250, (k,), generator=g)])
                       for k in lengths])
    am = torch.stack([torch.arange(n) >= n - k for k in lengths])
    steps = new // steps_div
    if family == "dream":
        kw = dict(max_new_tokens=new, steps=steps, alg=alg, temperature=0.0)
        ref, rs = dream_generate(be, ids, am, **kw)
        got, gs = dream_generate(be, ids, am, policy=spec, **kw)
    else:
        kw = dict(gen_length=new, steps=new, block_length=new // blocks)
        ref, rs = llada_generate(be, ids, am, **kw)
        got, gs = llada_generate(be, ids, am, policy=spec, **kw)
    assert torch.equal(ref, got)
    assert gs.rows_computed == rs.rows_computed


@pytest.mark.parametrize("family,spec", [(f, p) for f in ("dream", "llada") for p in ["none", *CACHED[f], *MODIFIED]])
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
    if spec in CACHED[family] and not spec.startswith("adaptive"):  # random weights' keys drift more than 0.02
        assert s.rows_computed < s.rows_full  # the cache saved work


def test_greedy_is_llada_with_random_remasking(backends):
    be, tok, _ = backends["llada"]
    torch.manual_seed(0)
    g = generate_text(be, tok, PROMPTS, policy="greedy", remasking="random", **params("llada"))
    assert not (g.sequences[:, g.prompt_length:] == be.info.mask_token_id).any()
    assert g.stats.rows_computed < g.stats.rows_full
    with pytest.raises(ValueError, match="remasking random"):
        generate_text(be, tok, PROMPTS, policy="greedy", **params("llada"))
    be, tok, _ = backends["dream"]
    with pytest.raises(ValueError, match="LLaDA"):
        generate_text(be, tok, PROMPTS, policy="greedy", **params("dream"))
    with pytest.raises(ValueError, match="Dream only"):
        generate_text(*backends["llada"][:2], PROMPTS, policy="pd", **params("llada"))
    with pytest.raises(ValueError, match="shift applies to Dream"):
        generate_text(*backends["llada"][:2], PROMPTS, policy="decode:shift=right", **params("llada"))


@pytest.mark.parametrize("family,spec", [("dream", "decode"), ("dream", "pd"), ("dream", "prefill"),
                                         ("dream", "dual"), ("llada", "decode"), ("llada", "dual")])
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
    """LLaDA (Fast-dLLM): a block runs until done, everything above the threshold each step. Dream without
    blocks (Fast-dLLM's confidence_threshold): at most max_new_tokens/steps per step plus what it declined."""
    be, tok, _ = backends[family]
    kw = params(family, steps=3) if family == "dream" else params(family)
    if family == "dream":
        kw.pop("alg")
    low = generate_text(be, tok, PROMPTS, policy="none+parallel:threshold=0.0001", **kw)
    assert low.stats.forward_passes == 3  # Dream: 4 per step; LLaDA: one step per block
    high = generate_text(be, tok, PROMPTS, policy="none+parallel:threshold=1", **kw)
    assert high.stats.forward_passes == 12  # nothing reaches 1.0: one token per step, as many steps as tokens
    if family == "dream":
        one = generate_text(be, tok, PROMPTS, policy="none+parallel:threshold=0.0001", **params(family))
        assert one.stats.forward_passes == 12  # steps == tokens: a budget of one token per step
        with pytest.raises(ValueError, match="multiple of steps"):
            generate_text(be, tok, PROMPTS, policy="none+parallel", **params(family, steps=5))


def test_early_commit_threshold_schedule_loosens():
    e = parse_policy("none+early:gaps=0.9/0.8/0.7").early
    assert e.thresholds(torch.tensor([0.0, 0.5, 0.9])).tolist() == pytest.approx([0.9, 0.8, 0.7])


@pytest.mark.parametrize("spec,msg", [("fast", "unknown cache policy 'fast'"), ("parallel", "modifiers"),
                                      ("decode+turbo", "unknown modifier 'turbo'"),
                                      ("decode:cache_steps=0", "cache_steps must be an integer >= 1"),
                                      ("greedy:size=3", "'greedy' has no option size; it takes cache_steps, window"),
                                      ("decode:foo=1", "'decode' has no option foo"),
                                      ("decode:shift=left", "shift must be one of un, right, un_right"),
                                      ("prefill:cache_steps=2", "'prefill' has no option cache_steps; it takes no"),
                                      ("decode+early+early", "appears twice"), ("decode:4", "key=value"),
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
    valid = (torch.rand(B, L, generator=g) < 0.8) & (i > 0)
    needed = masked & am
    needed_rows = rows_of(needed, shift) & am
    quota = torch.minimum(needed.sum(1), torch.randint(1, 4, (B,), generator=g))
    order = torch.where(torch.arange(L) >= P, torch.rand(B, L, generator=g), torch.full((B, L), -torch.inf))
    return DecodeState(i, draw(st.integers(0, i)), needed_rows, quota, valid, am, decoded_at, computed_at, needed,
                       (P, L), shift, order)


POLICY_OBJECTS = [NoCache(), DKVDecode(3), DKVDecode(2, "right"), DKVDecode(4, "un_right"), DKVPrefill(),
                  DKVPD(3), DKVGreedy(2, 2), DKVGreedy(3, 0), BlockCache(False), BlockCache(True),
                  AdaptiveCache(0.1, 4), DelayedCache(3)]


@settings(max_examples=200, deadline=None)
@given(states(), st.sampled_from(range(len(POLICY_OBJECTS))))
def test_plans_respect_the_step_contract(s, k):
    policy = POLICY_OBJECTS[k]
    active, stable = policy.plan(s)
    assert not (active & stable).any() and (active | stable).all()
    assert not (stable & ~s.valid).any()  # only rows with valid K/V are read from the cache
    if isinstance(policy, (BlockCache, AdaptiveCache, DelayedCache)):
        assert not (s.needed_rows & ~active).any()  # our policies compute every row whose logits are wanted
    if isinstance(policy, DelayedCache):
        assert not (stable & (s.computed_at <= s.decoded_at)).any()  # only rows recomputed after decoding
    if type(policy) is DKVDecode and s.shift and s.i % policy.cache_steps:
        cached = dream_cached_rows(s.decoded_at, s.i - 2, policy.shift) & s.valid
        assert torch.equal(stable, cached)
    if type(policy) is DKVDecode and not s.shift and s.block_step > 1 and s.block_step % policy.cache_steps:
        assert torch.equal(stable, (s.decoded_at <= s.i - 2) & s.valid)  # decoded two steps before


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-1, 4), min_size=3, max_size=12), st.integers(0, 4))
def test_dream_cached_rows_by_shift_type(decoded, j):
    """What each shift type means on Dream, whose row p predicts token p + 1 (dKV-Cache's definitions): `un`
    caches row p once the token it predicts is decoded, `right` once its own token is, `un_right` once both
    are; on the prompt-only canvas (j = -1) every type caches the rows before the last prompt token."""
    d = torch.tensor([[NEVER if t == 4 else t for t in decoded]])
    done = (d <= j)[0].tolist()
    L = len(done)
    un, right, both = (dream_cached_rows(d, j, s)[0].tolist() for s in ("un", "right", "un_right"))
    assert right == done
    for p in range(L - 1):
        assert un[p] == done[p + 1]  # its prediction is no longer needed
        assert both[p] == (done[p] and done[p + 1])
    prompt = (d <= -1)[0].tolist()
    for s in ("un", "right", "un_right"):
        first = dream_cached_rows(d, -1, s)[0].tolist()
        assert first[:-1] == prompt[1:]  # row p stored once token p + 1 is part of the prompt


def test_window_tokens_follow_dkv_greedy_search():
    chosen = torch.zeros(10, dtype=torch.bool)
    masked = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    chosen[4] = True
    window_tokens(chosen, [4], masked, 3)  # left 3, right 5, left 2 is unmasked -> skipped, then right 6 (no) ...
    assert chosen.nonzero().flatten().tolist() == [1, 3, 4, 5]
