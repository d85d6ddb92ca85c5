"""The toy family's model file: LLaDA's layout and weight names under another architecture name, with the mask
token first among the specials (so its id differs from LLaDA's)."""
from __future__ import annotations

from dlmtrt.models.args import ModelArgs
from dlmtrt.models.families import llada

FAMILY = "toy"
ARCHITECTURES = ("ToyDiffusionLM",)
MODEL_TYPES = ("toy",)
ALIASES: dict[str, str] = {}
SHAPES: dict[str, dict] = {}
SPECIAL_TOKENS = ["<|toy_mask|>", "<|startoftext|>", "<|endoftext|>"]
TOKEN_ROLES = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "mask_token": "<|toy_mask|>"}
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}assistant: "
checkpoint_to_ours = llada.checkpoint_to_ours
ours_to_checkpoint = llada.ours_to_checkpoint


def args_from_config(cfg: dict, gen: dict | None = None) -> ModelArgs:
    from dataclasses import replace
    return replace(llada.args_from_config(cfg, gen), family=FAMILY)


def make_config(a: ModelArgs) -> dict:
    return {**llada.make_config(a), "architectures": list(ARCHITECTURES), "model_type": MODEL_TYPES[0]}


def make_generation_config(a: ModelArgs) -> dict:
    return {**a.token_ids(), "steps": 8, "gen_length": 8}


def tiny_args(vocab_size: int, ids: dict[str, int], s: dict) -> ModelArgs:
    from dataclasses import replace
    return replace(llada.tiny_args(vocab_size, ids, s), family=FAMILY)
