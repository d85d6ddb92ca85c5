"""The property every cache policy relies on: a step over cached K/V equals the full pass."""
from __future__ import annotations

import pytest
import torch

from hf_reference import hf_logits, hf_model
from dlmtrt.models.loading import load

FAMILIES = ["dream", "llada"]
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def full_step(model, ids, am):
    B, L = ids.shape
    K, V = model.empty_cache(B, L)
    pos = torch.arange(L).expand(B, L)
    return model(ids, pos, K, V, torch.zeros(B, L, dtype=torch.bool), am)


def left_padded_batch(vocab: int, pad: int, lengths: list[int], L: int, g: torch.Generator):
    ids = torch.randint(0, vocab, (len(lengths), L), generator=g)
    am = torch.ones(len(lengths), L, dtype=torch.bool)
    for b, n in enumerate(lengths):
        ids[b, : L - n] = pad
        am[b, : L - n] = False
    return ids, am


@pytest.mark.parametrize("family", FAMILIES)
def test_all_active_matches_transformers(family, tiny_dir):
    model, _, ck = load(str(tiny_dir(family)))
    ref = hf_model(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ck.args.vocab_size, (2, 23), generator=g)
    logits, *_ , valid, drift = full_step(model, ids, torch.ones_like(ids, dtype=torch.bool))
    assert rel_err(logits, hf_logits(ref, ids)) <= TOL
    assert valid.all() and (drift == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_matches_unpadded_reference(family, tiny_dir):
    model, _, ck = load(str(tiny_dir(family)))
    ref = hf_model(model)
    g = torch.Generator().manual_seed(2)
    lengths, L = [17, 11, 5], 17
    ids, am = left_padded_batch(ck.args.vocab_size, ck.args.pad_token_id, lengths, L, g)
    logits = full_step(model, ids, am)[0]
    for b, n in enumerate(lengths):
        alone = hf_logits(ref, ids[b:b + 1, L - n:])
        assert rel_err(logits[b:b + 1, L - n:], alone) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", range(6))
def test_random_stable_split_equals_full_pass(family, seed, tiny_dir):
    model, _, ck = load(str(tiny_dir(family)))
    g = torch.Generator().manual_seed(100 + seed)
    B, L = 3, 29
    lengths = [L, L - 7, L - 12]
    ids, am = left_padded_batch(ck.args.vocab_size, ck.args.pad_token_id, lengths, L, g)
    full_logits, K, V, _, _ = full_step(model, ids, am)
    A = int(torch.randint(1, L, (1,), generator=g))
    pos = torch.stack([torch.randperm(L, generator=g)[:A] for _ in range(B)])
    stable = torch.ones(B, L, dtype=torch.bool)
    stable.scatter_(1, pos, False)
    # Poison the active rows' past so that reading it would show up in the result.
    Kp = [k.clone().scatter_(2, pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3]), 1e3) for k in K]
    Vp = [v.clone().scatter_(2, pos[:, None, :, None].expand(-1, v.shape[1], -1, v.shape[3]), 1e3) for v in V]
    logits, K2, V2, valid, drift = model(ids.gather(1, pos), pos, Kp, Vp, stable, am)
    want = full_logits.gather(1, pos[..., None].expand(-1, -1, full_logits.shape[-1]))
    real = am.gather(1, pos)  # padded rows' logits are meaningless
    assert rel_err(logits[real], want[real]) <= TOL
    for k2, k in zip(K2, K):
        assert rel_err(k2, k) <= TOL
    assert valid.all()
    assert (drift == 0).all()  # the active rows were not stable: no valid past to compare with


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_drift_measures_change_against_valid_past(family, tiny_dir):
    model, _, ck = load(str(tiny_dir(family)))
    g = torch.Generator().manual_seed(7)
    B, L = 2, 12
    ids = torch.randint(0, ck.args.vocab_size, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.bool)
    _, K, V, _, _ = full_step(model, ids, am)
    pos = torch.tensor([[3, 4], [0, 9]])
    stable = torch.ones(B, L, dtype=torch.bool)  # active rows' past is valid: drift is measured
    _, _, _, _, drift_same = model(ids.gather(1, pos), pos, K, V, stable, am)
    assert drift_same.max() <= 1e-5
    ids2 = ids.clone()
    ids2[0, 3] = (ids[0, 3] + 1) % ck.args.vocab_size
    _, _, _, _, drift = model(ids2.gather(1, pos), pos, K, V, stable, am)
    assert drift[0, 0] > 1e-3
    unstable = stable.clone()
    unstable[1, 9] = False
    _, _, _, _, drift = model(ids.gather(1, pos), pos, K, V, unstable, am)
    assert drift[1, 1] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_invalid_rows_are_not_attended(family, tiny_dir):
    """Rows that are neither stable nor written this step must not influence the active rows."""
    model, _, ck = load(str(tiny_dir(family)))
    g = torch.Generator().manual_seed(8)
    B, L = 1, 10
    ids = torch.randint(0, ck.args.vocab_size, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.bool)
    K, V = model.empty_cache(B, L)
    pos = torch.tensor([[0, 1, 2]])
    stable = torch.zeros(B, L, dtype=torch.bool)
    a = model(ids[:, :3], pos, K, V, stable, am)[0]
    K2 = [torch.randn_like(k) for k in K]
    V2 = [torch.randn_like(v) for v in V]
    b = model(ids[:, :3], pos, K2, V2, stable, am)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_pass_equals_step_contract(family, tiny_dir):
    """Training uses the cache-free `full_logits`; it must be the same function as the step contract."""
    model, _, ck = load(str(tiny_dir(family)))
    g = torch.Generator().manual_seed(7)
    ids, am = left_padded_batch(ck.args.vocab_size, ck.args.pad_token_id, [19, 12, 4], 19, g)
    step = full_step(model, ids, am)[0]
    assert rel_err(model.full_logits(ids, am)[am], step[am]) <= TOL
