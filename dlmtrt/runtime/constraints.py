"""Constraints: tokens pinned at answer positions before decoding starts, and kept there (no rule ever commits
over a position that is not masked). Prophet (pixeli99/Prophet) pins its answer's format with them ("The answer
is" at fixed positions) and places its early-exit span after the last one; evaluation harnesses use them the
same way. Every family takes them (Dream, LLaDA, SDAR).

The text form is Prophet's (`eval_llada.py` `_parse_constraints`): "POS:WORD|POS:WORD", POS counted in answer
tokens from 0, each WORD tokenized with a leading space and its tokens placed at POS, POS + 1, ...; a later
word overwrites an earlier one where they overlap, as theirs does. Theirs skips a part that is malformed; this
refuses it in one line, naming it, and so does a position past the answer when the answer length is given.
"""
from __future__ import annotations

from dlmtrt.errors import UsageError


def parse_constraints(spec, tokenizer, answer_tokens: int | None = None) -> dict[int, int]:
    """{answer position: token id} from Prophet's text form ("200:The|201:answer"), a list of such texts (the
    CLI's repeatable --constraint) or a {position: text} mapping (the server's JSON object). '|' separates
    constraints in the text forms, so it cannot be pinned there; the mapping takes any text."""
    if isinstance(spec, str) and not spec.strip():
        return {}  # no constraints, as theirs
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        parts = [q for item in ([spec] if isinstance(spec, str) else spec)
                 for q in (item.split("|") if isinstance(item, str) else [item])]
        items = []
        for part in parts:
            if not isinstance(part, str) or ":" not in part:
                raise UsageError(f"constraint {part!r} must look like POS:TEXT, e.g. 0:The (POS counts answer tokens "
                                 "from 0)", field="constraints")
            items.append(tuple(part.split(":", 1)))
    out: dict[int, int] = {}
    for pos, word in items:
        try:
            p = int(str(pos).strip())
        except ValueError:
            raise UsageError(f"constraint position {pos!r} is not an integer (POS:TEXT, e.g. 0:The)",
                             field="constraints") from None
        if p < 0:
            raise UsageError(f"constraint position {p} is negative; positions count answer tokens from 0",
                             field="constraints")
        if not isinstance(word, str) or not word.strip():
            raise UsageError(f"constraint at {p} has no text (POS:TEXT, e.g. {p}:The)", field="constraints")
        ids = tokenizer.encode(" " + word.strip(), add_special_tokens=False)
        if answer_tokens is not None and p + len(ids) > answer_tokens:
            raise UsageError(f"constraint {p}:{word.strip()} ({len(ids)} tokens) ends at answer position "
                             f"{p + len(ids) - 1}, past the {answer_tokens}-token answer; ask for more new tokens "
                             "or move it", field="constraints")
        for i, tid in enumerate(ids):
            out[p + i] = int(tid)
    return out
