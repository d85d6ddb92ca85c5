"""The runtime side of the model families: one module each in this package (found by listing it), beside the
family's model file in dlmtrt/models/families/. A module defines `FAMILY`, an instance of a `Family` subclass:
its generation parameters (upstream names and defaults, validation that names the offending field), how it
builds a `DecodeSession`, whether it draws random numbers, its schedule's name, the published cache policies
its authors defined for it. The CLI, the server, evals, bench and calibration take everything from here and
never branch on a family's name. Modules outside the package (a plugin, a test) join with `register`.

Generic names: callers (the CLI's options, the server's request fields) speak of `max_new_tokens`, `steps`,
`block_length`, `temperature`, ...; a family maps the ones it spells differently through `aliases`
(LLaDA: max_new_tokens -> gen_length).
"""
from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from dlmtrt.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

    from ..decode import DecodeSession, GenerationStats
    from ..policies import DecodePlan


class Family:
    """A model family's generation. Subclasses set the class attributes and implement `rule`; `generate` is the
    family's upstream entry point (e.g. Dream's `diffusion_generate`) over any backend and cache policy."""

    name: ClassVar[str]
    title: ClassVar[str]  # as people write it: Dream, LLaDA
    params: ClassVar[type]  # dataclass with validate() (raising UsageError with `field`) and to_dict()
    aliases: ClassVar[dict[str, str]] = {}  # generic name -> this family's own
    schedule: ClassVar[str]  # its own schedule's name, for tables
    published_policies: ClassVar[frozenset[str]] = frozenset()  # cache policies whose authors' code covers it
    logits_shift: ClassVar[bool] = False  # row p's logits predict token p + 1 (Dream)
    blockwise_schedule: ClassVar[bool] = False  # its own schedule decodes in blocks (LLaDA), not only on request
    block_causal: ClassVar[bool] = False  # block-causal attention: committed blocks' K/V are exact (SDAR)
    default_policy: ClassVar[str] = "none"  # the cache policy when none is asked for
    modifiers: ClassVar[frozenset[str]] = frozenset({"parallel", "early", "prophet"})  # policy modifiers defined for it
    surplus_steps: ClassVar[str] = "steps beyond one per token commit nothing"  # what extra steps do

    # ---- parameters --------------------------------------------------------------------------------------
    def own(self, name: str) -> str:
        """This family's name for a generic parameter name."""
        return self.aliases.get(name, name)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.params))

    def takes(self, generic: str) -> bool:
        return self.own(generic) in self.param_names

    def defaults(self, checkpoint_dir: str | Path | None) -> dict:
        """Upstream's defaults for this checkpoint (a family whose defaults come from config.json overrides)."""
        return {}

    def resolve(self, checkpoint_dir: str | Path | None = None, **explicit) -> dict:
        """The generation parameters (own names) for the caller's explicit values (generic or own names) over
        the family's upstream defaults; a parameter the family does not take is refused, named."""
        own = {self.own(k): v for k, v in explicit.items()}
        wrong = sorted(k for k in own if k not in self.param_names)
        if wrong:
            raise UsageError(f"{self.name} generation does not take {', '.join(wrong)}; it takes "
                             f"{', '.join(self.param_names)}", field=wrong[0])
        p = self.params(**{**self.defaults(checkpoint_dir), **self.normalise(own)})
        self.fit_defaults(p, own)
        return p.validate().to_dict()

    def normalise(self, own: dict) -> dict:
        """Explicit values as the family's parameters hold them (e.g. Dream: top_k 0 means off)."""
        return own

    def fit_defaults(self, p, explicit: dict) -> None:
        """Adjust defaults the caller did not set to the values set (e.g. LLaDA: a block no longer than the
        answer)."""

    def new_tokens(self, params: dict) -> int:
        return params[self.own("max_new_tokens")]

    def budget(self, params: dict) -> tuple[int, int, str]:
        """(steps, the tokens they decode, what those are): more steps than tokens buy nothing
        (`check_step_budget`)."""
        return params[self.own("steps")], self.new_tokens(params), "new tokens"

    def blockwise(self, params: dict) -> bool:
        """Whether `params` decode the answer in blocks."""
        return self.blockwise_schedule or params.get("block_length") is not None

    def draws_random(self, params: dict) -> bool:
        """Whether decoding with `params` draws random numbers (its tokens depend on the random state)."""
        return float(params.get("temperature", 0)) > 0

    def batches_sampling(self, params: dict, plan) -> bool:
        """Whether a sampling generation with `params` and `plan` draws only through runtime/row_rng.py, over
        positions that are its own: then it may share a batch exactly, each sequence with its own generator."""
        return False

    def schedule_name(self, params: dict) -> str:
        return self.schedule

    def prefix_reuse(self, params: dict) -> bool:
        """Whether a prefix store can serve a generation with `params`."""
        return True

    def greedy(self, new_tokens: int, *, steps: int | None = None, blocks: int | None = None,
               block_length: int | None = None, **own) -> dict:
        """Deterministic (temperature 0) confidence-ordered decoding of `new_tokens`, one token per step unless
        `steps` says otherwise: what the evaluator, the trajectory recorder and the benchmarks decode with.
        `blocks` (or `block_length`) split the answer, whose length is rounded up to whole blocks."""
        raise NotImplementedError

    # ---- decoding ------------------------------------------------------------------------------------------
    def rule(self, info, params: dict, prompt_length: int, plan: "DecodePlan"):
        """The unmasking rule (runtime/unmasking.py) of `params`, built once for one generation."""
        raise NotImplementedError

    def session(self, backend, input_ids: "Tensor", attention_mask: "Tensor | None", params: dict,
                plan: "DecodePlan", prefix_store=None, constraints: dict | None = None,
                answer_start_pos: int | None = None) -> "DecodeSession":
        """The `DecodeSession` of one generation with validated `params`: what `generate` drives, and what a
        server steps among others. `constraints` and `answer_start_pos`: `constrain`."""
        from ..decode import DecodeSession
        x, am = canvas(input_ids, attention_mask, self.new_tokens(params), backend.info.mask_token_id)
        span = constrain(x, input_ids.shape[1], constraints, answer_start_pos)
        return DecodeSession(backend, x, am, self.rule(backend.info, params, input_ids.shape[1], plan), plan,
                             prefix_store=prefix_store, answer_span=span)

    def generate(self, backend, input_ids: "Tensor", attention_mask: "Tensor | None" = None, *, policy=None,
                 on_step=None, max_positions: int | None = None, prefix_store=None, constraints: dict | None = None,
                 answer_start_pos: int | None = None, **params) -> tuple["Tensor", "GenerationStats"]:
        """The family's generation with `params` (own names; unset ones take upstream's defaults, the Python
        API's: config.json is not read); returns the full canvas and the statistics. `constraints` pin tokens
        at answer positions, `answer_start_pos` places +prophet's span (`constrain`)."""
        from ..decode import drive
        from ..policies import parse_policy
        p = self.params(**params).validate().to_dict()
        plan = parse_policy(policy)
        total = input_ids.shape[1] + self.new_tokens(p)
        if max_positions is not None and total > max_positions:
            raise UsageError(f"prompt + new tokens = {total} exceeds the model's {max_positions} positions; "
                             "shorten the prompt or ask for fewer new tokens", field="max_new_tokens")
        extra = {k: v for k, v in (("constraints", constraints), ("answer_start_pos", answer_start_pos)) if v is not None}
        return drive(self.session(backend, input_ids, attention_mask, p, plan, prefix_store, **extra), on_step)

    def check_rule(self, info, params: dict, prompt_length: int, plan: "DecodePlan") -> None:
        """Build the rule, so that whatever it refuses is refused before any work."""
        self.rule(info, params, prompt_length, plan)


def canvas(ids: "Tensor", attention_mask: "Tensor | None", new: int, mask_id: int) -> tuple["Tensor", "Tensor"]:
    """The canvas (prompt, then `new` masks) and its attention mask (the prompt's, then ones)."""
    import torch
    import torch.nn.functional as F
    x = F.pad(ids, (0, new), value=mask_id)
    am = torch.ones_like(x, dtype=torch.bool)
    if attention_mask is not None:
        am[:, : ids.shape[1]] = attention_mask.bool()
    return x, am


def span_options(prompt_length: int, constraints: dict | None, answer_start: int | None) -> dict:
    """`session`'s constraint options for a caller that counts +prophet's span start in answer positions (the
    CLI's --answer-start, the server's answer_start): only the ones given, so that a family whose `session`
    predates them still takes the call."""
    out: dict = {"constraints": constraints} if constraints else {}
    if answer_start is not None:
        out["answer_start_pos"] = prompt_length + answer_start
    return out


def constrain(x: "Tensor", prompt_length: int, constraints: dict | None, answer_start_pos: int | None
              ) -> list[int] | None:
    """Pin `constraints` ({answer position: token id}, 0 = the first answer position; Prophet's form) in the
    canvas `x` in place, and return +prophet's span: the canvas positions from `answer_start_pos` (absolute, as
    Prophet's generate takes it; by default 2 after the last constrained position, as its eval_llada.py sets
    it), at most 5, inside the answer. A constrained position is never masked, so no rule commits over it: the
    tokens stay what was pinned after every step, as Prophet re-applies them. A position past the canvas is
    skipped and a negative one overwrites the prompt, as theirs does (the CLI and the server refuse both,
    runtime/constraints.py)."""
    from ..policies import PROPHET_SPAN
    L = x.shape[1]
    for pos, tok in (constraints or {}).items():
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < -prompt_length:
            raise UsageError(f"a constraint's position counts answer tokens from 0 (negative ones reach back into "
                             f"the prompt, as Prophet's code writes them), got {pos!r}", field="constraints")
        if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
            raise UsageError(f"a constraint's token must be a token id, got {tok!r} at {pos}", field="constraints")
        if prompt_length + pos < L:
            x[:, prompt_length + pos] = tok
    if answer_start_pos is None and constraints:
        answer_start_pos = prompt_length + max(constraints) + 2
    if answer_start_pos is None:
        return None
    return [p for p in range(answer_start_pos, min(L, answer_start_pos + PROPHET_SPAN)) if p >= prompt_length]


def read_config(checkpoint_dir: str | Path | None, name: str = "config.json") -> dict:
    """A checkpoint's config.json (or another of its JSON files), {} when there is none."""
    if checkpoint_dir is None or not (Path(checkpoint_dir) / name).exists():
        return {}
    return json.loads((Path(checkpoint_dir) / name).read_text())


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


for _m in pkgutil.iter_modules(__path__):
    register(importlib.import_module(f"{__name__}.{_m.name}").FAMILY)


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise UsageError(f"no runtime for model family '{name}'; known: {', '.join(FAMILIES)}", field="family")
    return FAMILIES[name]
