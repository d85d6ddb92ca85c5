"""The toy family's runtime module: LLaDA's generation with another default length and step count and a
schedule of its own name."""
from __future__ import annotations

from dataclasses import dataclass

from dlmtrt.runtime.families.llada import LLaDA, LLaDAParams


@dataclass
class ToyParams(LLaDAParams):
    gen_length: int = 8
    steps: int = 8
    block_length: int = 8


class Toy(LLaDA):
    name = "toy"
    title = "Toy"
    params = ToyParams
    schedule = "toy-blocks"

    def schedule_name(self, params: dict) -> str:
        return f"toy-blocks={params['gen_length'] // params['block_length']}"


FAMILY = Toy()
