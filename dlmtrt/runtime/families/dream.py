"""Dream's generation (`diffusion_generate`), and Fast-dLLM's block decoding of Dream.

`DreamParams` defaults are what Dream's `diffusion_generate` runs with when the caller leaves a parameter
out, under the transformers version Dream pins (4.46): it builds its generation config from the *model*
config, whose inherited generation defaults are temperature 1.0, top_p 1.0 and top_k 50, then takes
`alg='origin'`, `steps=512`, `eps=1e-3` and 20 new tokens from its own defaults. So an unqualified call
samples, and confidences are renormalised over the top 50 logits. `defaults` applies the same precedence to
a checkpoint's config.json (the CLI and the server; the Python API takes the defaults below as they are).
"""
from __future__ import annotations

from dataclasses import dataclass

from dlmtrt.errors import UsageError

from ..params import Params, check_blocks, check_float, greedy_layout, positive_int
from . import Family, read_config

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
# What transformers 4.46's PretrainedConfig carries for every model and Dream's generation config inherits.
_PRETRAINED_GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


@dataclass
class DreamParams(Params):
    max_new_tokens: int = 20
    steps: int = 512
    eps: float = 1e-3
    alg: str = "origin"
    alg_temp: float | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = 50
    block_length: int | None = None  # Fast-dLLM block decoding; None = Dream's own single-block schedule

    def validate(self) -> "DreamParams":
        positive_int("max_new_tokens", self.max_new_tokens)
        positive_int("steps", self.steps)
        if self.alg not in ALGS:
            raise UsageError(f"unknown alg '{self.alg}'; choose from {', '.join(ALGS)}", field="alg")
        if not 0 < float(self.eps) < 1:
            raise UsageError(f"eps must be in (0, 1), got {self.eps}", field="eps")
        check_float("temperature", self.temperature)
        if self.top_p is not None and not 0 < float(self.top_p) <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        if self.top_k is not None:
            positive_int("top_k", self.top_k)
        if self.alg_temp is not None:
            check_float("alg_temp", self.alg_temp)
        if self.block_length is not None:
            check_blocks("max_new_tokens", self.max_new_tokens, self.block_length, self.steps)
        return self


class Dream(Family):
    name = "dream"
    title = "Dream"
    params = DreamParams
    schedule = "dream"
    published_policies = frozenset({"decode", "prefill", "pd", "block", "dual"})
    logits_shift = True
    surplus_steps = "steps beyond one per token commit nothing, and Dream's schedule (as upstream's) runs every one"

    def defaults(self, checkpoint_dir) -> dict:
        """`diffusion_generate`'s effective defaults for a checkpoint: its config.json over DreamParams'."""
        cfg = read_config(checkpoint_dir)
        out = {k: cfg[k] for k in ("steps", "eps", "alg", "alg_temp", *_PRETRAINED_GENERATION_DEFAULTS)
               if cfg.get(k) is not None}
        if out.get("top_p") is not None and out["top_p"] >= 1:
            out["top_p"] = None  # upstream applies top-p only below 1
        return out

    def normalise(self, own: dict) -> dict:
        own = dict(own)
        if own.get("top_k") == 0:
            own["top_k"] = None
        if own.get("top_p") is not None and own["top_p"] >= 1:
            own["top_p"] = None
        return own

    def draws_random(self, params: dict) -> bool:
        return float(params["temperature"]) > 0 or params["alg"] == "origin" or bool(params.get("alg_temp"))

    def batches_sampling(self, params: dict, plan) -> bool:
        return plan.spec == "none" and params["alg"] == "origin"  # the transfer draw and the token sample

    def schedule_name(self, params: dict) -> str:
        if params.get("block_length") is None:
            return self.schedule
        return f"fast-dllm blocks={params['max_new_tokens'] // params['block_length']}"

    def greedy(self, new_tokens: int, *, steps=None, blocks=None, block_length=None, alg: str = "maskgit_plus",
               **own) -> dict:
        if own:
            raise UsageError(f"{', '.join(own)} does not apply to dream models", field=next(iter(own)))
        if blocks is None and block_length is None:
            return self.params(max_new_tokens=new_tokens, steps=steps or new_tokens, alg=alg,
                               temperature=0.0).validate().to_dict()
        length, steps, block = greedy_layout(new_tokens, steps, blocks, block_length)
        return self.params(max_new_tokens=length, steps=steps, block_length=block, alg=alg,
                           temperature=0.0).validate().to_dict()

    def rule(self, info, params: dict, prompt_length: int, plan):
        from ..unmasking import DreamBlockRule, DreamRule
        p = self.params(**params).validate()
        threshold = plan.parallel.threshold if plan.parallel is not None else None
        if p.block_length is None:
            return DreamRule(info.mask_token_id, p, threshold, **plan.rule_options())
        return DreamBlockRule(info.mask_token_id, p, prompt_length, threshold, **plan.rule_options(blockwise=True))


FAMILY = Dream()


def dream_generate(backend, input_ids, attention_mask=None, *, max_new_tokens: int = 20, steps: int = 512,
                   eps: float = 1e-3, alg: str = "origin", alg_temp: float | None = None, temperature: float = 1.0,
                   top_p: float | None = None, top_k: int | None = 50, block_length: int | None = None, policy=None,
                   on_step=None, max_positions: int | None = None, prefix_store=None, constraints: dict | None = None,
                   answer_start_pos: int | None = None):
    """Dream's `diffusion_generate`; returns the full canvas [B, prompt + max_new_tokens] and the statistics.
    `constraints` and `answer_start_pos` as `llada_generate`'s (Prophet's; for Dream, ours).

    The defaults are upstream's effective ones (module docstring): an unqualified call samples at temperature 1
    from the top 50 logits with `alg='origin'`, exactly as `model.diffusion_generate(ids)` does; pass
    `top_k=None` for no top-k. `block_length` switches to Fast-dLLM's block decoding of Dream."""
    return FAMILY.generate(backend, input_ids, attention_mask, policy=policy, on_step=on_step,
                           max_positions=max_positions, prefix_store=prefix_store, constraints=constraints,
                           answer_start_pos=answer_start_pos, max_new_tokens=max_new_tokens,
                           steps=steps, eps=eps, alg=alg, alg_temp=alg_temp, temperature=temperature, top_p=top_p,
                           top_k=top_k, block_length=block_length)
