"""Cache policies by name, so the CLI, the eval harness and the API share one spelling: `name[:k=v,...]`."""
from __future__ import annotations

from .decode import CachePolicy, NoCache

POLICIES: dict[str, type] = {"none": NoCache}


def parse_policy(spec: str) -> CachePolicy:
    """'none' or 'name:key=value,key=value' -> a policy instance (values parsed as int, float or str)."""
    name, _, rest = spec.partition(":")
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy '{name}'; available: {', '.join(POLICIES)}")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"policy option '{item}' must look like key=value")
        kwargs[key.strip().replace("-", "_")] = _value(val.strip())
    try:
        return POLICIES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for policy '{name}': {e}") from None


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
