"""The model families: one module each in this package, found by listing it, so that adding a family is adding
one file here (and its runtime module in dlmtrt/runtime/families/). A family module is torch-free at import and
declares:

    FAMILY, ARCHITECTURES, MODEL_TYPES      its name and how a config.json names it
    ALIASES                                 {alias: Hugging Face repo id} of its released checkpoints
    SHAPES                                  {shape name: ModelArgs fields} of released sizes (bench, random weights)
    args_from_config(cfg, gen) -> ModelArgs
    checkpoint_to_ours(name), ours_to_checkpoint(name)       weight names
    make_config(args), make_generation_config(args)          the config files of a checkpoint it writes
    SPECIAL_TOKENS, TOKEN_ROLES, CHAT_TEMPLATE, tiny_args(vocab_size, ids, sizes)   its tiny checkpoints

Modules outside the package (a plugin, a test) join with `register(module)`.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

FAMILIES: dict[str, ModuleType] = {}


def register(module: ModuleType) -> ModuleType:
    """Add a model family module (see the module docstring for what it declares); returns it."""
    FAMILIES[module.FAMILY] = module
    return module


for _m in pkgutil.iter_modules(__path__):
    register(importlib.import_module(f"{__name__}.{_m.name}"))


def get(name: str) -> ModuleType:
    from dlmtrt.errors import UsageError
    if name not in FAMILIES:
        raise UsageError(f"unknown model family '{name}'; known: {', '.join(FAMILIES)}", field="family")
    return FAMILIES[name]


def family_of(cfg: dict) -> ModuleType | None:
    archs = cfg.get("architectures") or []
    mt = cfg.get("model_type")
    for fam in FAMILIES.values():
        if any(a in fam.ARCHITECTURES for a in archs) or mt in fam.MODEL_TYPES:
            return fam
    return None


def supported_summary() -> str:
    return "; ".join(f"{name}: architectures {', '.join(m.ARCHITECTURES)} / model_type {m.MODEL_TYPES[0]}"
                     for name, m in FAMILIES.items())


def aliases() -> dict[str, str]:
    """Every family's {alias: repo id}."""
    return {a: repo for m in FAMILIES.values() for a, repo in m.ALIASES.items()}


def shapes() -> dict[str, tuple[ModuleType, dict]]:
    """{shape name: (family module, ModelArgs fields)}: the released sizes, then `tiny-<family>` for each."""
    out = {name: (m, fields) for m in FAMILIES.values() for name, fields in m.SHAPES.items()}
    out.update({f"tiny-{name}": (m, {}) for name, m in FAMILIES.items()})
    return out
