"""BiCache on Dream: our extension (the authors' code is LLaDA's only), checked against our own no-reuse decoding."""
from __future__ import annotations

from pathlib import Path

import torch

from dlmtrt.models.loading import load
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.bicache import BiCache, BiCacheStore, DepthTable

CKPT = Path(__file__).resolve().parent / "fixtures" / "upstream" / "ckpt-dream"


def test_dream_under_bicache_depth_zero_refreshed_every_step_is_no_reuse():
    """Our Dream extension (the authors' code is LLaDA's only): the same rows and refresh rule on Dream's shifted
    logits; depth 0 refreshed every step must decode what no reuse decodes, and reusing every layer must compute
    fewer rows."""
    from dlmtrt.runtime.families.dream import dream_generate
    model, _, _ = load(str(CKPT), dtype="float32", device="cpu")
    be = TorchBackend(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 200, (1, 14), generator=g)
    kw = dict(max_new_tokens=8, steps=8, temperature=0.0, alg="entropy")
    plain, st0 = dream_generate(be, ids, **kw)
    bc = BiCache(BiCacheStore(1000), DepthTable.of({0: 0}), [9], interval=1)
    reused, st = dream_generate(be, ids, prefix_store=bc, **kw)
    assert torch.equal(plain, reused) and st.prefix_rows == 9
    full = BiCache(BiCacheStore(1000), DepthTable.of({0: be.info.num_layers}), [9], interval=1)
    _, st = dream_generate(be, ids, prefix_store=full, **kw)
    assert st.rows_computed < st0.rows_computed
