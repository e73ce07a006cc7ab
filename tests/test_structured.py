"""Structured output on a canvas: every answer parses and validates, even from a model whose free output is noise.

The tiny random-weights model (512 Gemma 4 tokens, 16-token canvases) writes nothing a grammar would accept on
its own: what makes the answers valid is the grammar's masks in the denoise pass and the repair of what still
breaks it. Each answer is checked with jsonschema (a JSON schema) or Python's re (a regex).
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from dglocal.errors import ConfigError
from dglocal.generation.driver import generate, generate_many
from dglocal.generation.grammar import GrammarSpec

pytestmark = pytest.mark.backend

N_SCHEMAS, N_REGEXES = 100, 50
BUDGET = dict(max_new_tokens=400, max_denoising_steps=16)


def schema(i: int) -> dict:
    """The i-th test schema: objects, enums, arrays, integers, numbers, booleans, bounded strings, nesting."""
    rng = np.random.default_rng(i)
    leaves = [
        {"type": "integer", "minimum": -50, "maximum": 999},
        {"enum": ["red", "green", "blue"]},
        {"type": "boolean"},
        {"type": "string", "maxLength": 6},
        {"type": "number", "minimum": 0, "maximum": 10},
        {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 3},
        {"type": "string", "enum": ["a b", "quote\"d", "new\nline"]},
        {"type": ["integer", "null"], "minimum": 0, "maximum": 9},
    ]
    def obj(depth: int) -> dict:
        n = int(rng.integers(1, 4))
        props = {}
        for k in range(n):
            if depth < 2 and rng.random() < 0.25:
                props[f"k{k}"] = obj(depth + 1)
            else:
                props[f"k{k}"] = leaves[int(rng.integers(len(leaves)))]
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}
    return obj(0)


REGEXES = [r"[a-z]{3,8}-\d{2,4}", r"(yes|no|maybe)", r"\d{3}-\d{3}-\d{4}", r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5})?",
           r"#[0-9a-f]{6}", r"(0|[1-9][0-9]{0,2})\.[0-9]{2}", r"[a-z0-9]{1,5}@[a-z]{1,5}\.(com|org)", r"<[a-z]{1,4}>"]


def test_every_json_schema_answer_validates(llama_model):
    schemas = [schema(i) for i in range(N_SCHEMAS)]
    outs = [generate(llama_model, [2, 5 + i % 40, 9], seed=i, json_schema=s, **BUDGET) for i, s in enumerate(schemas)]
    for i, (s, out) in enumerate(zip(schemas, outs)):
        assert out.finish_reason == "eos", (i, out.text)
        jsonschema.validate(json.loads(out.text), s)


def test_every_regex_answer_matches(llama_model):
    for i in range(N_REGEXES):
        rx = REGEXES[i % len(REGEXES)]
        out = generate(llama_model, [2, 7, 11 + i], seed=1000 + i, regex=rx, **BUDGET)
        assert re.fullmatch(rx, out.text), (i, rx, out.text)
        assert out.finish_reason == "eos"


def test_lark_and_gbnf_grammars(llama_model):
    lark = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'
    gbnf = 'root ::= "[" item ("," item)* "]"\nitem ::= [a-c]{1,2}'
    for i in range(5):
        out = generate(llama_model, [2, 3], seed=i, grammar=lark, **BUDGET)
        assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", out.text), out.text
        out = generate(llama_model, [2, 3], seed=i, grammar=gbnf, **BUDGET)
        assert re.fullmatch(r"\[[a-c]{1,2}(,[a-c]{1,2})*\]", out.text), out.text


def test_batched_generations_each_keep_their_grammar(llama_model):
    """Several sequences in one pass, each with its own masks (rows of one bias table on the device)."""
    prompts = [[2, 4, 6 + i] for i in range(4)]
    outs = generate_many(llama_model, prompts, seed=3, json_schema=schema(7), **BUDGET) if llama_model.n_seq_max > 1 \
        else [generate(llama_model, p, seed=3, json_schema=schema(7), **BUDGET) for p in prompts]
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema(7))


@pytest.mark.parametrize("options, message", [
    (dict(json_schema={"type": "object", "properties": {"a": {"type": "string", "format": "made-up"}}}), "format"),
    (dict(json_schema="{not json"), "not valid JSON"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="start: missing_rule"), "lark"),
    (dict(json_schema={"type": "object"}, regex="a"), "one output grammar"),
    (dict(grammar=GrammarSpec("yaml", "x")), "kind"),
])
def test_bad_grammars_are_clear_errors(llama_model, options, message):
    with pytest.raises(ConfigError, match=message):
        generate(llama_model, [2, 3], seed=0, **BUDGET, **options)


def test_a_schema_that_says_nothing_of_extra_keys_allows_none(llama_model):
    """Plain pydantic, instructor and `llm --schema` schemas leave additionalProperties out; before, the noise of a
    canvas filled extra keys (with strings that never ended). Now such an object allows only its properties, as
    llama.cpp's and xgrammar's converters read it; additionalProperties true or a schema of its own still allows
    them, and a bare {"type": "object"} is still any object."""
    from dglocal.generation.grammar import closed

    plain = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                              "b": {"type": "object", "properties": {"c": {"type": "boolean"}}}},
             "required": ["a"]}
    assert closed(plain)["additionalProperties"] is False
    assert closed(plain)["properties"]["b"]["additionalProperties"] is False
    assert closed({"type": "object"}) == {"type": "object"}
    assert closed({"properties": {}, "additionalProperties": True})["additionalProperties"] is True
    assert "additionalProperties" not in plain  # the caller's schema is not changed
    for seed in range(12):
        out = generate(llama_model, [2, 5 + seed, 9], seed=seed, json_schema=plain, **BUDGET)
        value = json.loads(out.text)
        assert set(value) <= {"a", "b"} and set(value.get("b") or {}) <= {"c"}, out.text
        jsonschema.validate(value, closed(plain))
