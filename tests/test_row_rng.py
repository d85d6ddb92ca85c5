"""Per-sequence generators (runtime/row_rng.py): a batch of sampling sequences draws, row by row, exactly what each
draws alone with `torch.manual_seed(seed)`; outside `row_generators` every draw is the plain global one."""
from __future__ import annotations

import pytest
import torch

from dlmtrt.runtime import row_rng
from dlmtrt.runtime.policies import parse_policy


@pytest.fixture(scope="module")
def models():
    from dlmtrt.runtime.backends import make_backend
    return {f: make_backend("torch", f"tiny-{f}-tasks") for f in ("dream", "llada")}


@pytest.mark.parametrize("family,extra", [
    ("dream", dict(max_new_tokens=12, steps=12)),  # temperature 1, alg origin: Dream's defaults
    ("dream", dict(max_new_tokens=12, steps=6, top_p=0.9)),
    ("llada", dict(max_new_tokens=16, steps=16, block_length=8, temperature=2.0)),
])
def test_a_batch_under_row_generators_draws_what_each_sequence_draws_alone(models, family, extra):
    from dlmtrt.runtime.generate import generate_text
    from dlmtrt.runtime.params import family_params
    be, tok, src = models[family]
    params = family_params(family, src.path, **extra)
    from dlmtrt.runtime.families import get
    assert get(family).batches_sampling(params, parse_policy("none"))
    prompts, seeds = ["abc", "xyz", "hello there friend", "abc"], [3, 4, 9, 10]  # left-padded in the batch
    assert len({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts}) == 2
    run = dict(policy="none", max_positions=src.args.max_position_embeddings, **params)
    alone = []
    for p, sd in zip(prompts, seeds):
        torch.manual_seed(sd)
        alone.append(generate_text(be, tok, [p], **run).texts[0])
    torch.manual_seed(0)  # the global generator plays no part
    with row_rng.row_generators([torch.Generator().manual_seed(sd) for sd in seeds]):
        batched = generate_text(be, tok, prompts, **run).texts
    assert batched == alone
    assert alone[0] != alone[3]  # same prompt, other seed: the rows really have their own draws
    torch.manual_seed(3)  # without row generators the batch shares one stream, and the answers are others
    assert generate_text(be, tok, prompts, **run).texts != alone


def test_outside_row_generators_the_draws_are_the_global_ones():
    torch.manual_seed(5)
    a = torch.rand(7)
    torch.manual_seed(5)
    assert torch.equal(row_rng.rand(7, torch.tensor([3, 4])), a)
    x = torch.zeros(5, 2)
    torch.manual_seed(5)
    b = torch.rand_like(x, dtype=torch.float64)
    torch.manual_seed(5)
    assert torch.equal(row_rng.rand_like(x, torch.tensor([2, 3]), dtype=torch.float64), b)


def test_row_blocks_come_from_their_own_generators_and_must_match_the_batch():
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    with row_rng.row_generators(gens):
        got = row_rng.rand(5, torch.tensor([2, 3]))
        with pytest.raises(RuntimeError, match="2 generators for a batch of 3 rows"):
            row_rng.rand(3, torch.tensor([1, 1, 1]))
    assert torch.equal(got[:2], torch.rand(2, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(got[2:], torch.rand(3, generator=torch.Generator().manual_seed(2)))
    assert row_rng.active() is None
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    torch.manual_seed(7)
    want = torch.distributions.Categorical(probs=probs).sample()
    assert torch.equal(row_rng.categorical(probs, torch.Generator().manual_seed(7)), want)
    with pytest.raises(ValueError):
        row_rng.categorical(torch.tensor([[float("nan"), 1.0]]), gens[0])


def test_which_requests_batch_their_sampling():
    from dlmtrt.runtime.families import get
    none, dual = parse_policy("none"), parse_policy("dual")
    dream, llada, sdar = get("dream"), get("llada"), get("sdar")
    assert dream.batches_sampling({"alg": "origin"}, none)
    assert not dream.batches_sampling({"alg": "entropy"}, none)  # its alg_temp draws are not routed
    assert not dream.batches_sampling({"alg": "origin"}, dual)  # cached rows depend on the batch
    assert llada.batches_sampling({"remasking": "low_confidence", "cfg_scale": 0.0}, none)
    assert not llada.batches_sampling({"remasking": "random", "cfg_scale": 0.0}, none)
    assert not llada.batches_sampling({"remasking": "low_confidence", "cfg_scale": 1.0}, none)
    assert not sdar.batches_sampling({}, none)
