"""Generation parameters, family-independent: the checks every family's parameters share, and the entry points
the CLI, the server, the evaluator and the benchmarks call with a family's name. Each family's own parameters,
with the defaults its authors' code actually uses, live in its module (runtime/families/)."""
from __future__ import annotations

from dlmtrt.errors import UsageError

SEED_LIMIT = 2 ** 64  # seeds are in [0, SEED_LIMIT): what torch.manual_seed takes (CLI --seed, the server's seed)


class Params:
    """What every family's parameter dataclass shares: `to_dict` (its own names, as its generation takes them)."""

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}", field=name)


def check_float(name: str, value, low: float = 0.0) -> None:
    """A number >= `low` (temperatures, scales)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= low:
        raise UsageError(f"{name} must be >= {low:g}, got {value!r}", field=name)


def check_blocks(what: str, length: int, block_length, steps: int) -> None:
    """Blocks of `block_length` must tile the answer, and the steps must split evenly over the blocks."""
    positive_int("block_length", block_length)
    if length % block_length:
        raise UsageError(f"{what} ({length}) must be a multiple of block_length ({block_length}); pass "
                         "--block-length dividing it", field="block_length")
    blocks = length // block_length
    if steps % blocks:
        raise UsageError(f"steps ({steps}) must be a multiple of the number of blocks ({blocks} = {what} / "
                         "block_length)", field="steps")


def greedy_layout(new_tokens: int, steps: int | None, blocks: int | None,
                  block_length: int | None) -> tuple[int, int, int]:
    """(answer length, steps, block length) of `new_tokens` split into `blocks` blocks (or blocks of
    `block_length`, not both), the answer rounded up to whole blocks, one step per token unless `steps`."""
    if block_length is not None:
        if blocks is not None:
            raise UsageError("give blocks or block_length, not both", field="block_length")
        positive_int("block_length", block_length)
        blocks = -(-new_tokens // block_length)
    if blocks is None or not isinstance(blocks, int) or blocks < 1:
        raise UsageError(f"blocks must be a positive integer, got {blocks!r}", field="blocks")
    length = blocks * block_length if block_length is not None else -(-new_tokens // blocks) * blocks
    steps = steps or length
    if steps % blocks:
        raise UsageError(f"steps ({steps}) must be a multiple of blocks ({blocks})", field="steps")
    return length, steps, length // blocks


def param_names(family: str) -> tuple[str, ...]:
    from .families import get
    return get(family).param_names


def family_params(family: str, checkpoint_dir=None, **explicit) -> dict:
    """Keyword arguments for the family's generation (and `generate_text`): the caller's explicit values,
    generic or own names, over the family's upstream defaults (Dream: as derived from the checkpoint's
    config.json). A parameter the family does not take is refused, named."""
    from .families import get
    return get(family).resolve(checkpoint_dir, **explicit)


def greedy_params(family: str, new_tokens: int, *, steps: int | None = None, blocks: int | None = None,
                  remasking: str | None = None, alg: str = "maskgit_plus", block_length: int | None = None,
                  attention: str | None = None) -> dict:
    """Deterministic (temperature 0) confidence-ordered decoding of `new_tokens` (the family's `greedy`): LLaDA
    in `blocks` semi-autoregressive blocks (default 1); Dream in its own single-block schedule unless `blocks`
    or `block_length` ask for Fast-dLLM's block decoding. `remasking` is LLaDA's, `alg` Dream's. A block-causal
    model's `attention` spec ('block_causal:16') gives the default block: the size it was trained for, which
    is the one its cache and its accuracy assume."""
    from .families import get
    fam = get(family)
    if attention is not None and block_length is None and blocks is None:
        from dlmtrt.models.attention_kinds import AttentionKind
        kind = AttentionKind.parse(attention)
        if kind.causal_blocks:
            block_length = kind.block
    own = {k: v for k, v in (("remasking", remasking), ("alg", alg)) if v is not None and fam.takes(k)}
    if remasking is not None and not fam.takes("remasking"):
        raise UsageError(f"remasking does not apply to {family} models", field="remasking")
    return fam.greedy(new_tokens, steps=steps, blocks=blocks, block_length=block_length, **own)


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
    from .families import get
    if not explicit_steps:
        return
    fam = get(family)
    steps, new, what = fam.budget(params)
    if parallel and fam.blockwise(params) and steps < new:
        raise UsageError(f"steps ({steps}) cannot bound +parallel in block decoding: Fast-dLLM's threshold rule "
                         f"decodes each block until it is done (up to one step per token, here {new}); leave "
                         "steps out, or drop +parallel for a fixed step budget", field="steps")
    if steps > new:
        raise UsageError(f"steps ({steps}) exceeds the {new} {what}: {fam.surplus_steps}; ask for at most "
                         f"{new} steps (one token per step)", field="steps")


def surplus_steps_note(family: str, params: dict) -> str | None:
    """What to tell the user when the family's *default* step count exceeds the new tokens (Dream's upstream
    default is 512 steps for any length), or None."""
    from .families import get
    fam = get(family)
    steps, new, what = fam.budget(params)
    if steps <= new:
        return None
    return (f"{steps} steps (the {family} default) for {new} {what}: {fam.surplus_steps}; pass "
            f"--steps {new} for one token per step")
