"""Which family module handles a checkpoint, decided from its config.json."""
from __future__ import annotations

from types import ModuleType

from . import dream, llada

FAMILIES: dict[str, ModuleType] = {dream.FAMILY: dream, llada.FAMILY: llada}


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
