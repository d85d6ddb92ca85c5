"""Generation parameters of each family, with the defaults the authors' code actually uses.

`DreamParams` defaults are what Dream's `diffusion_generate` runs with when the caller leaves a parameter
out, under the transformers version Dream pins (4.46): it builds its generation config from the *model*
config, whose inherited generation defaults are temperature 1.0, top_p 1.0 and top_k 50, then takes
`alg='origin'`, `steps=512`, `eps=1e-3` and 20 new tokens from its own defaults. So an unqualified call
samples, and confidences are renormalised over the top 50 logits. `from_config` applies the same
precedence to a checkpoint's config.json. `LLaDAParams` are the defaults of LLaDA's `generate`.
The CLI, the evaluator and the Python API all start from these.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from dlmtrt.errors import UsageError

DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
LLADA_REMASKING = ("low_confidence", "random")

# What transformers 4.46's PretrainedConfig carries for every model and Dream's generation config inherits.
_PRETRAINED_GENERATION_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}


@dataclass
class DreamParams:
    max_new_tokens: int = 20
    steps: int = 512
    eps: float = 1e-3
    alg: str = "origin"
    alg_temp: float | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = 50
    block_length: int | None = None  # Fast-dLLM block decoding; None = Dream's own single-block schedule

    @classmethod
    def from_config(cls, config: dict, **overrides) -> "DreamParams":
        """Defaults as `diffusion_generate` derives them from a checkpoint's config.json, then `overrides`
        (the caller's explicit values; None for top_p/top_k/alg_temp means off, as upstream)."""
        p = cls()
        for k in ("steps", "eps", "alg", "alg_temp", *_PRETRAINED_GENERATION_DEFAULTS):
            if config.get(k) is not None:
                setattr(p, k, config[k])
        if p.top_p is not None and p.top_p >= 1:
            p.top_p = None  # upstream applies top-p only below 1
        for k, v in overrides.items():
            setattr(p, k, v)
        p.validate()
        return p

    def validate(self) -> "DreamParams":
        _positive_int("max_new_tokens", self.max_new_tokens)
        _positive_int("steps", self.steps)
        if self.alg not in DREAM_ALGS:
            raise UsageError(f"unknown alg '{self.alg}'; choose from {', '.join(DREAM_ALGS)}")
        if not 0 < float(self.eps) < 1:
            raise UsageError(f"eps must be in (0, 1), got {self.eps}")
        if float(self.temperature) < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < float(self.top_p) <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None:
            _positive_int("top_k", self.top_k)
        if self.alg_temp is not None and float(self.alg_temp) < 0:
            raise UsageError(f"alg_temp must be >= 0, got {self.alg_temp}")
        if self.block_length is not None:
            check_blocks("max_new_tokens", self.max_new_tokens, self.block_length, self.steps)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LLaDAParams:
    gen_length: int = 128
    steps: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"

    def validate(self) -> "LLaDAParams":
        _positive_int("gen_length", self.gen_length)
        _positive_int("steps", self.steps)
        check_blocks("gen_length", self.gen_length, self.block_length, self.steps)
        if float(self.temperature) < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if float(self.cfg_scale) < 0:
            raise UsageError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.remasking not in LLADA_REMASKING:
            raise UsageError(f"unknown remasking '{self.remasking}'; choose from {', '.join(LLADA_REMASKING)}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


PARAMS = {"dream": DreamParams, "llada": LLaDAParams}


def param_names(family: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(PARAMS[family]))


def check_blocks(what: str, length: int, block_length, steps: int) -> None:
    """Blocks of `block_length` must tile the answer, and the steps must split evenly over the blocks."""
    _positive_int("block_length", block_length)
    if length % block_length:
        raise UsageError(f"{what} ({length}) must be a multiple of block_length ({block_length}); pass "
                         "--block-length dividing it")
    blocks = length // block_length
    if steps % blocks:
        raise UsageError(f"steps ({steps}) must be a multiple of the number of blocks ({blocks} = {what} / "
                         "block_length)")


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def family_params(family: str, checkpoint_dir=None, **explicit) -> dict:
    """Keyword arguments for `dream_generate` / `llada_generate` (and `generate_text`): the caller's explicit
    values over the family's upstream defaults (Dream: as derived from the checkpoint's config.json).
    `max_new_tokens` is accepted for both (LLaDA's `gen_length`); `top_k=0` / `top_p>=1` turn those off.
    An option of the other family is refused."""
    import json
    from pathlib import Path

    if "max_new_tokens" in explicit and family == "llada":
        explicit["gen_length"] = explicit.pop("max_new_tokens")
    names = param_names(family)
    wrong = sorted(k for k in explicit if k not in names)
    if wrong:
        raise UsageError(f"{family} generation does not take {', '.join(wrong)}; it takes {', '.join(names)}")
    if family == "dream":
        if explicit.get("top_k") == 0:
            explicit["top_k"] = None
        if explicit.get("top_p") is not None and explicit["top_p"] >= 1:
            explicit["top_p"] = None
        cfg = {}
        if checkpoint_dir is not None and (Path(checkpoint_dir) / "config.json").exists():
            cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        return DreamParams.from_config(cfg, **explicit).to_dict()
    p = LLaDAParams(**explicit)
    if "block_length" not in explicit and p.gen_length < p.block_length:
        p.block_length = p.gen_length  # upstream's 128 does not fit a shorter answer: one block
    return p.validate().to_dict()


def check_step_budget(family: str, params: dict, parallel: bool, explicit_steps: bool) -> None:
    """Refuse a step count that would not mean what was asked, before any work (`params` as `family_params`
    returns them; `explicit_steps`: the caller chose `steps` rather than taking the family's default).

    - More steps than new tokens: steps beyond one per token commit nothing. LLaDA's schedule runs each
      block's share of them, as upstream does, and stops after the last token; Dream's, as upstream's
      `diffusion_generate`, runs every one. An explicit request for them is refused; the defaults are
      upstream's and stay (`surplus_steps_note` says what they do).
    - Parallel decoding in blocks (LLaDA, or Dream with `block_length`): Fast-dLLM's threshold rule decodes
      each block until it has no mask left, one step per committed token at worst, whatever `steps` says
      (upstream ignores it there), so fewer steps than tokens cannot be honoured.
    Without blocks, Dream's parallel decoding keeps its step budget (each step may commit up to
    max_new_tokens / steps tokens) and is not affected."""
    if not explicit_steps:
        return
    new = params.get("max_new_tokens") or params["gen_length"]
    steps = params["steps"]
    blocks = family == "llada" or params.get("block_length") is not None
    if parallel and blocks and steps < new:
        raise UsageError(f"steps ({steps}) cannot bound +parallel in block decoding: Fast-dLLM's threshold rule "
                         f"decodes each block until it is done (up to one step per token, here {new}); leave "
                         "steps out, or drop +parallel for a fixed step budget", field="steps")
    if steps > new:
        raise UsageError(f"steps ({steps}) exceeds the {new} new tokens: {_SURPLUS[family]}; ask for at most {new} "
                         "steps (one token per step)", field="steps")


_SURPLUS = {"llada": "steps beyond one per token commit nothing (upstream runs them all; so do we, except "
                     "after the last token)",
            "dream": "steps beyond one per token commit nothing, and Dream's schedule (as upstream's) runs every one"}


def surplus_steps_note(family: str, params: dict) -> str | None:
    """What to tell the user when the family's *default* step count exceeds the new tokens (Dream's upstream
    default is 512 steps for any length), or None."""
    new = params.get("max_new_tokens") or params["gen_length"]
    if params["steps"] <= new:
        return None
    return (f"{params['steps']} steps (the {family} default) for {new} new tokens: {_SURPLUS[family]}; pass "
            f"--steps {new} for one token per step")


def greedy_params(family: str, new_tokens: int, *, steps: int | None = None, blocks: int | None = None,
                  remasking: str | None = None, alg: str = "maskgit_plus", block_length: int | None = None) -> dict:
    """Deterministic (temperature 0) confidence-ordered decoding of `new_tokens`: what the evaluator, the
    trajectory recorder and the benchmarks decode with. LLaDA decodes in `blocks` semi-autoregressive blocks
    (default 1); Dream runs its own single-block schedule unless `blocks` asks for Fast-dLLM's block decoding.
    With blocks the canvas is rounded up to a multiple of them. Everything not set here is the family's
    upstream default (Dream's top_k 50 included). `block_length` instead of `blocks`: as many blocks of that
    length as cover the answer."""
    if block_length is not None:
        if blocks is not None:
            raise UsageError("give blocks or block_length, not both", field="block_length")
        _positive_int("block_length", block_length)
        blocks = -(-new_tokens // block_length)
    if blocks is not None and (not isinstance(blocks, int) or blocks < 1):
        raise UsageError(f"blocks must be a positive integer, got {blocks!r}")
    if family == "dream" and remasking is not None:
        raise UsageError("remasking applies to LLaDA models")
    if family == "dream" and blocks is None:
        return DreamParams(max_new_tokens=new_tokens, steps=steps or new_tokens, alg=alg,
                           temperature=0.0).validate().to_dict()
    blocks = blocks or 1
    length = blocks * block_length if block_length is not None else -(-new_tokens // blocks) * blocks
    steps = steps or length
    if steps % blocks:
        raise UsageError(f"steps ({steps}) must be a multiple of blocks ({blocks})")
    if family == "dream":
        return DreamParams(max_new_tokens=length, steps=steps, block_length=length // blocks, alg=alg,
                           temperature=0.0).validate().to_dict()
    return LLaDAParams(gen_length=length, steps=steps, block_length=length // blocks, temperature=0.0,
                       remasking=remasking or "low_confidence").validate().to_dict()
