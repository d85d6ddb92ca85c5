"""BiCache (runtime/bicache.py): the deep-rows forward, the store and the depth table; token identity with the
authors' engine is tests/test_bicache_upstream.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlmtrt.errors import UsageError
from dlmtrt.models.loading import load
from dlmtrt.models.transformer import DeepRows
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.bicache import BiCache, BiCacheStore, DepthTable, chat_prefix, prefix_ratio
from dlmtrt.runtime.generate import llada_generate

CKPT = Path(__file__).resolve().parent / "fixtures" / "upstream" / "ckpt-llada"


@pytest.fixture(scope="module")
def backend():
    model, _, _ = load(str(CKPT), dtype="float32", device="cpu")
    return TorchBackend(model)


def test_rows_that_join_at_layer_zero_are_rows_computed_from_the_start(backend):
    """Deep rows entering layer 0 with their embeddings are ordinary active rows."""
    m = backend.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (1, 12), generator=g)
    am = torch.ones(1, 12, dtype=torch.bool)
    k, v = m.empty_cache(1, 12)
    with torch.no_grad():
        full, fk, fv, _, _ = m(ids, torch.arange(12)[None], k, v, torch.zeros_like(am), am)
        k, v = m.empty_cache(1, 12)
        stable = torch.zeros_like(am)
        stable[:, :5] = True  # the prefix slots are valid: they are written in every layer
        deep = DeepRows(0, torch.arange(5)[None], m.model.embed_tokens(ids[:, :5]))
        part, pk, pv, _, _ = m(ids[:, 5:], torch.arange(5, 12)[None], k, v, stable, am, deep=deep)
    assert part.shape[1] == 7 and torch.allclose(part, full[:, 5:], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(pk, fk))


def test_the_store_reuses_evicts_and_refuses(backend):
    store = BiCacheStore(max_tokens=10)
    a, b = store.get(backend, [5, 6, 7, 8]), store.get(backend, [5, 6, 7, 8])
    assert a is b and (store.stats.hits, store.stats.misses) == (1, 1)
    keys, values, hidden = backend.prefix_states(torch.tensor([[5, 6, 7, 8]]))
    assert torch.equal(a.keys[1], keys[1][0]) and len(a.hidden) == backend.info.num_layers + 1
    store.get(backend, [1, 2, 3, 4, 5, 6])  # 6 is not below 10 - 4 (the authors' strict test): the first goes
    assert store.stats.evictions == 1 and list(store.entries) == [(1, 2, 3, 4, 5, 6)] and store.tokens == 6
    with pytest.raises(UsageError, match="does not fit a BiCache store of 10 tokens"):
        store.get(backend, list(range(10)))


def test_the_depth_table_takes_the_greatest_ratio_below():
    t = DepthTable.of({"0": 1, "30": 2, "60": 3})
    assert [t.depth(r, 4) for r in (0, 29, 30, 99)] == [1, 1, 2, 3]
    assert prefix_ratio(1, 8) == 12 and prefix_ratio(5, 8) == 62 and prefix_ratio(1, 200) == 0  # halves to even
    with pytest.raises(UsageError, match="starts at ratio 10"):
        DepthTable.of({10: 1}).depth(5, 4)
    with pytest.raises(UsageError, match="asks for 5 layers of a 4-layer model"):
        DepthTable.of({0: 5}).depth(50, 4)


def test_depth_zero_refreshed_every_step_is_no_reuse(backend):
    """b = 0 with interval 1: every step recomputes the prefix in every layer from its embeddings."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (1, 14), generator=g)
    kw = dict(gen_length=8, steps=8, block_length=8)
    plain, _ = llada_generate(backend, ids, **kw)
    bc = BiCache(BiCacheStore(1000), DepthTable.of({0: 0}), [9], interval=1)
    reused, st = llada_generate(backend, ids, prefix_store=bc, **kw)
    assert torch.equal(plain, reused) and st.prefix_rows == 9
    full = BiCache(BiCacheStore(1000), DepthTable.of({0: backend.info.num_layers}), [9], interval=1)
    frozen, st = llada_generate(backend, ids, prefix_store=full, **kw)
    assert st.rows_computed < 8 * 22  # the prefix is never recomputed


def test_a_batch_decodes_as_each_prompt_alone_and_can_be_cut(backend):
    """Two prompts of different lengths and prefixes at one depth, left-padded: each decodes as alone; a session cut
    to the second one after a few steps (a server dropping an answered request) goes on as alone."""
    from dlmtrt.runtime.decode import drive
    from dlmtrt.runtime.families import get
    from dlmtrt.runtime.policies import parse_policy
    g = torch.Generator().manual_seed(2)
    prompts, prefixes = [torch.randint(0, 200, (n,), generator=g) for n in (14, 11)], [9, 6]
    table, kw = DepthTable.of({0: 2}), dict(gen_length=8, steps=8, block_length=8, temperature=0.0)
    alone = [llada_generate(backend, p[None], prefix_store=BiCache(BiCacheStore(100), table, [n], interval=2), **kw)[0]
             for p, n in zip(prompts, prefixes)]
    ids = torch.stack([torch.cat([torch.zeros(14 - len(p), dtype=torch.long), p]) for p in prompts])
    am = torch.stack([torch.arange(14) >= 14 - len(p) for p in prompts]).long()
    batched, _ = llada_generate(backend, ids, am, prefix_store=BiCache(BiCacheStore(100), table, prefixes, 2), **kw)
    for b, (p, x) in enumerate(zip(prompts, alone)):
        assert batched[b, 14 - len(p):].tolist() == x[0].tolist()
    fam = get("llada")
    s = fam.session(backend, ids, am, fam.params(**kw).validate().to_dict(), parse_policy("none"),
                    BiCache(BiCacheStore(100), table, prefixes, 2))
    for _ in range(3):
        s.step()
    s.keep([1])
    x, _ = drive(s)
    assert x[0, 14 - len(prompts[1]):].tolist() == alone[1][0].tolist()
    with pytest.raises(UsageError, match="one reuse depth together"):
        llada_generate(backend, ids, am, prefix_store=BiCache(BiCacheStore(100), DepthTable.of({0: 1, 50: 2}),
                                                               [2, 10], 2), **kw)


def test_chat_prefix_splits_both_templates_where_the_last_user_turn_starts():
    """LLaDA's template by the authors' cut (tests/test_bicache_upstream.py checks it against their tokenize);
    Dream's Qwen template, which gives a lone turn a default system prompt, where the earlier turns' own template
    ends; a template that cannot be split is refused, and no boundary means no prefix."""
    from transformers import AutoTokenizer
    root = Path(__file__).resolve().parents[1] / "dlmtrt" / "checkpoints"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "countdown 1 2 -> 3"}]
    ends = {"tiny-llada-tasks": ("b<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\ncountdown"),
            "tiny-dream-tasks": ("b<|im_end|>\n", "<|im_start|>user\ncountdown")}
    for name, (head, tail) in ends.items():
        tok = AutoTokenizer.from_pretrained(root / name)
        ids, P = chat_prefix(tok, chat)
        whole = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        assert ids == list(whole["input_ids"] if hasattr(whole, "keys") else whole)
        assert tok.decode(ids[:P]).endswith(head) and tok.decode(ids[P:]).startswith(tail), name
        assert chat_prefix(tok, chat[-1:])[1] == 0 and chat_prefix(tok, chat[:-1])[1] == 0  # no boundary
        tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        with pytest.raises(UsageError, match="cannot be split where the last user turn starts"):
            chat_prefix(tok, chat)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """fp32 agreement relative to the tensor's scale (K reach ~10 here; reduction order differs across CPUs)."""
    return bool((a - b).abs().max() <= rel * max(1.0, b.abs().max().item()))


def _refresh_oracle(model, canvas: torch.Tensor, P: int, b: int) -> tuple[list, list]:
    """What a BiCache refresh step must write for the prefix of one unpadded canvas [N], from the plain layers:
    the prefix computed alone gives every layer's K/V and o_{b-1}; the suffix rows run the shallow layers
    attending [that prefix K/V, their own]; from layer b the prefix rows, entering with o_{b-1}, and the suffix
    rows run a full bidirectional forward over all N rows. Returns each layer's prefix K (RoPE at 0..P-1) and V
    [Hkv, P, D]: the prefix-only ones below b, that full forward's from b."""
    import torch.nn.functional as F

    from dlmtrt.models.transformer import rope_cos_sin
    N, layers = canvas.shape[0], model.model.layers
    with torch.no_grad():
        pk, pv, ph = model.layer_states(canvas[None, :P], torch.ones(1, P, dtype=torch.bool))
        cos, sin = rope_cos_sin(torch.arange(N)[None], model.inv_freq, torch.float32)
        x = model.model.embed_tokens(canvas[None, P:])
        for n in range(b):
            at = layers[n].self_attn
            q, k, v = at.qkv(layers[n].input_layernorm(x), cos[:, P:], sin[:, P:])
            o = F.scaled_dot_product_attention(q, torch.cat([pk[n], k], 2), torch.cat([pv[n], v], 2),
                                               enable_gqa=q.shape[1] != k.shape[1])
            x = x + at.o_proj(o.transpose(1, 2).reshape(1, N - P, -1))
            x = x + layers[n].mlp(layers[n].post_attention_layernorm(x))
        x = torch.cat([ph[b], x], 1)
        keys, values = [k[0] for k in pk[:b]], [v[0] for v in pv[:b]]
        for n in range(b, len(layers)):
            h, k, v = layers[n].self_attn.forward_full(layers[n].input_layernorm(x), cos, sin, None)
            keys.append(k[0, :, :P])
            values.append(v[0, :, :P])
            x = x + h
            x = x + layers[n].mlp(layers[n].post_attention_layernorm(x))
    return keys, values


def test_a_refresh_writes_the_full_forward_in_the_deep_layers_and_keeps_the_prefix_only_ones_below():
    """The cache's prefix rows after every step of a left-padded batch of two (4-layer model, depth 1 and 2,
    refresh every 3 steps): in layers < b the prefix-only forward's K/V, always; in layers >= b at a refresh step
    the K/V of the full forward over the canvas as it was at that step (`_refresh_oracle`, each sequence alone and
    unpadded), and between refreshes the last refresh's. The canvas moves the deep prefix K/V by far more than the
    tolerance, so a skipped refresh (or none) is caught."""
    from dlmtrt.runtime.families import get
    from dlmtrt.runtime.policies import parse_policy
    model, _, _ = load(str(CKPT.parent / "bicache" / "ckpt-llada-bicache"), dtype="float32",
                       device="cpu")
    be = TorchBackend(model)
    g = torch.Generator().manual_seed(3)
    prompts, prefixes = [torch.randint(0, 250, (n,), generator=g) for n in (15, 11)], [10, 6]
    ids = torch.stack([torch.cat([torch.zeros(15 - len(p), dtype=torch.long), p]) for p in prompts])
    am = torch.stack([torch.arange(15) >= 15 - len(p) for p in prompts]).long()
    kw = dict(gen_length=9, steps=9, block_length=9, temperature=0.0)
    fam = get("llada")
    for depth in (1, 2):
        bc = BiCache(BiCacheStore(100), DepthTable.of({0: depth}), prefixes, interval=3)
        s = fam.session(be, ids, am, fam.params(**kw).validate().to_dict(), parse_policy("none"), bc)
        last = [None, None]
        while not s.done:
            i, canvas = s.i, s.x.clone()
            s.step()
            for b, (p, P) in enumerate(zip(prompts, prefixes)):
                start = 15 - len(p)
                real = canvas[b, start:]
                want = _refresh_oracle(model, real, P, depth)
                with torch.no_grad():  # the prefix computed alone
                    states = model.layer_states(real[None, :P], torch.ones(1, P, dtype=torch.bool))
                    alone = [[t[0] for t in ts] for ts in states[:2]]
                if i % 3 == 0:
                    if last[b] is not None:  # the canvas moved: a refresh skipped would keep the old K/V
                        assert max((a - o).abs().max() for a, o in zip(want[0][depth:], last[b][0][depth:])) > 1e-3
                    assert max((a - o).abs().max() for a, o in zip(want[0][depth:], alone[0][depth:])) > 1e-3
                    # layer b's K/V are projections of its input, the prefix-only o_{b-1}: a refresh at depth b
                    # leaves b + 1 layers of prefix K/V as computed alone (the authors' design, ALGORITHM.md 7)
                    assert _close(want[0][depth], alone[0][depth])
                    last[b] = want
                for n in range(model.args.num_layers):
                    ref = (alone if n < depth else last[b])
                    k, v = s.cache.keys[n][b, :, start:start + P], s.cache.values[n][b, :, start:start + P]
                    assert _close(k, ref[0][n]), (depth, i, b, n)
                    assert _close(v, ref[1][n]), (depth, i, b, n)
        assert s.i == 9 and bc.depth == depth
