"""Constraints (runtime/constraints.py): tokens pinned at answer positions before decoding and kept there, for
Dream, LLaDA and SDAR, through the Python API, `dlmtrt generate --constraint` and the server's `constraints` field.
Prophet's own parser is the reference for the text form (tests/test_prophet.py checks its fixtures)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from dlmtrt.cli import main as cli
from dlmtrt.errors import UsageError
from dlmtrt.models.loading import load
from dlmtrt.runtime.backends.torch_backend import TorchBackend
from dlmtrt.runtime.constraints import parse_constraints
from dlmtrt.runtime.families import get
from dlmtrt.runtime.policies import parse_policy

UP = __import__("pathlib").Path(__file__).parent / "fixtures" / "upstream"


class Chars:
    """A tokenizer of one token per character (code point), to read positions off easily."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_the_text_forms_parse_as_prophets():
    assert parse_constraints("0:ab|3:c", Chars()) == {0: 32, 1: 97, 2: 98, 3: 32, 4: 99}
    assert parse_constraints(["0:ab", "3:c"], Chars()) == parse_constraints("0:ab|3:c", Chars())
    assert parse_constraints({"2": "x"}, Chars()) == {2: 32, 3: 120}
    assert parse_constraints("0:abc|1:z", Chars()) == {0: 32, 1: 32, 2: 122, 3: 99}  # a later word overwrites
    assert parse_constraints(" 4 : hi ", Chars()) == {4: 32, 5: 104, 6: 105}  # their strip()s


@pytest.mark.parametrize("spec, words", [("abc", "POS:TEXT"), ("x:ab", "not an integer"), ("-1:a", "negative"),
                                         ("2:", "no text"), ("0:a||", "POS:TEXT")])
def test_malformed_constraints_are_refused_in_one_line(spec, words):
    with pytest.raises(UsageError, match=words):
        parse_constraints(spec, Chars())


def test_a_constraint_past_the_answer_is_refused_when_the_length_is_known():
    assert parse_constraints("5:ab", Chars(), answer_tokens=8) == {5: 32, 6: 97, 7: 98}
    with pytest.raises(UsageError, match="past the 8-token answer"):
        parse_constraints("6:ab", Chars(), answer_tokens=8)


@pytest.fixture(scope="module")
def llada():
    model, tok, _ = load(str(UP / "ckpt-llada"), dtype="float32", device="cpu")
    return TorchBackend(model), tok


@pytest.fixture(scope="module")
def dream():
    model, tok, _ = load(str(UP / "ckpt-dream"), dtype="float32", device="cpu")
    return TorchBackend(model), tok


def _trace(be, family, ids, params, constraints, policy="none"):
    fam = get(family)
    s = fam.session(be, ids, torch.ones_like(ids), fam.params(**params).validate().to_dict(), parse_policy(policy),
                    constraints=constraints)
    canvases = [s.x.clone()]
    while not s.done:
        s.step()
        canvases.append(s.x.clone())
    return canvases, s.finish()


@pytest.mark.parametrize("family, params", [
    ("llada", dict(gen_length=16, steps=16, block_length=8)),
    ("llada", dict(gen_length=16, steps=8, block_length=4, remasking="random")),
    ("llada", dict(gen_length=16, steps=16, block_length=16, cfg_scale=0.5)),
    ("dream", dict(max_new_tokens=16, steps=16, temperature=0.0, alg="entropy")),
    ("dream", dict(max_new_tokens=16, steps=8, temperature=0.0, block_length=8, alg="entropy")),
])
def test_pinned_tokens_stay_through_every_step_and_the_rest_decodes(family, params, llada, dream):
    be, _ = llada if family == "llada" else dream
    torch.manual_seed(0)
    ids = torch.randint(1, 250, (2, 7), generator=torch.Generator().manual_seed(3))
    pins = {0: 65, 5: 66, 6: 67, 15: 68}
    canvases, stats = _trace(be, family, ids, params, pins)
    mask = be.info.mask_token_id
    for x in canvases:
        for p, t in pins.items():
            assert (x[:, 7 + p] == t).all()
    assert not (canvases[-1] == mask).any()
    assert stats.new_tokens == 16 - len(pins)  # only the unpinned positions are decoded
    plain, _ = _trace(be, family, ids, params, None)
    assert not torch.equal(plain[-1], canvases[-1])  # the pins changed what the model saw


def test_cfgs_unconditional_copy_masks_the_constraints_too(llada):
    be, _ = llada
    ids = torch.randint(1, 250, (1, 7), generator=torch.Generator().manual_seed(1))
    fam = get("llada")
    p = fam.params(gen_length=8, steps=8, block_length=8, cfg_scale=0.5).validate().to_dict()
    s = fam.session(be, ids, torch.ones_like(ids), p, parse_policy("none"), constraints={2: 70})
    want = torch.zeros(1, 15, dtype=torch.bool)
    want[0, :7] = True
    want[0, 9] = True
    assert torch.equal(s.seq["prompt_index"], want)  # Prophet's prompt_index = (x != mask_id) after pinning


def test_a_constraint_past_the_canvas_is_skipped_by_the_api_as_prophet_skips_it(llada):
    be, _ = llada
    ids = torch.randint(1, 250, (1, 7), generator=torch.Generator().manual_seed(1))
    from dlmtrt.runtime.families.llada import llada_generate
    a, _ = llada_generate(be, ids, steps=8, gen_length=8, block_length=8, constraints={3: 70, 40: 71})
    b, _ = llada_generate(be, ids, steps=8, gen_length=8, block_length=8, constraints={3: 70})
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", ["low_confidence_static", "low_confidence_dynamic", "sequential"])
def test_sdar_keeps_its_constraints_through_its_block_schedule(strategy, tmp_path_factory):
    """SDAR's schedule commits a fixed share of a block per step and, where that share exceeds the block's
    masks, rewrites unmasked tokens (upstream, in the block that holds the prompt's tail): never a pin."""
    from dlmtrt.models.tiny import make_tiny
    from dlmtrt.runtime.families.sdar import sdar_generate
    d = tmp_path_factory.mktemp("sdar")
    make_tiny("sdar", d)
    model, _, _ = load(str(d), dtype="float32", device="cpu")
    be = TorchBackend(model)
    ids = torch.randint(1, 250, (2, 6), generator=torch.Generator().manual_seed(4))
    pins = {0: 65, 1: 66, 5: 67, 11: 68}
    kw = dict(gen_length=12, block_length=4, denoising_steps=4, top_k=1, remasking_strategy=strategy)
    fam = get("sdar")
    s = fam.session(be, ids, None, fam.params(**kw).validate().to_dict(), parse_policy("append"), constraints=pins)
    while not s.done:
        s.step()
        for p, t in pins.items():
            assert (s.x[:, 6 + p] == t).all()
    plain, _ = sdar_generate(be, ids, **kw)
    assert not (s.x[:, 6:18] == be.info.mask_token_id).any() and not torch.equal(plain[:, 6:18], s.x[:, 6:18])
    with pytest.raises(UsageError, match="answer positions 0 to 11"):
        fam.session(be, ids, None, fam.params(**kw).validate().to_dict(), parse_policy("append"), constraints={12: 5})


def test_generate_pins_a_constraint_from_the_cli():
    r = CliRunner().invoke(cli, ["generate", "-m", str(UP / "ckpt-llada"), "-p", "hello", "-n", "12", "--steps",
                                 "12", "--constraint", "0:The", "--constraint", "6:end", "--json"])
    assert r.exit_code == 0, r.output
    import json
    doc = json.loads(r.output[r.output.index("{"):])
    answer = doc["answers"][0]
    assert answer.startswith(" The") and answer[6:10] == " end"
    assert doc["stats"]["new_tokens"] == 12 - 8


@pytest.mark.parametrize("args, words", [
    (["--constraint", "zero:The"], "not an integer"),
    (["--constraint", "10:The"], "past the 12-token answer"),
    (["--policy", "none+prophet"], "+prophet needs the answer's position"),
    (["--answer-start", "3"], "--answer-start places +prophet's span"),
    (["--policy", "none+prophet", "--answer-start", "12"], "past the 12-token answer"),
    (["--policy", "dual+prophet", "--constraint", "0:a"], "cache policy none only"),
])
def test_generate_refuses_bad_constraints_before_loading(args, words):
    r = CliRunner().invoke(cli, ["generate", "-m", str(UP / "ckpt-llada"), "-p", "hello", "-n", "12", "--steps",
                                 "12", *args])
    assert r.exit_code == 2 and words in r.output, r.output
    assert "Traceback" not in r.output
