"""The block-diffusion objective (dlmtrt/evals/block_diffusion.py): its training mask is the inference mask. A model
trained a few steps on the CPU gives, through the one-pass training forward over [x_t | x_0], the logits the cached
block-by-block inference gives (clean earlier blocks in the cache, the noisy block computed over it), within 1e-5
in fp32, with left padding; the training command's options and refusals."""
from __future__ import annotations

import json
import random

import pytest
import torch
from click.testing import CliRunner

from dlmtrt.evals.block_diffusion import block_diffusion_logits, block_diffusion_mask, masking_rates
from dlmtrt.evals.tasks import TASKS
from dlmtrt.evals.train import Encoder, main, make_batch, train
from dlmtrt.models.attention_kinds import sequence_positions
from dlmtrt.models.loading import load

SMALL = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, head_dim=8)


def test_the_mask_has_its_three_parts():
    """Two sequence positions per block, four positions: rows 0-3 noisy, 4-7 clean (1 = may attend)."""
    pos = torch.arange(4)[None]
    got = block_diffusion_mask(pos, torch.ones(1, 4, dtype=torch.bool), 2)[0, 0].int().tolist()
    assert got == [
        # noisy keys | clean keys
        [1, 1, 0, 0, 0, 0, 0, 0],  # noisy block 0: itself only
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],  # noisy block 1: itself and clean block 0
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],  # clean block 0: clean block 0
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],  # clean block 1: clean blocks 0 and 1
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    padded = block_diffusion_mask(torch.tensor([[0, 0, 1, 2]]), torch.tensor([[False, True, True, True]]), 2)
    assert not padded[0, 0, :, [0, 4]].any()  # a padding column is no key in either half


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bd") / "tiny-sdar"
    info = train("sdar", out, max_steps=4, batch=8, device="cpu", workers=0, compile_=False, sizes=SMALL,
                 block_size=8, lr=1e-2)
    return out, info


def test_training_records_the_objective_and_the_block(trained):
    out, info = trained
    assert info["objective"] == "block diffusion" and info["block_size"] == 8 and info["steps"] == 4
    assert json.loads((out / "training.json").read_text())["noise"] == "sequence"
    assert json.loads((out / "config.json").read_text())["block_size"] == 8


@pytest.mark.parametrize("task", ["sudoku4", "countdown"])
def test_the_training_forward_is_the_cached_block_by_block_forward(trained, task):
    torch.manual_seed(0)
    model, _, _ = load(str(trained[0]), dtype="float32", device="cpu")
    block = model.args.attention_kind.block
    enc = Encoder("sdar")
    x0, am, ans = make_batch(enc, TASKS[task], random.Random(3), 3, "cpu")
    extra = [0, 1, 5]  # more left padding per row: block boundaries move with each sequence's first token
    x0 = torch.stack([torch.cat([torch.full((n,), enc.ids["pad"]), r, torch.full((max(extra) - n,), enc.ids["eos"])])
                      for r, n in zip(x0, extra)])
    am = torch.stack([torch.cat([torch.zeros(n, dtype=torch.bool), r, torch.ones(max(extra) - n, dtype=torch.bool)])
                      for r, n in zip(am, extra)])
    ans = torch.stack([torch.cat([torch.zeros(n, dtype=torch.bool), r, torch.ones(max(extra) - n, dtype=torch.bool)])
                       for r, n in zip(ans, extra)])
    masked = (torch.rand(x0.shape) < 0.5) & ans
    xt = torch.where(masked, torch.full_like(x0, model.args.mask_token_id), x0)
    with torch.no_grad():
        full = block_diffusion_logits(model, xt, x0, am)
        blk = sequence_positions(am) // block
        checked = 0
        for i in range(x0.shape[0]):
            a, x, y = am[i:i + 1], xt[i:i + 1], x0[i:i + 1]
            for b in range(int(blk[i].max()) + 1):
                keys, values = model.empty_cache(1, x.shape[1])
                before = (blk[i] < b)[None]
                if before.any():  # the clean earlier blocks, stored
                    cols = before.nonzero()[:, 1][None]
                    _, keys, values, valid, _ = model(y.gather(1, cols), cols, keys, values, torch.zeros_like(a), a)
                else:
                    valid = torch.zeros_like(a)
                cols = ((blk[i] == b) & a[0]).nonzero()[:, 0][None]
                logits, *_ = model(x.gather(1, cols), cols, keys, values, valid, a)
                ref = full[i:i + 1].gather(1, cols[..., None].expand(-1, -1, full.shape[-1]))
                assert (logits - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1.0), (i, b)
                checked += 1
    assert checked >= 6


def test_the_rates_are_per_sequence_or_per_block():
    g = torch.Generator().manual_seed(0)
    ans = torch.ones(2, 12, dtype=torch.bool)
    am = torch.ones(2, 12, dtype=torch.bool)
    seq = masking_rates(ans, am, 4, "sequence", g)
    assert (seq == seq[:, :1]).all() and seq[0, 0] != seq[1, 0]
    per = masking_rates(ans, am, 4, "block", g)
    assert (per.view(2, 3, 4) == per.view(2, 3, 4)[..., :1]).all() and len(set(per[0].tolist())) == 3
    assert per.min() >= 1e-3


def test_the_command_refuses_what_does_not_apply(tmp_path):
    for extra, says in ((["--family", "llada", "--block-size", "4"], "--block-size is for block-causal"),
                        (["--family", "dream", "--noise", "block"], "--noise block is for block diffusion")):
        r = CliRunner().invoke(main, [*extra, "--out", str(tmp_path / "m"), "--device", "cpu", "--max-steps", "1"])
        assert r.exit_code == 2 and says in r.output, r.output
        assert not (tmp_path / "m").exists()
