"""LLaDA's generation (`generate`: semi-autoregressive blocks, low_confidence / random remasking,
classifier-free guidance), with the defaults of its authors' code."""
from __future__ import annotations

from dataclasses import dataclass

from dlmtrt.errors import UsageError

from ..params import Params, check_blocks, check_float, greedy_layout, positive_int
from . import Family, canvas, constrain

REMASKING = ("low_confidence", "random")


@dataclass
class LLaDAParams(Params):
    gen_length: int = 128
    steps: int = 128
    block_length: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"

    def validate(self) -> "LLaDAParams":
        positive_int("gen_length", self.gen_length)
        positive_int("steps", self.steps)
        check_blocks("gen_length", self.gen_length, self.block_length, self.steps)
        check_float("temperature", self.temperature)
        check_float("cfg_scale", self.cfg_scale)
        if self.remasking not in REMASKING:
            raise UsageError(f"unknown remasking '{self.remasking}'; choose from {', '.join(REMASKING)}",
                             field="remasking")
        return self


class LLaDA(Family):
    name = "llada"
    title = "LLaDA"
    params = LLaDAParams
    aliases = {"max_new_tokens": "gen_length"}
    schedule = "blocks"
    blockwise_schedule = True
    published_policies = frozenset({"decode", "greedy", "block", "dual"})
    surplus_steps = ("steps beyond one per token commit nothing (upstream runs them all; so do we, except after "
                     "the last token)")

    def fit_defaults(self, p: LLaDAParams, explicit: dict) -> None:
        if "block_length" not in explicit and p.gen_length < p.block_length:
            p.block_length = p.gen_length  # upstream's 128 does not fit a shorter answer: one block

    def draws_random(self, params: dict) -> bool:
        return float(params["temperature"]) > 0 or params["remasking"] == "random"

    def batches_sampling(self, params: dict, plan) -> bool:
        return plan.spec == "none" and params["remasking"] == "low_confidence" and params["cfg_scale"] == 0

    def prefix_reuse(self, params: dict) -> bool:
        return params["cfg_scale"] == 0  # the unconditional copy masks the prompt

    def schedule_name(self, params: dict) -> str:
        name = f"blocks={params['gen_length'] // params['block_length']}"
        return name + (f" {params['remasking']}" if params["remasking"] != "low_confidence" else "")

    def greedy(self, new_tokens: int, *, steps=None, blocks=None, block_length=None, remasking=None, alg=None,
               **own) -> dict:
        if own:
            raise UsageError(f"{', '.join(own)} does not apply to llada models", field=next(iter(own)))
        length, steps, block = greedy_layout(new_tokens, steps, blocks or (None if block_length else 1),
                                             block_length)
        return self.params(gen_length=length, steps=steps, block_length=block, temperature=0.0,
                           remasking=remasking or "low_confidence").validate().to_dict()

    def rule(self, info, params: dict, prompt_length: int, plan):
        from ..unmasking import LLaDARule
        p = self.params(**params).validate()
        return LLaDARule(p, prompt_length, parallel=plan.parallel.threshold if plan.parallel is not None else None,
                         order=getattr(plan.cache, "order", "step") if p.remasking == "random" else "step",
                         **plan.rule_options(blockwise=True))

    def session(self, backend, input_ids, attention_mask, params: dict, plan, prefix_store=None, constraints=None,
                answer_start_pos=None):
        """With classifier-free guidance every step also runs an unconditional copy of the canvas whose prompt
        is masked, and its pinned constraints too (Prophet's `prompt_index = x != mask_id`, taken after pinning);
        prefix reuse does not apply then."""
        from ..decode import DecodeSession
        info = backend.info
        x, am = canvas(input_ids, attention_mask, params["gen_length"], info.mask_token_id)
        prompt_index = x != info.mask_token_id
        prompt_index[:, input_ids.shape[1]:] = False
        span = constrain(x, input_ids.shape[1], constraints, answer_start_pos)
        prompt_index |= x != info.mask_token_id
        return DecodeSession(backend, x, am, self.rule(info, params, input_ids.shape[1], plan), plan,
                             cfg_scale=params["cfg_scale"], prompt_index=prompt_index, prefix_store=prefix_store,
                             answer_span=span)


FAMILY = LLaDA()


def llada_generate(backend, prompt, attention_mask=None, *, steps: int = 128, gen_length: int = 128,
                   block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
                   remasking: str = "low_confidence", policy=None, on_step=None, max_positions: int | None = None,
                   prefix_store=None, constraints: dict | None = None, answer_start_pos: int | None = None,
                   early_exit_thresholds: dict | None = None):
    """LLaDA's `generate` (blocks, low_confidence / random remasking, CFG); returns the canvas and the statistics.

    Prophet's arguments (pixeli99/Prophet `generate_earlyexit.generate`): `constraints` {answer position: token
    id} pinned in the canvas; `early_exit_thresholds` ({'early', 'mid', 'late'} logit gaps) turns its early exit
    on (the policy's `+prophet`), over the five positions from `answer_start_pos` (absolute; by default 2 after
    the last constraint, as its eval_llada.py). `stats.exit_steps` says where each sequence stopped.

    LLaDA's published model code applies no attention mask, so upstream attends to left padding: pass
    `attention_mask=None` to reproduce that; with a mask, padding is never attended."""
    if early_exit_thresholds is not None:
        policy = with_prophet(policy, early_exit_thresholds)
    return FAMILY.generate(backend, prompt, attention_mask, policy=policy, on_step=on_step,
                           max_positions=max_positions, prefix_store=prefix_store, constraints=constraints,
                           answer_start_pos=answer_start_pos, steps=steps, gen_length=gen_length,
                           block_length=block_length, temperature=temperature, cfg_scale=cfg_scale,
                           remasking=remasking)


def with_prophet(policy, early_exit_thresholds: dict):
    """`policy` with `+prophet` at these thresholds (refused if it already has another +prophet)."""
    from ..policies import Prophet, parse_policy
    from dataclasses import replace
    plan = parse_policy(policy)
    want = Prophet.of(early_exit_thresholds)
    if plan.prophet is not None and plan.prophet != want:
        raise UsageError(f"policy {plan.spec} has +prophet at other thresholds than early_exit_thresholds "
                         f"{early_exit_thresholds}: give them once", field="early_exit_thresholds")
    return replace(plan, prophet=want, spec=plan.spec if plan.prophet else f"{plan.spec}+{want.spec}")
