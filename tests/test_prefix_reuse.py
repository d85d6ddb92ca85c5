"""Cross-request prefix K/V reuse (runtime/prefix.py): the block hash chain, the byte bound with LRU eviction,
and sessions that start with stored prefix rows frozen: an identical prompt decodes the same tokens with fewer
rows, a shared prefix saves exactly its served rows, and bad combinations are refused."""
from __future__ import annotations

import pytest
import torch

from dlmtrt.errors import UsageError
from dlmtrt.runtime.backends import make_backend
from dlmtrt.runtime.generate import generate_text
from dlmtrt.runtime.params import greedy_params
from dlmtrt.runtime.prefix import PrefixStore, block_keys

HEADER = "sudoku\n0120\n4231\n2000\n"


@pytest.fixture(scope="module")
def dream():
    be, tok, _ = make_backend("torch", "tiny-dream-tasks")
    return be, tok


def test_block_keys_are_a_hash_chain():
    a, b = block_keys([1, 2, 3, 4, 5, 6, 7], 2), block_keys([1, 2, 3, 4, 9, 9], 2)
    assert len(a) == 3 and len(b) == 3
    assert a[:2] == b[:2] and a[2] != b[2]
    assert block_keys([3, 4], 2)[0] != a[1]  # the same block after a different prefix is another key


def test_byte_bound_and_lru_eviction():
    store = PrefixStore(max_bytes=3 * 2 * 4 * 4, block=2)  # room for three entries of 2 x 4 floats
    t = lambda: torch.zeros(1, 1, 2, 2)  # noqa: E731
    for key in "abc":
        store.put(key, t(), t())
    assert len(store) == 3 and store.bytes == store.max_bytes
    store.entries.move_to_end("a")  # a used recently: b is the oldest
    store.put("d", t(), t())
    assert list(store.entries) == ["c", "a", "d"] and store.stats.evicted_blocks == 1
    store.put("huge", torch.zeros(100), torch.zeros(100))
    assert "huge" not in store.entries
    with pytest.raises(UsageError, match="block must be >= 1"):
        PrefixStore(max_bytes=10, block=0)


@pytest.mark.parametrize("policy", ["pd", "prefill"])
def test_an_identical_prompt_decodes_the_same_tokens_with_fewer_rows(dream, policy):
    be, tok = dream
    store = PrefixStore(max_bytes=1 << 26, block=4)
    p = greedy_params("dream", 16)
    prompt = [HEADER + "0040\n"]
    ref = generate_text(be, tok, prompt, policy=policy, **p)
    first = generate_text(be, tok, prompt, policy=policy, prefix_store=store, **p)
    again = generate_text(be, tok, prompt, policy=policy, prefix_store=store, **p)
    assert first.stats.prefix_rows == 0 and len(store) > 0
    assert torch.equal(ref.sequences, first.sequences) and torch.equal(ref.sequences, again.sequences)
    n_prompt = len(tok(prompt[0], add_special_tokens=False)["input_ids"])
    assert again.stats.prefix_rows == (n_prompt - 1) // 4 * 4 > 0
    assert ref.stats.rows_computed - again.stats.rows_computed == again.stats.prefix_rows


def test_a_shared_prefix_is_served_at_any_left_padding(dream):
    be, tok = dream
    store = PrefixStore(max_bytes=1 << 26, block=4)
    p = greedy_params("dream", 16)
    generate_text(be, tok, [HEADER + "0040\n"], policy="pd", prefix_store=store, **p)
    prompts = [HEADER + "0004\n", HEADER + "4000\n0\n"]  # different lengths: the first is left-padded
    out = generate_text(be, tok, prompts, policy="pd", prefix_store=store, **p)
    base = generate_text(be, tok, prompts, policy="pd", **p)
    n_header = len(tok(HEADER, add_special_tokens=False)["input_ids"]) // 4 * 4
    assert out.stats.prefix_rows >= 2 * n_header
    # a batch computes its widest row set: the saving is the least-served sequence's rows, at step 0 (pd)
    assert out.stats.per_step_rows[0] <= base.stats.per_step_rows[0] - 2 * n_header
    assert out.stats.per_step_rows[1:] == base.stats.per_step_rows[1:]
    assert store.stats.hit_rows >= out.stats.prefix_rows
    alone = generate_text(be, tok, ["countdown 3 4 5 -> 17\n"], policy="pd", prefix_store=store, **p)
    assert alone.stats.prefix_rows == 0  # nothing shared


def test_prefix_reuse_with_llada_blocks_and_the_cfg_refusal():
    be, tok, _ = make_backend("torch", "tiny-llada-tasks")
    store = PrefixStore(max_bytes=1 << 26, block=4)
    p = greedy_params("llada", 16, blocks=2)
    prompt = [HEADER + "0040\n"]
    a = generate_text(be, tok, prompt, policy="dual", prefix_store=store, **p)
    b = generate_text(be, tok, prompt, policy="dual", prefix_store=store, **p)
    assert b.stats.prefix_rows > 0 and b.stats.rows_computed < a.stats.rows_computed
    with pytest.raises(UsageError, match="classifier-free guidance"):
        generate_text(be, tok, prompt, policy="dual", prefix_store=store, **{**p, "cfg_scale": 0.5})
