"""Structured answers that always close: with max_tokens (or, without it, the context's room) as the answer's
budget, every answer a grammar constrains parses, because each position's mask keeps a closing within the positions
left (dglocal.generation.closing.Budget); a budget no answer fits is a ConfigError naming max_tokens, before any step.

The tiny random-weights model writes noise on its own, so its strings and lists never end by themselves: before,
a json_object at 48 tokens came back as an unterminated string, and a schema like the one below at 96 parsed 1 time
in 12. Each case runs 20 seeds in one batch (one forward a step for all of them).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import tiny
from dglocal.errors import ConfigError
from dglocal.generation import closing
from dglocal.generation.driver import generate_many, prepare, stream
from dglocal.generation.grammar import CanvasGrammar, GrammarSpec, spelling

pytestmark = pytest.mark.backend

SEEDS, C = 20, tiny.CANVAS
STEPS = dict(max_denoising_steps=4)

# what pydantic writes for a model with plain strings (no maxLength), an enum, an optional field, a bounded list
# and a nested model
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "color": {"enum": ["red", "green", "blue"]},
        "nick": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["kind", "age"]},
    },
    "required": ["name", "color", "tags", "pet"],
}
LIST = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]+/'
SENTENCE = r"[a-z]+( [a-z]+)*\."


@pytest.fixture(scope="module")
def batched(tiny_f32_gguf):
    import dglocal

    m = dglocal.load(tiny_f32_gguf, n_seq_max=SEEDS, n_ubatch=SEEDS * C, n_ctx=SEEDS * 256, kv_type="f32",
                     flash_attn=False, n_threads=2)
    yield m
    m.close()


def answers(model, **options) -> list[str]:
    prompts = [[2, 5 + i, 9] for i in range(SEEDS)]
    return [out.text for out in generate_many(model, prompts, seed=11, **STEPS, **options)]


@pytest.mark.parametrize("budget", [24, 48])
def test_json_object_closes(batched, budget):
    for text in answers(batched, grammar=GrammarSpec("json_object"), max_new_tokens=budget):
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("budget", [72, 96])  # its shortest answer takes 70 of the tiny vocabulary's tokens
def test_a_schema_of_plain_strings_closes_and_validates(batched, budget):
    for text in answers(batched, json_schema=PERSON, max_new_tokens=budget):
        jsonschema.validate(json.loads(text), PERSON)


def test_a_regex_closes(batched):
    for text in answers(batched, regex=SENTENCE, max_new_tokens=12):
        assert re.fullmatch(SENTENCE, text), text


def test_a_lark_grammar_closes(batched):
    for text in answers(batched, grammar=LIST, max_new_tokens=12):
        assert re.fullmatch(r"\(\d+(,\d+)*\)", text), text


def test_without_max_tokens_the_budget_is_the_context(batched):
    """No max_tokens: the request may run to its context's end, and that room is the budget it closes within
    (each sequence holds 256 positions: a 201-token prompt leaves 3 canvases)."""
    prompts = [[2] + [5 + (i + k) % 300 for k in range(200)] for i in range(SEEDS)]
    prepared = prepare(batched, prompts[0], to_context=True, grammar=GrammarSpec("json_object"))
    assert prepared.own["grammar"].budget.tokens == prepared.plan.config.max_new_tokens == 48
    outs = generate_many(batched, prompts, seed=5, to_context=True, grammar=GrammarSpec("json_object"), **STEPS)
    for out in outs:
        assert len(out.tokens) <= 48 and isinstance(json.loads(out.text), dict), out.text


def test_the_shortest_closing_is_found(batched):
    """The closing walk on the tiny vocabulary: brackets close before anything opens, optional keys are left out,
    and where the greedy walk takes a longer enum value, `shortest` finds the short one."""
    model = batched.model
    text = {}
    for name, spec in (("object", GrammarSpec("json_object")), ("person", GrammarSpec("json_schema", PERSON)),
                       ("list", GrammarSpec("lark", LIST)), ("answer", GrammarSpec("regex", "(maybe|no)"))):
        matcher = CanvasGrammar(model, spec, model.eos_ids).matcher
        path = closing.shortest(matcher, spelling(model), 1)
        text[name] = model.detokenize(path)
    assert text == {"object": "{}", "list": "(0)", "answer": "no",
                    "person": '{"name": "", "color": "blue", "tags": [], "pet": {"kind": "", "age": 0}}'}


@pytest.mark.parametrize("options", [dict(json_schema=PERSON, max_new_tokens=20), dict(regex="[a-z]{30}", max_new_tokens=8),
                                     dict(grammar=LIST, max_new_tokens=2)])
def test_a_budget_no_answer_fits_is_an_error_before_any_step(batched, options):
    events = []
    with pytest.raises(ConfigError, match=r"cannot end within max_tokens \(\d+\)"):
        for event in stream(batched, [2, 3], seed=0, **STEPS, **options):
            events.append(event)
    assert events == []


def test_the_error_names_max_tokens(batched):
    model = batched.model
    with pytest.raises(ConfigError, match=r"the JSON schema cannot end within max_tokens \(20\): the shortest answer "
                                          r"found takes \d+ tokens") as e:
        CanvasGrammar(model, GrammarSpec("json_schema", PERSON), model.eos_ids, max_tokens=20)
    assert e.value.param == "max_tokens"
